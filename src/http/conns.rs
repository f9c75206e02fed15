//! The cap on concurrent connections (`api.max_connections`).
//!
//! Every accepted connection is in one of three phases: it has not yet
//! delivered a complete request head (`no head`: new, or a client that
//! sends half a header and waits), it has requests in progress (`busy`:
//! its handler runs or its response is being written), or it waits idle
//! between keep-alive requests (`idle`). At the cap, a new connection
//! closes the oldest connection without a head; if there is none, the
//! oldest idle one; if there is none, the connection busy for the longest
//! time, if that is longer than `overdue_after` (a response stuck on a
//! client that does not read it); otherwise the new one is refused.
//! The phases are kept in ordered sets (by accept order, or by the start
//! of the busy spell), so each step costs O(log n), whatever the number of
//! connections.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

/// `{reason}` of a shed connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// `no_request_head`, `idle`, `overdue` or `refused`.
    pub reason: &'static str,
}

/// Why a connection was shed at the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// An open connection that had not sent a complete request head was
    /// closed to admit a new one.
    NoRequestHead,
    /// An idle keep-alive connection was closed to admit a new one.
    Idle,
    /// A connection busy with one request for longer than allowed (such
    /// as a response its client does not read) was closed to admit a new
    /// one.
    Overdue,
    /// The new connection was refused: every open one was busy.
    Refused,
}

impl ShedReason {
    /// Every reason.
    pub const ALL: [ShedReason; 4] = [
        ShedReason::NoRequestHead,
        ShedReason::Idle,
        ShedReason::Overdue,
        ShedReason::Refused,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::NoRequestHead => "no_request_head",
            ShedReason::Idle => "idle",
            ShedReason::Overdue => "overdue",
            ShedReason::Refused => "refused",
        }
    }
}

/// Metrics of the HTTP server. Cheap to share (`Arc<HttpMetrics>`).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Connections open now.
    pub connections: Gauge,
    /// Connections shed at the cap, by reason.
    pub connections_shed: Family<ShedLabels, Counter>,
    /// Requests answered 503 because they took longer than
    /// `api.request_timeout_seconds`.
    pub requests_timed_out: Counter,
}

impl HttpMetrics {
    /// Every series exists (at zero) from the start.
    pub fn new() -> HttpMetrics {
        let m = HttpMetrics::default();
        for r in ShedReason::ALL {
            m.connections_shed
                .get_or_create(&ShedLabels { reason: r.as_str() })
                .inc_by(0);
        }
        m
    }

    /// Registers every metric under its documented name.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mape_k_http_connections",
            "HTTP connections open now",
            self.connections.clone(),
        );
        r.register(
            "mape_k_http_connections_shed",
            "HTTP connections closed or refused at the api.max_connections cap, by reason",
            self.connections_shed.clone(),
        );
        r.register(
            "mape_k_http_requests_timed_out",
            "HTTP requests answered 503 after api.request_timeout_seconds",
            self.requests_timed_out.clone(),
        );
    }

    fn shed(&self, reason: ShedReason) {
        self.connections_shed
            .get_or_create(&ShedLabels {
                reason: reason.as_str(),
            })
            .inc();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NoHead,
    /// Requests in progress, since the start of the busy spell (its
    /// sequence number orders the `busy` set).
    Busy {
        requests: u32,
        seq: u64,
        since: Instant,
    },
    Idle,
}

