//! The paginated, streamed read endpoints over the knowledge store's record
//! lists (`/api/v1/analyses`, `/executions`, `/outcomes`, `/policies`).
//!
//! A page is cut in two passes over sled, both newest first:
//!
//! 1. **Plan** (before the headers): walk from the cursor, decoding and
//!    re-encoding one record at a time, counting rows and bytes, until
//!    `limit` rows or [`MAX_PAGE_BYTES`] would be exceeded. Only the first
//!    and last keys of the page and its size are kept. This gives the next
//!    cursor for the `X-Next-Cursor` and `Link` headers.
//! 2. **Stream**: the body walks exactly the keys from the first to the
//!    last of the plan again, in chunks of about [`CHUNK_BYTES`], each
//!    read by a short blocking task; no thread waits on a slow client, and
//!    at most one chunk per request is in memory.
//!
//! The cursor is the (hex-encoded) key of the last row of the page: the
//! next page starts strictly below it, so rows inserted meanwhile (newer,
//! higher keys) never shift a walk, and no row is sent twice.

use std::ops::Bound;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mapek_actors::model::{
    AnalysisResult, ApprovalStatus, PolicyExecution, PolicyOutcome, RemediationPolicy,
};
use mapek_actors::store::{KnowledgeStore, RecordList};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Rows per page when `limit` is not given.
pub const DEFAULT_PAGE_ROWS: usize = 50;

/// Most rows per page (`limit` is clamped to 1..=this).
pub const MAX_PAGE_ROWS: usize = 1000;

/// Most bytes of a page's body (4 MiB). A page holds at least one row, so a
/// single record larger than this is sent alone.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Room kept in [`MAX_PAGE_BYTES`] for the envelope (`{"analyses":[`,
/// `],"next":"…"}`).
const ENVELOPE_BYTES: usize = 1024;

/// Size at which a streamed chunk is handed to the connection.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Which list, with its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// Analyses.
    Analyses,
    /// Executions.
    Executions,
    /// Outcomes.
    Outcomes,
    /// Policies, optionally only those with one approval status.
    Policies(Option<ApprovalStatus>),
}

impl Listing {
    /// Key of the array in the body, as before pagination.
    pub fn key(self) -> &'static str {
        match self {
            Listing::Analyses => "analyses",
            Listing::Executions => "executions",
            Listing::Outcomes => "outcomes",
            Listing::Policies(_) => "policies",
        }
    }

    /// Path of the endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Listing::Analyses => "/api/v1/analyses",
            Listing::Executions => "/api/v1/executions",
            Listing::Outcomes => "/api/v1/outcomes",
            Listing::Policies(_) => "/api/v1/policies",
        }
    }

    fn list(self) -> RecordList {
        match self {
            Listing::Analyses => RecordList::Analyses,
            Listing::Executions => RecordList::Executions,
            Listing::Outcomes => RecordList::Outcomes,
            Listing::Policies(_) => RecordList::Policies,
        }
    }

    /// The row as sent (the stored record decoded and encoded again, so
    /// older records get today's defaults), or `None` when filtered out.
    fn row(self, key: &[u8], bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match self {
            Listing::Analyses => reencode::<AnalysisResult>(self, key, bytes).map(Some),
            Listing::Executions => reencode::<PolicyExecution>(self, key, bytes).map(Some),
            Listing::Outcomes => reencode::<PolicyOutcome>(self, key, bytes).map(Some),
            Listing::Policies(status) => {
                let p: RemediationPolicy = decode(self, key, bytes)?;
                if status.is_none_or(|s| p.approval_status == s) {
                    encode(&p).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }
}

fn decode<T: DeserializeOwned>(l: Listing, key: &[u8], bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "unreadable record `{}` in {}: {e}",
            String::from_utf8_lossy(key),
            l.key()
        )
    })
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("encoding a record: {e}"))
}

fn reencode<T: DeserializeOwned + Serialize>(
    l: Listing,
    key: &[u8],
    bytes: &[u8],
) -> Result<Vec<u8>, String> {
    encode(&decode::<T>(l, key, bytes)?)
}

