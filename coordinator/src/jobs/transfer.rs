//! The idle limit of a job's transfers (`DATASAVER_TRANSFER_IDLE_TIMEOUT`):
//! an upload or download that moves no byte for that long fails its job the
//! way the deadline does — the agent is told to stop, nothing is stored, the
//! slot is free.
//!
//! The clock runs in a watchdog task, not in the stream: a download whose
//! agent stopped reading is never polled again (HTTP/2 flow control holds
//! tonic back), so a timer inside the stream would never fire.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Core;

/// When the idle clock starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At once (downloads: the coordinator sends from the first moment).
    Now,
    /// With the first item. Uploads: pg_dump writes nothing until it holds
    /// its table locks, and that wait is DATASAVER_LOCK_WAIT_TIMEOUT's (with
    /// a message naming the lock), not a stalled transfer.
    FirstItem,
}

/// The job error when a transfer stalls, naming the setting.
pub fn idle_message(idle: Duration) -> String {
    format!(
        "no data for {} (DATASAVER_TRANSFER_IDLE_TIMEOUT)",
        datasaver_common::config::format_duration(idle)
    )
}

/// `s`, one of job `job_id`'s transfers, watched: when no item passes for
/// DATASAVER_TRANSFER_IDLE_TIMEOUT (the agent sends nothing, stops reading,
/// or storage stalls) the job fails with [`idle_message`] and its agent is
/// told to stop; `s` ends with `on_idle`'s error the next time it is polled.
pub fn watch<S, T, E>(
    core: &Arc<Core>,
    job_id: &str,
    start: Start,
    s: S,
    on_idle: fn(String) -> E,
) -> impl Stream<Item = Result<T, E>> + Send + 'static
where
    S: Stream<Item = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static,
{
    let idle = core.policies.transfer_idle;
    let last = Arc::new(Mutex::new(match start {
        Start::Now => Some(Instant::now()),
        Start::FirstItem => None,
    }));
    let fired = CancellationToken::new();
    let done = CancellationToken::new();
    tokio::spawn(watchdog(
        core.clone(),
        job_id.to_string(),
        idle,
        last.clone(),
        fired.clone(),
        done.clone(),
    ));
    // Dropping the stream (the transfer ended, either way) ends the watchdog.
    let guard = done.drop_guard();
    let state = (Box::pin(s), fired, last, guard, false);
    futures::stream::unfold(
        state,
        move |(mut s, fired, last, guard, ended)| async move {
            if ended {
                return None;
            }
            tokio::select! {
                biased;
                _ = fired.cancelled() => Some((
                    Err(on_idle(idle_message(idle))),
                    (s, fired, last, guard, true),
                )),
                item = s.next() => {
                    let item = item?;
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    Some((item, (s, fired, last, guard, false)))
                }
            }
        },
    )
}

async fn watchdog(
    core: Arc<Core>,
    job_id: String,
    idle: Duration,
    last: Arc<Mutex<Option<Instant>>>,
    fired: CancellationToken,
    done: CancellationToken,
) {
    let seen = || *last.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        // Not started yet: look again one period later.
        let due = seen().unwrap_or_else(Instant::now) + idle;
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        if let Some(t) = seen() {
            if t.elapsed() >= idle {
                let message = idle_message(idle);
                tracing::warn!(job = %job_id, %message, "transfer stalled: failing the job");
                fired.cancel();
                super::time_out(&core, &job_id, &message);
                return;
            }
        }
    }
}
