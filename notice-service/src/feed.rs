//! One subscriber's ordered sequence of notices: the stored ones after its last id (replay),
//! then the live ones, with no gap and no duplicate even while notices are being published.
//!
//! The order of operations is what makes it exact: the live subscription exists before the
//! store is read. Every notice is stored before it is fanned out, and notices are fanned out in
//! id order, so a notice is either already visible to the replay read or arrives live later;
//! one that is both is recognised by its id (not above the last one sent) and skipped.
//!
//! A resume point the store cannot continue from exactly is never papered over: before the
//! first notice, [`resume_start`] says so with a [`Reset`] when retention deleted notices after
//! it (the replay then starts at the oldest kept one) or when it is above every id ever
//! published (the subscriber talked to another database; it then gets what is published from
//! now on instead of waiting for ids this store may never reach). That is read before the
//! subscription exists: the new start is then just another replay point, and the order above
//! still holds from it.

use std::{collections::VecDeque, sync::Arc};

use serde::Serialize;
use shared::service::StreamAddress;

use crate::{
    hub::{EndReason, Live, Subscription},
    notice::{Notice, OutgoingNotice},
    store::{NoticeBackend, NoticeQuery, NoticeStore, ResumePoint, Selector, StoreError},
};

/// What a subscriber whose resume point cannot be continued from exactly is told first (the
/// `reset` event): the oldest id it can still get and the highest id published so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Reset {
    pub oldest_id: i64,
    pub current_id: i64,
}

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

/// Where a subscription resuming after `after` starts its replay, and the reset it must be
/// told first, if any. Call it before subscribing: a start read afterwards could lie above a
/// notice already on its way live, which the feed would then skip as already sent.
pub async fn resume_start(
    store: &NoticeBackend,
    after: Option<i64>,
) -> Result<(Option<i64>, Option<Reset>), StoreError> {
    let Some(resume) = after.filter(|after| *after > 0) else {
        return Ok((after, None));
    };
    let bounds = store.id_bounds().await?;
    let reset = Reset {
        oldest_id: bounds.oldest_id(),
        current_id: bounds.current,
    };
    Ok(match bounds.resume_point(resume) {
        ResumePoint::Exact => (after, None),
        // The replay reads ids above `after`: exactly the kept ones.
        ResumePoint::TooOld => (after, Some(reset)),
        // The last committed id, not `current` (on PostgreSQL possibly a publish still
        // committing): a publish committing later has a larger id, so it is replayed or
        // arrives live, never skipped.
        ResumePoint::TooNew => (Some(store.last_id().await?), Some(reset)),
    })
}

pub struct Feed {
    subscription: Subscription,
    store: Arc<NoticeBackend>,
    /// `Some(id)` while stored notices after `id` may remain to be replayed.
    replay_after: Option<i64>,
    page: VecDeque<Notice>,
    last_sent: i64,
    /// Where the hub may send live notices itself once the replay is over (see
    /// [`Subscription::go_direct`]); `None` once it does, or if the caller takes no multicast.
    address: Option<StreamAddress>,
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
            address: None,
        }
    }

    /// Once the replay is over and everything live so far has been handed out, the hub sends
    /// this feed's notices to `address` itself: [`Feed::next`] then only says how it ended.
    pub fn go_direct_when_caught_up(&mut self, address: Option<StreamAddress>) {
        self.address = address;
    }

    pub fn subscription(&self) -> &Subscription {
        &self.subscription
    }

    /// The id of the last notice handed out (or the replay start), where a client resumes.
    pub fn last_sent(&self) -> i64 {
        self.last_sent.max(self.subscription.last_direct_id())
    }

    /// The next notice, replayed or live, or a live presence event. Presence is never
    /// replayed: it says who is here now.
    pub async fn next(&mut self) -> Result<Live, FeedEnd> {
        loop {
            if let Some(reason @ (EndReason::Kicked | EndReason::Shutdown)) =
                self.subscription.end_reason()
            {
                return Err(FeedEnd::Ended(reason));
            }
            if let Some(notice) = self.page.pop_front() {
                self.last_sent = notice.id;
                return Ok(Live::Notice(OutgoingNotice::new(notice)));
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
            if let Some(address) = &self.address {
                if self.subscription.go_direct(address, self.last_sent) {
                    self.address = None;
                }
            }
            match self.subscription.recv().await.map_err(FeedEnd::Ended)? {
                Live::Notice(notice) if notice.id <= self.last_sent => {}
                Live::Notice(notice) => {
                    self.last_sent = notice.id;
                    return Ok(Live::Notice(notice));
                }
                presence @ Live::Presence(_) => return Ok(presence),
            }
        }
    }
}