/// The opaque cursor of a key (hex).
pub fn cursor_of(key: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(key.len() * 2);
    for b in key {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The key of a cursor given by a client, if well-formed.
pub fn parse_cursor(c: &str) -> Option<Vec<u8>> {
    if c.is_empty() || c.len() % 2 != 0 || c.len() > 2048 {
        return None;
    }
    (0..c.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(c.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What the first pass found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Key of the first (newest) row.
    first: Option<Vec<u8>>,
    /// Key of the last (oldest) row.
    last: Option<Vec<u8>>,
    rows: usize,
    /// Bytes of the rows with their separators.
    bytes: usize,
    /// Another row follows the page.
    more: bool,
}

fn plan(
    store: &KnowledgeStore,
    listing: Listing,
    cursor: Option<&[u8]>,
    limit: usize,
) -> Result<Plan, String> {
    let budget = MAX_PAGE_BYTES - ENVELOPE_BYTES;
    let mut p = Plan::default();
    let mut err = None;
    let upper = cursor.map_or(Bound::Unbounded, Bound::Excluded);
    store
        .scan_newest_first(
            listing.list(),
            upper,
            Bound::Unbounded,
            |k, v| match listing.row(k, v) {
                Err(e) => {
                    err = Some(e);
                    false
                }
                Ok(None) => true,
                Ok(Some(row)) => {
                    let add = row.len() + usize::from(p.rows > 0);
                    if p.rows >= limit || (p.rows > 0 && p.bytes + add > budget) {
                        p.more = true;
                        return false;
                    }
                    if p.first.is_none() {
                        p.first = Some(k.to_vec());
                    }
                    p.last = Some(k.to_vec());
                    p.rows += 1;
                    p.bytes += add;
                    true
                }
            },
        )
        .map_err(|e| e.to_string())?;
    match err {
        Some(e) => Err(e),
        None => Ok(p),
    }
}

/// One streamed chunk of rows.
struct Chunk {
    bytes: Vec<u8>,
    /// Key of the last record visited.
    last: Option<Vec<u8>>,
    /// Whether a row was written (so far, this chunk included).
    wrote: bool,
    /// The range is exhausted.
    done: bool,
}

fn chunk(
    store: &KnowledgeStore,
    listing: Listing,
    upper: Bound<&[u8]>,
    lower: &[u8],
    mut wrote: bool,
) -> Result<Chunk, String> {
    let mut out = Vec::new();
    let mut last = None;
    let mut err = None;
    let mut full = false;
    store
        .scan_newest_first(listing.list(), upper, Bound::Included(lower), |k, v| {
            last = Some(k.to_vec());
            match listing.row(k, v) {
                Err(e) => {
                    err = Some(e);
                    false
                }
                Ok(None) => true,
                Ok(Some(row)) => {
                    if wrote {
                        out.push(b',');
                    }
                    wrote = true;
                    out.extend_from_slice(&row);
                    full = out.len() >= CHUNK_BYTES;
                    !full
                }
            }
        })
        .map_err(|e| e.to_string())?;
    if let Some(e) = err {
        return Err(e);
    }
    Ok(Chunk {
        bytes: out,
        last,
        wrote,
        done: !full,
    })
}

/// State of a streamed body.
struct Streaming {
    store: KnowledgeStore,
    listing: Listing,
    /// Where the next chunk starts (the first row, then strictly below the
    /// last record read).
    upper: Bound<Vec<u8>>,
    /// The page's last row (inclusive).
    lower: Vec<u8>,
    wrote: bool,
    /// Written before the first chunk's rows.
    prefix: Option<Vec<u8>>,
    suffix: Vec<u8>,
}

fn envelope(listing: Listing, next: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let prefix = format!("{{\"{}\":[", listing.key()).into_bytes();
    let next = serde_json::to_string(&next).unwrap_or_else(|_| "null".into());
    let suffix = format!("],\"next\":{next}}}").into_bytes();
    (prefix, suffix)
}

/// Answers one page of `listing`: rows strictly below `cursor` (all when
/// `None`), newest first, at most `limit` rows and [`MAX_PAGE_BYTES`]
/// bytes; `link_query` is the query of the `Link` to the next page without
/// its cursor (such as `limit=50&`).
pub async fn respond(
    store: KnowledgeStore,
    listing: Listing,
    limit: usize,
    cursor: Option<Vec<u8>>,
    link_query: String,
) -> Response {
    let limit = limit.clamp(1, MAX_PAGE_ROWS);
    let st = store.clone();
    let planned =
        tokio::task::spawn_blocking(move || plan(&st, listing, cursor.as_deref(), limit)).await;
    let p = match planned {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return super::error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => {
            return super::error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("knowledge read failed: {e}"),
            )
        }
    };
    let next = if p.more {
        p.last.as_deref().map(cursor_of)
    } else {
        None
    };
    let (prefix, suffix) = envelope(listing, next.as_deref());
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(n) = &next {
        // Hex and the fixed query: always a valid header value.
        if let Ok(v) = HeaderValue::from_str(n) {
            headers.insert("x-next-cursor", v);
        }
        let link = format!("<{}?{link_query}cursor={n}>; rel=\"next\"", listing.path());
        if let Ok(v) = HeaderValue::from_str(&link) {
            headers.insert(header::LINK, v);
        }
    }
    let (Some(first), Some(last)) = (p.first, p.last) else {
        let mut body = prefix;
        body.extend_from_slice(&suffix);
        return (StatusCode::OK, headers, body).into_response();
    };
    let state = Streaming {
        store,
        listing,
        upper: Bound::Included(first),
        lower: last,
        wrote: false,
        prefix: Some(prefix),
        suffix,
    };
    let stream = futures::stream::unfold(Some(state), |st| async move {
        let mut st = st?;
        let (store, listing, upper, lower, wrote) = (
            st.store.clone(),
            st.listing,
            st.upper.clone(),
            st.lower.clone(),
            st.wrote,
        );
        let read = tokio::task::spawn_blocking(move || {
            chunk(
                &store,
                listing,
                upper.as_ref().map(Vec::as_slice),
                &lower,
                wrote,
            )
        })
        .await;
        let c = match read {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Some((Err(stream_error(e)), None)),
            Err(e) => return Some((Err(stream_error(e.to_string())), None)),
        };
        let mut buf = st.prefix.take().unwrap_or_default();
        buf.extend_from_slice(&c.bytes);
        st.wrote = c.wrote;
        if let Some(k) = c.last {
            st.upper = Bound::Excluded(k);
        }
        if c.done {
            buf.extend_from_slice(&st.suffix);
            Some((Ok(Bytes::from(buf)), None))
        } else {
            Some((Ok(Bytes::from(buf)), Some(st)))
        }
    });
    (StatusCode::OK, headers, Body::from_stream(stream)).into_response()
}

/// A failure after the headers were sent: the body is cut (the client sees
/// a truncated response, never a wrong one).
fn stream_error(e: String) -> std::io::Error {
    tracing::warn!(error = %e, "a paginated read failed while streaming");
    std::io::Error::other(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mapek_actors::model::new_id;
    use std::collections::HashSet;

    fn analysis(pad: usize) -> AnalysisResult {
        AnalysisResult {
            id: new_id("ana"),
            chain_id: "chn-test".into(),
            analyzed_at: chrono::Utc::now(),
            patterns: vec![],
            root_causes: vec![],
            recommendations: vec!["x".repeat(pad)],
            confidence: 0.5,
            violation_count: 1,
            max_severity: None,
            components: vec!["api".into()],
            incident_id: None,
        }
    }

    fn store() -> (tempfile::TempDir, KnowledgeStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = KnowledgeStore::open(dir.path(), std::time::Duration::from_secs(10)).expect("open");
        (dir, s)
    }

    struct Page {
        ids: Vec<String>,
        next: Option<String>,
        header: Option<String>,
        link: Option<String>,
        bytes: usize,
    }

    async fn get(s: &KnowledgeStore, limit: usize, cursor: Option<&str>) -> Page {
        let cursor = cursor.map(|c| parse_cursor(c).expect("cursor"));
        let r = respond(
            s.clone(),
            Listing::Analyses,
            limit,
            cursor,
            format!("limit={limit}&"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        let h = |n: &str| {
            r.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (header, link) = (h("x-next-cursor"), h("link"));
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let ids = v["analyses"]
            .as_array()
            .expect("array")
            .iter()
            .map(|a| a["id"].as_str().unwrap_or("").to_string())
            .collect();
        Page {
            ids,
            next: v["next"].as_str().map(str::to_string),
            header,
            link,
            bytes: body.len(),
        }
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let k = b"ana-0192abc";
        assert_eq!(parse_cursor(&cursor_of(k)).as_deref(), Some(&k[..]));
        for bad in ["", "abc", "zz", "0g", "ä0"] {
            assert_eq!(parse_cursor(bad), None, "{bad}");
        }
    }

    /// Pages walk every row that existed when the walk began exactly once,
    /// newest first, while other rows are inserted all along.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_walk_sees_every_row_once_while_rows_are_inserted() {
        let (_dir, s) = store();
        let mut before = Vec::new();
        for _ in 0..230 {
            let a = analysis(10);
            before.push(a.id.clone());
            s.put_analysis_async(&a).await.expect("put");
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (s, stop) = (s.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    s.put_analysis(&analysis(10)).expect("put");
                    n += 1;
                }
                n
            })
        };
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let p = get(&s, 17, cursor.as_deref()).await;
            assert_eq!(p.next, p.header, "body and header agree");
            if let Some(n) = &p.next {
                let link = p.link.expect("a Link with the next page");
                assert!(link.contains(&format!("cursor={n}")), "{link}");
                assert!(link.ends_with("; rel=\"next\""), "{link}");
                assert_eq!(p.ids.len(), 17);
            }
            seen.extend(p.ids);
            pages += 1;
            match p.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let inserted = writer.join().expect("writer");
        assert!(inserted > 0, "rows were inserted during the walk");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "no row twice");
        for id in &before {
            assert!(unique.contains(id), "{id} missed");
        }
        assert!(pages >= 230 / 17);
        // Newest first: the walk's ids are in descending key order.
        assert!(seen.windows(2).all(|w| w[0] > w[1]));
    }

    /// Large rows: a page stops before MAX_PAGE_BYTES, and a record larger
    /// than the cap is sent alone (the walk still progresses).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_are_capped_in_bytes() {
        let (_dir, s) = store();
        let mut all = Vec::new();
        for _ in 0..30 {
            let a = analysis(300 * 1024);
            all.push(a.id.clone());
            s.put_analysis_async(&a).await.expect("put");
        }
        let huge = analysis(MAX_PAGE_BYTES + 10);
        s.put_analysis_async(&huge).await.expect("put");
        let first = get(&s, 1000, None).await;
        assert_eq!(first.ids, vec![huge.id.clone()], "the huge one alone");
        assert!(first.next.is_some());
        let second = get(&s, 1000, first.next.as_deref()).await;
        // Full: one more row of ~300 KiB would not have fitted.
        assert!(second.bytes <= MAX_PAGE_BYTES, "{}", second.bytes);
        assert!(second.bytes + 300 * 1024 > MAX_PAGE_BYTES - ENVELOPE_BYTES);
        assert!(second.ids.len() >= 12, "{}", second.ids.len());
        let mut rest = second.ids;
        let mut next = second.next;
        while let Some(n) = next {
            let p = get(&s, 1000, Some(&n)).await;
            assert!(p.bytes <= MAX_PAGE_BYTES, "{}", p.bytes);
            rest.extend(p.ids);
            next = p.next;
        }
        rest.reverse();
        assert_eq!(rest, all);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_empty_list_and_a_filtered_one() {
        let (_dir, s) = store();
        let p = get(&s, 10, None).await;
        assert!(p.ids.is_empty() && p.next.is_none() && p.header.is_none());
        let r = respond(
            s.clone(),
            Listing::Policies(Some(ApprovalStatus::Pending)),
            10,
            None,
            String::new(),
        )
        .await;
        let body = axum::body::to_bytes(r.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(&body[..], br#"{"policies":[],"next":null}"#);
    }
}
