//! Single-flight: one download per module, inside this process and across every process
//! sharing the cache directory.
//!
//! * In-process: concurrent gets with the same (URL, expected checksum, pull-secret hash) share
//!   one download task; callers with different credentials never share one (nor its result).
//!   The download runs on its own task, so a caller that gives up does not cancel it.
//! * Across processes: one lock file per download key (`locks/<key>.lock`, `flock`), held until
//!   the result is on disk; whoever takes the lock first checks the on-disk index for a result
//!   another process recorded meanwhile.
//!
//! The types and the lock live here; the cache (the only owner of the flights map) starts and
//! joins flights.

use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use tokio::time::Instant;

use super::error::{io_err, FetchError};
use super::options::Module;
use super::store::Store;

pub(super) type Flight = Shared<BoxFuture<'static, Result<Module, FetchError>>>;

/// A download under way: its end, and the module it announced it is growing, if any.
#[derive(Clone)]
pub(super) struct InFlight {
    pub done: Flight,
    pub announced: super::growing::Announced,
}
pub(super) type FlightKey = (String, Option<String>, Option<String>);

/// `now + d`, saturating far in the future instead of overflowing the clock.
pub(super) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Waits for the directory-wide lock of one download.
pub(super) async fn lock_download(
    store: &Store,
    key: &str,
    deadline: Instant,
    shown: &str,
) -> Result<std::fs::File, FetchError> {
    let budget = deadline.saturating_duration_since(Instant::now());
    loop {
        let (store, k) = (store.clone(), key.to_owned());
        let attempt = tokio::task::spawn_blocking(move || store.try_lock_download(&k))
            .await
            .unwrap_or_else(|e| Err(format!("lock task failed: {e}")));
        match attempt {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(reason) => return Err(io_err(shown, reason)),
        }
        if Instant::now() >= deadline {
            return Err(FetchError::Timeout {
                url: shown.to_owned(),
                timeout: budget,
                stage: "waiting for another process downloading the same module",
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
