//! The in-memory store (`--store mem`): for development and tests. Nothing survives a restart,
//! and its memory is bounded by the retention caps when they are set, plus a fixed cap on
//! pending schedules.
//!
//! A poisoned lock is used anyway, as everywhere in the service (see `hub`).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Mutex, MutexGuard, PoisonError},
};

use chrono::{DateTime, Utc};

use super::{IdBounds, NoticeQuery, NoticeStore, Retention, StoreError};
use crate::notice::{NewNotice, Notice};

/// Scheduled notices wait in memory here, so their number needs a cap of its own.
pub const MAX_PENDING_SCHEDULED: usize = 100_000;

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    last_id: i64,
    /// In id order, which makes `after` a binary search.
    notices: VecDeque<Notice>,
    scheduled: BTreeMap<DueKey, NewNotice>,
    scheduled_seq: u64,
}

/// Where a scheduled notice waits: by due time, then by arrival, so equal times keep their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct DueKey {
    due_millis: i64,
    arrival: u64,
}

impl MemoryState {
    fn push(&mut self, notice: NewNotice, created_at: DateTime<Utc>) -> Notice {
        self.last_id += 1;
        let notice = notice.stored(self.last_id, created_at);
        self.notices.push_back(notice.clone());
        notice
    }
}

impl MemoryStore {
    fn state(&self) -> MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl NoticeStore for MemoryStore {
    async fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> Result<Notice, StoreError> {
        Ok(self.state().push(notice, created_at))
    }

    async fn schedule(&self, notice: NewNotice, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut state = self.state();
        if state.scheduled.len() >= MAX_PENDING_SCHEDULED {
            return Err(StoreError::Full(format!(
                "{MAX_PENDING_SCHEDULED} notices are already scheduled"
            )));
        }
        state.scheduled_seq += 1;
        let key = DueKey {
            due_millis: at.timestamp_millis(),
            arrival: state.scheduled_seq,
        };
        state.scheduled.insert(key, notice);
        Ok(())
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let state = self.state();
        Ok(state
            .scheduled
            .keys()
            .next()
            .map(|key| crate::notice::from_millis(key.due_millis)))
    }

    async fn claim_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Notice>, StoreError> {
        let mut state = self.state();
        let now_millis = now.timestamp_millis();
        let mut claimed = Vec::new();
        while claimed.len() < limit as usize {
            match state.scheduled.first_key_value() {
                Some((key, _)) if key.due_millis <= now_millis => {
                    let (_, notice) = state.scheduled.pop_first().expect("first key exists");
                    claimed.push(state.push(notice, now));
                }
                _ => break,
            }
        }
        Ok(claimed)
    }

    async fn query(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError> {
        let state = self.state();
        let start = state.notices.partition_point(|n| n.id <= query.after);
        Ok(state
            .notices
            .range(start..)
            .filter(|notice| query.matches(notice))
            .take(query.limit as usize)
            .cloned()
            .collect())
    }

    async fn last_id(&self) -> Result<i64, StoreError> {
        Ok(self.state().last_id)
    }

    async fn id_bounds(&self) -> Result<IdBounds, StoreError> {
        let state = self.state();
        Ok(IdBounds {
            oldest_kept: state.notices.front().map(|n| n.id),
            current: state.last_id,
        })
    }

    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.state();
        let before = state.notices.len();
        if let Some(max) = retention.max_count {
            while state.notices.len() as u64 > max {
                state.notices.pop_front();
            }
        }
        if let Some(cutoff) = retention.age_cutoff(now) {
            while state.notices.front().is_some_and(|n| n.created_at < cutoff) {
                state.notices.pop_front();
            }
        }
        Ok((before - state.notices.len()) as u64)
    }
}
