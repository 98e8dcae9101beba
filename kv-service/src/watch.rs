//! Watching keys: a [`Watcher`] reads the store's change log after its cursor whenever the
//! newest revision known here moves past it, so it has no queue of its own to overflow: a
//! watcher that falls behind reads the same log later, and one that fell behind the log's
//! history is told so (a `reset`, or the REST door ends it as lagged).
//!
//! Resuming is the same read from an older cursor: replay and live changes come from one log in
//! revision order, so there is no seam between them where a change could be missed or sent
//! twice, whichever replica made it (PostgreSQL writers commit in revision order, see
//! `store::postgres`).

use std::collections::VecDeque;

use crate::{
    core::{Kv, KvError},
    store::{Change, KeyFilter, KvStore, StoreError},
};

/// What a watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Change(Change),
    /// The changes after the asked revision are no longer all in the log (or that revision
    /// was never reached): the watcher goes on live from `current_revision`, and its caller
    /// should read the state again.
    Reset {
        oldest_revision: i64,
        current_revision: i64,
    },
}

/// A cursor over the change log, filtered by key.
pub struct Watcher {
    kv: Kv,
    filter: KeyFilter,
    /// Every change up to this revision has been reported (or skipped by a reset).
    cursor: i64,
    head: tokio::sync::watch::Receiver<i64>,
    pending: VecDeque<WatchEvent>,
}

impl Watcher {
    /// A watcher that reports the changes after `from`, or from now on without one. A `from`
    /// the log cannot continue from exactly gets a reset first.
    pub(crate) async fn start(
        kv: Kv,
        filter: KeyFilter,
        from: Option<i64>,
    ) -> Result<Watcher, KvError> {
        let head = kv.follow_head();
        let now = kv.store().head().await?;
        let mut pending = VecDeque::new();
        let cursor = match from {
            None => now.revision,
            Some(from) if (now.compacted..=now.revision).contains(&from) => from,
            Some(_) => {
                pending.push_back(WatchEvent::Reset {
                    oldest_revision: now.compacted + 1,
                    current_revision: now.revision,
                });
                now.revision
            }
        };
        let watcher = Watcher {
            kv,
            filter,
            cursor,
            head,
            pending,
        };
        watcher.note_head(now.revision);
        Ok(watcher)
    }

    /// The revision everything reported so far reaches: where a caller resumes from.
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// How many revisions the newest known one is ahead of what was reported.
    pub fn lag(&self) -> i64 {
        *self.head.borrow() - self.cursor
    }

    /// The next events, in revision order, waiting until there are some.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, KvError> {
        if !self.pending.is_empty() {
            return Ok(self.pending.drain(..).collect());
        }
        loop {
            let cursor = self.cursor;
            self.head
                .wait_for(|head| *head > cursor)
                .await
                .map_err(|_| StoreError::Closed)?;
            let page = self.kv.store().changes(cursor, &self.filter).await?;
            if cursor < page.compacted {
                let now = self.kv.store().head().await?;
                self.cursor = now.revision;
                return Ok(vec![WatchEvent::Reset {
                    oldest_revision: now.compacted + 1,
                    current_revision: now.revision,
                }]);
            }
            self.note_head(page.through);
            self.cursor = page.through.max(cursor);
            if !page.changes.is_empty() {
                return Ok(page.changes.into_iter().map(WatchEvent::Change).collect());
            }
        }
    }

    /// A revision read from the store is known here too (the background task may not have
    /// seen it yet).
    fn note_head(&self, revision: i64) {
        self.kv.note_revision(revision);
    }
}
