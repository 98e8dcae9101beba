//! Background work that keeps time: publishing scheduled notices when they are due and
//! enforcing the retention cap.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{service::NoticeService, store::NoticeStore};

/// The longest the scheduler sleeps without looking at the store: schedules made by other
/// instances sharing the database are only seen by polling, and this keeps them within 1 s.
const POLL: Duration = Duration::from_millis(500);
/// Pause after a store error, so a database outage does not become a busy loop.
const RETRY: Duration = Duration::from_secs(1);
/// How often notices beyond the retention cap are deleted.
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes scheduled notices at their time until `shutdown`. Due notices left from before a
/// restart are published at once on start.
pub async fn run_scheduler(service: NoticeService, shutdown: CancellationToken) {
    loop {
        let wait = match next_wait(&service).await {
            Ok(wait) => wait,
            Err(err) => {
                warn!(%err, "scheduler could not reach the store; retrying");
                RETRY
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = service.schedule_changed() => {}
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Publishes what is due and says how long to sleep before the next look.
async fn next_wait(service: &NoticeService) -> Result<Duration, crate::store::StoreError> {
    let published = service.publish_due().await?;
    if published > 0 {
        debug!(published, "published scheduled notices");
        // There may be more due than one batch took.
        return Ok(Duration::ZERO);
    }
    let Some(due) = service.store().next_due().await? else {
        return Ok(POLL);
    };
    let until_due = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
    // A notice due now that was not claimed was claimed by another instance in between.
    Ok(until_due.clamp(Duration::from_millis(1), POLL))
}

/// Deletes notices beyond the retention cap every second until `shutdown`.
pub async fn run_retention(service: NoticeService, shutdown: CancellationToken) {
    let retention = *service.retention();
    if retention.max_count.is_none() && retention.max_age.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match service.store().prune(&retention, Utc::now()).await {
            Ok(0) => {}
            Ok(pruned) => debug!(pruned, "pruned notices beyond the retention cap"),
            Err(err) => warn!(%err, "could not prune old notices"),
        }
    }
}
