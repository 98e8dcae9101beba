//! The in-memory store (`--store mem`): for development and tests. Nothing survives a restart,
//! and its memory is bounded by the retention caps when they are set, plus a fixed cap on
//! pending schedules.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use super::{NoticeQuery, Retention, Store, StoreError};
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
    /// Keyed by (due time in ms, arrival order) so equal times keep their order.
    scheduled: BTreeMap<(i64, u64), NewNotice>,
    scheduled_seq: u64,
}

impl MemoryState {
    fn push(&mut self, notice: NewNotice, created_at: DateTime<Utc>) -> Notice {
        self.last_id += 1;
        let notice = notice.stored(self.last_id, created_at);
        self.notices.push_back(notice.clone());
        notice
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> Result<Notice, StoreError> {
        Ok(self.state.lock().unwrap().push(notice, created_at))
    }

    async fn schedule(&self, notice: NewNotice, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut state = self.state.lock().unwrap();
        if state.scheduled.len() >= MAX_PENDING_SCHEDULED {
            return Err(StoreError::Full(format!(
                "{MAX_PENDING_SCHEDULED} notices are already scheduled"
            )));
        }
        state.scheduled_seq += 1;
        let key = (at.timestamp_millis(), state.scheduled_seq);
        state.scheduled.insert(key, notice);
        Ok(())
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let state = self.state.lock().unwrap();
        Ok(state
            .scheduled
            .keys()
            .next()
            .map(|(millis, _)| crate::notice::from_millis(*millis)))
    }

    async fn claim_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Notice>, StoreError> {
        let mut state = self.state.lock().unwrap();
        let now_millis = now.timestamp_millis();
        let mut claimed = Vec::new();
        while claimed.len() < limit as usize {
            match state.scheduled.first_key_value() {
                Some((&(due, _), _)) if due <= now_millis => {
                    let (_, notice) = state.scheduled.pop_first().expect("first key exists");
                    claimed.push(state.push(notice, now));
                }
                _ => break,
            }
        }
        Ok(claimed)
    }

    async fn query(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError> {
        let state = self.state.lock().unwrap();
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
        Ok(self.state.lock().unwrap().last_id)
    }

    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.state.lock().unwrap();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_conformance() {
        crate::store::conformance::run_all(&MemoryStore::default()).await;
    }
}