#[derive(Debug)]
struct Conn {
    phase: Phase,
    /// Closes the connection (its task selects on the receiver).
    close: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct Table {
    conns: HashMap<u64, Conn>,
    no_head: BTreeSet<u64>,
    idle: BTreeSet<u64>,
    /// `(seq, id)` of the busy connections, oldest busy spell first.
    busy: BTreeSet<(u64, u64)>,
    next_id: u64,
    next_seq: u64,
}

impl Table {
    fn set_phase(&mut self, id: u64, phase: Phase) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match c.phase {
            Phase::NoHead => {
                self.no_head.remove(&id);
            }
            Phase::Idle => {
                self.idle.remove(&id);
            }
            Phase::Busy { seq, .. } => {
                self.busy.remove(&(seq, id));
            }
        }
        c.phase = phase;
        match phase {
            Phase::NoHead => {
                self.no_head.insert(id);
            }
            Phase::Idle => {
                self.idle.insert(id);
            }
            Phase::Busy { seq, .. } => {
                self.busy.insert((seq, id));
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Conn> {
        let c = self.conns.remove(&id)?;
        self.no_head.remove(&id);
        self.idle.remove(&id);
        if let Phase::Busy { seq, .. } = c.phase {
            self.busy.remove(&(seq, id));
        }
        Some(c)
    }

    /// The connection to close at the cap, if any may be.
    fn victim(&self, overdue_after: Duration) -> Option<(u64, ShedReason)> {
        if let Some(id) = self.no_head.first() {
            return Some((*id, ShedReason::NoRequestHead));
        }
        if let Some(id) = self.idle.first() {
            return Some((*id, ShedReason::Idle));
        }
        let (_, id) = self.busy.first()?;
        match self.conns.get(id)?.phase {
            Phase::Busy { since, .. } if since.elapsed() > overdue_after => {
                Some((*id, ShedReason::Overdue))
            }
            _ => None,
        }
    }
}

/// The open connections, with the cap.
#[derive(Debug)]
pub struct Connections {
    max: usize,
    overdue_after: Duration,
    table: Mutex<Table>,
    metrics: Arc<HttpMetrics>,
}

/// What [`Connections::admit`] gives an admitted connection.
#[derive(Debug)]
pub struct Admitted {
    /// Removes the connection from the table when dropped.
    pub guard: ConnGuard,
    /// Resolves when the connection must be closed to admit another.
    pub close: oneshot::Receiver<()>,
}

impl Connections {
    /// A table admitting at most `max` connections (at least one); at the
    /// cap, a connection busy for longer than `overdue_after` may be
    /// closed.
    pub fn new(max: usize, overdue_after: Duration, metrics: Arc<HttpMetrics>) -> Arc<Connections> {
        Arc::new(Connections {
            max: max.max(1),
            overdue_after,
            table: Mutex::new(Table::default()),
            metrics,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent whatever panicked while holding it
        // (each step is a few set operations).
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection, closing another at the cap (see the
    /// module documentation); `None`: refused.
    pub fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut t = self.lock();
        if t.conns.len() >= self.max {
            match t.victim(self.overdue_after) {
                Some((id, reason)) => {
                    if let Some(c) = t.remove(id) {
                        // The receiver may be gone already (the task is
                        // ending): nothing to close then.
                        let _ = c.close.send(());
                    }
                    self.metrics.shed(reason);
                }
                None => {
                    self.metrics.shed(ShedReason::Refused);
                    return None;
                }
            }
        }
        let id = t.next_id;
        t.next_id += 1;
        let (tx, rx) = oneshot::channel();
        t.conns.insert(
            id,
            Conn {
                phase: Phase::NoHead,
                close: tx,
            },
        );
        t.no_head.insert(id);
        self.metrics.connections.set(t.conns.len() as i64);
        drop(t);
        Some(Admitted {
            guard: ConnGuard {
                id,
                conns: self.clone(),
            },
            close: rx,
        })
    }

    /// A complete request head arrived on connection `id`: it is busy
    /// until the returned guard (held by the response body) is dropped.
    pub fn request_started(self: &Arc<Self>, id: u64) -> InFlight {
        let mut t = self.lock();
        let phase = match t.conns.get(&id).map(|c| c.phase) {
            Some(Phase::Busy {
                requests,
                seq,
                since,
            }) => Phase::Busy {
                requests: requests.saturating_add(1),
                seq,
                since,
            },
            _ => {
                t.next_seq += 1;
                Phase::Busy {
                    requests: 1,
                    seq: t.next_seq,
                    since: Instant::now(),
                }
            }
        };
        t.set_phase(id, phase);
        InFlight {
            id,
            conns: self.clone(),
        }
    }

    fn request_finished(&self, id: u64) {
        let mut t = self.lock();
        let phase = match t.conns.get(&id).map(|c| c.phase) {
            Some(Phase::Busy {
                requests,
                seq,
                since,
            }) if requests > 1 => Phase::Busy {
                requests: requests - 1,
                seq,
                since,
            },
            Some(_) => Phase::Idle,
            None => return,
        };
        t.set_phase(id, phase);
    }

    fn closed(&self, id: u64) {
        let mut t = self.lock();
        if t.remove(id).is_some() {
            self.metrics.connections.set(t.conns.len() as i64);
        }
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps a connection in the table; dropped when its task ends.
#[derive(Debug)]
pub struct ConnGuard {
    id: u64,
    conns: Arc<Connections>,
}

impl ConnGuard {
    /// The connection's number (accept order).
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conns.closed(self.id);
    }
}

/// A request in progress on a connection (see
/// [`Connections::request_started`]).
#[derive(Debug)]
pub struct InFlight {
    id: u64,
    conns: Arc<Connections>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conns.request_finished(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shed(m: &HttpMetrics, r: ShedReason) -> u64 {
        m.connections_shed
            .get_or_create(&ShedLabels { reason: r.as_str() })
            .get()
    }

    #[test]
    fn at_the_cap_the_oldest_without_a_head_goes_first_then_the_oldest_idle_then_the_new_one() {
        let m = Arc::new(HttpMetrics::new());
        let conns = Connections::new(3, Duration::from_secs(3600), m.clone());
        let mut a = conns.admit().expect("a");
        let mut b = conns.admit().expect("b");
        let c = conns.admit().expect("c");
        assert_eq!(m.connections.get(), 3);
        // a and b finish a request each: idle; c has no head yet.
        drop(conns.request_started(a.guard.id()));
        drop(conns.request_started(b.guard.id()));
        let d = conns.admit().expect("d closes c (no head)");
        assert!(c.close.blocking_recv().is_ok(), "c is told to close");
        drop(c.guard);
        assert_eq!(shed(&m, ShedReason::NoRequestHead), 1);
        assert_eq!(conns.len(), 3);
        // d gets busy; now the oldest idle one (a) goes.
        let busy_d = conns.request_started(d.guard.id());
        let e = conns.admit().expect("e closes a (idle)");
        assert!(a.close.try_recv().is_ok());
        assert!(b.close.try_recv().is_err(), "b stays");
        assert_eq!(shed(&m, ShedReason::Idle), 1);
        // b, d, e all busy: the next one is refused.
        let busy_b = conns.request_started(b.guard.id());
        let busy_e = conns.request_started(e.guard.id());
        assert!(conns.admit().is_none());
        assert_eq!(shed(&m, ShedReason::Refused), 1);
        // A finished request makes its connection idle, so sheddable.
        drop(busy_e);
        assert!(conns.admit().is_some());
        assert_eq!(shed(&m, ShedReason::Idle), 2, "e (idle) went");
        drop((busy_b, busy_d, a.guard));
        assert_eq!(m.connections.get(), 2, "b and d");
    }

    #[test]
    fn at_the_cap_a_connection_busy_for_too_long_goes_before_the_new_one_is_refused() {
        let m = Arc::new(HttpMetrics::new());
        let conns = Connections::new(2, Duration::ZERO, m.clone());
        let mut a = conns.admit().expect("a");
        let b = conns.admit().expect("b");
        let _busy_a = conns.request_started(a.guard.id());
        let _busy_b = conns.request_started(b.guard.id());
        // Both busy for longer than zero (let the monotonic clock move):
        // the oldest busy spell (a) goes.
        std::thread::sleep(Duration::from_millis(2));
        let _c = conns.admit().expect("c closes a (overdue)");
        assert!(a.close.try_recv().is_ok());
        assert_eq!(shed(&m, ShedReason::Overdue), 1);
        assert_eq!(shed(&m, ShedReason::Refused), 0);
        assert_eq!(conns.len(), 2);
    }

    #[test]
    fn http2_streams_keep_a_connection_busy_until_the_last_ends() {
        let m = Arc::new(HttpMetrics::new());
        let conns = Connections::new(1, Duration::from_secs(3600), m.clone());
        let a = conns.admit().expect("a");
        let s1 = conns.request_started(a.guard.id());
        let s2 = conns.request_started(a.guard.id());
        drop(s1);
        assert!(conns.admit().is_none(), "still busy with s2");
        drop(s2);
        assert!(conns.admit().is_some(), "idle now");
        assert!(conns.is_empty(), "a was shed, the newcomer dropped");
        drop(a.guard);
        assert_eq!(m.connections.get(), 0);
    }
}
