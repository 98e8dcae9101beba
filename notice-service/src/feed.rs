//! One subscriber's ordered sequence of notices: the stored ones after its last id (replay),
//! then the live ones, with no gap and no duplicate even while notices are being published.
//!
//! The order of operations is what makes it exact: the live subscription exists before the
//! store is read. Every notice is stored before it is fanned out, and notices are fanned out in
//! id order, so a notice is either already visible to the replay read or arrives live later;
//! one that is both is recognised by its id (not above the last one sent) and skipped.

use std::{collections::VecDeque, sync::Arc};

use crate::{
    hub::{EndReason, Subscription},
    notice::{Notice, OutgoingNotice},
    store::{NoticeBackend, NoticeQuery, NoticeStore, Selector, StoreError},
};

/// Stored notices are replayed in pages of this size, so a long catch-up never loads the whole
/// history into memory.
pub const REPLAY_PAGE: u32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum FeedEnd {
    #[error("subscription ended: {0:?}")]
    Ended(EndReason),
    #[error("replay failed: {0}")]
    Store(#[from] StoreError),
}

pub struct Feed {
    subscription: Subscription,
    store: Arc<NoticeBackend>,
    /// `Some(id)` while stored notices after `id` may remain to be replayed.
    replay_after: Option<i64>,
    page: VecDeque<Notice>,
    last_sent: i64,
}

impl Feed {
    /// `subscription` must already be live; `after` asks for a replay of what followed that id.
    pub fn new(subscription: Subscription, store: Arc<NoticeBackend>, after: Option<i64>) -> Feed {
        Feed {
            subscription,
            store,
            replay_after: after,
            page: VecDeque::new(),
            last_sent: after.unwrap_or(0),
        }
    }

    pub fn subscription(&self) -> &Subscription {
        &self.subscription
    }

    /// The id of the last notice handed out (or the replay start), where a client resumes.
    pub fn last_sent(&self) -> i64 {
        self.last_sent
    }

    pub async fn next(&mut self) -> Result<Arc<OutgoingNotice>, FeedEnd> {
        loop {
            if let Some(reason @ (EndReason::Kicked | EndReason::Shutdown)) =
                self.subscription.end_reason()
            {
                return Err(FeedEnd::Ended(reason));
            }
            if let Some(notice) = self.page.pop_front() {
                self.last_sent = notice.id;
                return Ok(OutgoingNotice::new(notice));
            }
            if let Some(after) = self.replay_after {
                let interest = self.subscription.interest();
                let page = self
                    .store
                    .query(&NoticeQuery {
                        after,
                        limit: REPLAY_PAGE,
                        selector: Selector::Interest(interest.clone()),
                        // The same whispers the hub hands it live: those to its name.
                        whispers: interest.whispers(),
                    })
                    .await?;
                self.replay_after = match page.last() {
                    Some(last) if page.len() == REPLAY_PAGE as usize => Some(last.id),
                    _ => None,
                };
                self.page = page.into();
                continue;
            }
            let notice = self.subscription.recv().await.map_err(FeedEnd::Ended)?;
            if notice.id > self.last_sent {
                self.last_sent = notice.id;
                return Ok(notice);
            }
        }
    }
}
