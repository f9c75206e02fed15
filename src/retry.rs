//! Retry classification and jittered exponential backoff for HTTP clients.

use std::time::Duration;

/// An error, classified by whether a retry may help.
#[derive(Debug)]
pub enum Retry<E> {
    /// Connection errors, timeouts, 5xx: retry with backoff.
    Transient(E),
    /// 4xx, unintelligible answers: do not retry.
    Permanent(E),
}

/// Delay before retry `attempt` (1-based): exponential from `initial_ms`,
/// capped at `max_ms`, with equal jitter (half fixed, half random); the
/// same backoff the Executor uses.
pub fn backoff_delay(attempt: u32, initial_ms: u64, max_ms: u64) -> Duration {
    mapek_actors::execute::backoff_between(
        attempt,
        initial_ms,
        max_ms,
        mapek_actors::execute::jitter(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_stays_within_jitter_bounds() {
        for attempt in 1..=8 {
            let d = backoff_delay(attempt, 100, 1_000).as_millis() as u64;
            let base = (100u64 << (attempt - 1)).min(1_000);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d} ms outside {}..={base}",
                base / 2
            );
        }
    }
}
