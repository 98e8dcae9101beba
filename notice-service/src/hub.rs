//! The fan-out hub: the live subscribers of this instance and the routing of each published
//! notice to the ones entitled to it.
//!
//! Publishing never waits for a subscriber. Each subscriber has a bounded buffer; when a notice
//! finds it full, that subscriber is removed at once and told it lagged (it resumes from its
//! last id with a new subscription), so one slow reader can neither hold up the others nor make
//! memory grow. The hub lock is a std mutex held only for map updates and `try_send`s, never
//! across an await.
//!
//! A subscription whose caller takes multicast packets (the gateway's) skips its buffer once
//! its feed has caught up: the hub then queues each notice itself, as one packet for all such
//! subscriptions of a connection (`shared::service::multicast`), so publishing to thousands of
//! them costs a packet per connection, not a task wake-up and a packet each. A connection whose
//! queue is full is the same as a full buffer for each of them: they end lagged.
//!
//! A poisoned lock is used anyway (`unwrap_or_else(PoisonError::into_inner)`), the policy of every
//! std mutex in the workspace's services: the sections holding one only update maps and offer to
//! channels, calls that leave each collection whole, so a panic elsewhere in a task cannot leave
//! them half-updated, and refusing the lock would turn one failed request into failing them all.
//!
//! Presence is counted per name and topic: a name that has several subscriptions to a topic
//! (several browser tabs) is present once, from its first subscription to its last. On a single
//! instance the hub announces those changes itself, as `join` and `leave` events to the
//! subscriptions that asked for presence; in a cluster the changes of every instance meet in
//! PostgreSQL, which decides them once for all (see `cluster`), and the hub only relays them.

use std::{
    borrow::Cow,
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
    },
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use shared::{
    service::{multicast, Event, StreamAddress},
    RawParams,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::notice::{format_time, Interest, OutgoingNotice};

/// Why a subscription ended from the service's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its buffer overflowed: it missed notices and should resume from its last id.
    Lagged,
    /// `DELETE /notices/subscribers/{name}` asked for it.
    Kicked,
    /// The service is shutting down.
    Shutdown,
}

impl EndReason {
    /// The SSE event name of the final event a stream gets.
    pub fn event_name(self) -> &'static str {
        match self {
            EndReason::Lagged => "lagged",
            EndReason::Kicked => "kicked",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// One subscriber as presence shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriberInfo {
    pub name: Option<String>,
    pub topics: Vec<String>,
    #[serde(serialize_with = "serialize_time")]
    pub since: DateTime<Utc>,
}

fn serialize_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

/// How a subscription holds its name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NameClaim {
    /// A name the caller is entitled to (its token's subject, or taken by an admin): any number
    /// of subscriptions share it.
    #[default]
    Entitled,
    /// A name chosen freely by a caller without a token: it is unique among live subscribers,
    /// except to the subscriptions that present the same `client` id (the tabs of one browser).
    Chosen { client: Option<String> },
}

impl NameClaim {
    /// Whether a new subscription claiming a name this way may join `holder`, which has it.
    pub fn may_share_with(&self, holder: &NameClaim) -> bool {
        match (self, holder) {
            (NameClaim::Entitled, _) => true,
            (
                NameClaim::Chosen { client: Some(mine) },
                NameClaim::Chosen {
                    client: Some(theirs),
                },
            ) => mine == theirs,
            (NameClaim::Chosen { .. }, _) => false,
        }
    }
}

/// What a subscription is besides what it receives: whether it hears presence and how it holds
/// its name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// Receive `join`/`leave` events for its topics.
    pub presence: bool,
    pub claim: NameClaim,
}

/// One subscriber of this instance, with the id its presence rows are kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSubscriber {
    pub id: u64,
    pub info: SubscriberInfo,
    pub claim: NameClaim,
}

/// Presence changes, for whoever mirrors this instance's presence elsewhere (the PostgreSQL
/// presence table).
#[derive(Debug, Clone)]
pub enum PresenceChange {
    Joined(LocalSubscriber),
    /// The id of a subscriber that left.
    Left(u64),
}

/// Whether a name arrived on a topic or left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    Join,
    Leave,
}

impl PresenceKind {
    /// The event name a stream gets it under.
    pub fn event_name(self) -> &'static str {
        match self {
            PresenceKind::Join => "join",
            PresenceKind::Leave => "leave",
        }
    }
}

/// A name arriving on a topic (its first subscription to it) or leaving it (its last one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEvent {
    pub kind: PresenceKind,
    pub name: String,
    pub topic: String,
    pub at: DateTime<Utc>,
}

impl PresenceEvent {
    /// The event's data as streams carry it.
    pub fn data(&self) -> Value {
        json!({"name": self.name, "topic": self.topic, "at": format_time(&self.at)})
    }
}

/// What a subscription receives live.
#[derive(Debug, Clone)]
pub enum Live {
    Notice(Arc<OutgoingNotice>),
    Presence(Arc<PresenceEvent>),
}

impl Live {
    /// The event a stream carries it as. Presence has no id: it is not part of the sequence a
    /// client resumes from.
    pub fn event(&self) -> Event<Cow<'_, RawParams>> {
        match self {
            Live::Notice(notice) => Event {
                id: Some(notice.id.into()),
                event: Some("notice".into()),
                data: Cow::Borrowed(&notice.json),
            },
            Live::Presence(presence) => Event {
                id: None,
                event: Some(presence.kind.event_name().into()),
                data: Cow::Owned(
                    RawParams::to_raw(&presence.data()).expect("presence always serializes"),
                ),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("too many subscribers ({0}), try again later")]
    Full(usize),
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error(
        "the name {0:?} is in use by another client; reconnecting tabs of one client send the \
         same client id (client=...)"
    )]
    NameTaken(String),
}

/// How a subscription learns it was ended, even while it is busy writing to its client.
#[derive(Default)]
struct Ending {
    reason: OnceLock<EndReason>,
    token: CancellationToken,
    /// The last notice the hub sent a direct subscription itself, set when it is removed: where
    /// its client resumes.
    last_direct_id: AtomicI64,
}

impl Ending {
    fn end(&self, reason: EndReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

struct Entry {
    info: SubscriberInfo,
    membership: Membership,
    sender: mpsc::Sender<Live>,
    ending: Arc<Ending>,
    /// Set once the subscription's task has caught up (see [`Subscription::go_direct`]).
    direct: Option<Direct>,
}

/// A subscription the hub sends to itself, multicast with the others of its connection,
/// instead of through its task.
struct Direct {
    address: StreamAddress,
    /// The last notice id its stream got: a notice not above it (stored before the task's
    /// replay read it, fanned out only now) was sent already.
    last_sent: AtomicI64,
}

#[derive(Default)]
struct HubState {
    next_id: u64,
    shut_down: bool,
    /// Single instance: the hub announces presence changes itself.
    announces_presence: bool,
    subscribers: HashMap<u64, Entry>,
    by_topic: HashMap<String, HashSet<u64>>,
    by_name: HashMap<String, HashSet<u64>>,
    /// The subscriptions that asked for presence events, by topic.
    presence_by_topic: HashMap<String, HashSet<u64>>,
}

/// What a locked section changed, to report once the lock is released.
#[derive(Default)]
struct Changes {
    delivery: Delivery,
    presence: Vec<PresenceChange>,
}

impl HubState {
    fn insert(&mut self, id: u64, entry: Entry, changes: &mut Changes) {
        let before = self.topics_of(entry.info.name.as_deref());
        for topic in &entry.info.topics {
            self.by_topic.entry(topic.clone()).or_default().insert(id);
            if entry.membership.presence {
                let ids = self.presence_by_topic.entry(topic.clone()).or_default();
                ids.insert(id);
            }
        }
        if let Some(name) = &entry.info.name {
            self.by_name.entry(name.clone()).or_default().insert(id);
        }
        let name = entry.info.name.clone();
        changes
            .presence
            .push(PresenceChange::Joined(LocalSubscriber {
                id,
                info: entry.info.clone(),
                claim: entry.membership.claim.clone(),
            }));
        self.subscribers.insert(id, entry);
        crate::metrics::count_subscribers(1);
        for lagged in self.announce_difference(name.as_deref(), &before, changes) {
            self.remove(lagged, Some(EndReason::Lagged), changes);
        }
    }

    /// Removes the subscription (ending it for `reason`, if any) and whatever lagged on the
    /// presence events its leaving caused.
    fn remove(&mut self, id: u64, reason: Option<EndReason>, changes: &mut Changes) {
        let mut pending = vec![(id, reason)];
        while let Some((id, reason)) = pending.pop() {
            let Some(present) = self.subscribers.get(&id) else {
                continue;
            };
            let before = self.topics_of(present.info.name.as_deref());
            let entry = self.subscribers.remove(&id).expect("just found");
            crate::metrics::count_subscribers(-1);
            if let Some(direct) = &entry.direct {
                let last_sent = direct.last_sent.load(Ordering::Relaxed);
                entry
                    .ending
                    .last_direct_id
                    .store(last_sent, Ordering::Relaxed);
            }
            let name = entry.info.name.as_deref();
            for topic in &entry.info.topics {
                remove_from_index(&mut self.by_topic, topic, id);
                remove_from_index(&mut self.presence_by_topic, topic, id);
            }
            if let Some(name) = name {
                remove_from_index(&mut self.by_name, name, id);
            }
            if let Some(reason) = reason {
                entry.ending.end(reason);
            }
            changes.presence.push(PresenceChange::Left(id));
            let lagged = self.announce_difference(name, &before, changes);
            pending.extend(lagged.into_iter().map(|id| (id, Some(EndReason::Lagged))));
        }
    }

    /// The topics on which `name` is present (has at least one subscription).
    fn topics_of(&self, name: Option<&str>) -> BTreeSet<String> {
        let Some(ids) = name.and_then(|name| self.by_name.get(name)) else {
            return BTreeSet::new();
        };
        ids.iter()
            .flat_map(|id| self.subscribers[id].info.topics.iter().cloned())
            .collect()
    }

    /// On a single instance, tells the presence subscribers how `name`'s presence changed since
    /// it was `before`; returns the subscriptions that lagged on it (not yet removed).
    fn announce_difference(
        &mut self,
        name: Option<&str>,
        before: &BTreeSet<String>,
        changes: &mut Changes,
    ) -> Vec<u64> {
        let Some(name) = name.filter(|_| self.announces_presence) else {
            return Vec::new();
        };
        let after = self.topics_of(Some(name));
        let at = Utc::now();
        let event = |kind, topic: &String| {
            Arc::new(PresenceEvent {
                kind,
                name: name.to_string(),
                topic: topic.clone(),
                at,
            })
        };
        let events: Vec<Arc<PresenceEvent>> = before
            .difference(&after)
            .map(|topic| event(PresenceKind::Leave, topic))
            .chain(
                after
                    .difference(before)
                    .map(|topic| event(PresenceKind::Join, topic)),
            )
            .collect();
        let mut lagged = Vec::new();
        for event in events {
            lagged.extend(self.offer_presence(event, &mut changes.delivery));
        }
        lagged
    }

    /// Hands a presence event to the subscriptions of its topic that asked for presence;
    /// returns those that lagged.
    fn offer_presence(&self, event: Arc<PresenceEvent>, delivery: &mut Delivery) -> Vec<u64> {
        let ids = self
            .presence_by_topic
            .get(&event.topic)
            .into_iter()
            .flatten();
        self.offer(ids, &Live::Presence(event), delivery)
    }

    /// Hands `item` to the subscriptions `ids`: through the task of each one still catching
    /// up, and multicast to the direct ones. Returns those that lagged (not yet removed): a full
    /// buffer, or a connection whose queue was full.
    fn offer<'a>(
        &self,
        ids: impl Iterator<Item = &'a u64>,
        item: &Live,
        delivery: &mut Delivery,
    ) -> Vec<u64> {
        let notice_id = match item {
            Live::Notice(notice) => Some(notice.id),
            Live::Presence(_) => None,
        };
        let mut lagged = Vec::new();
        let mut direct = Vec::new();
        for id in ids {
            let entry = &self.subscribers[id];
            if let Some(to) = &entry.direct {
                if notice_id.is_none_or(|notice| notice > to.last_sent.load(Ordering::Relaxed)) {
                    direct.push((*id, to));
                }
                continue;
            }
            match entry.sender.try_send(item.clone()) {
                Ok(()) => delivery.delivered += 1,
                // Closed means the subscription is being dropped right now; its guard removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(_)) => lagged.push(*id),
            }
        }
        if !direct.is_empty() {
            let missed = multicast(
                direct.iter().map(|(id, to)| (*id, &to.address)),
                &item.event(),
            );
            delivery.delivered += direct.len() - missed.len();
            if let Some(notice_id) = notice_id {
                let missed: HashSet<u64> = missed.iter().copied().collect();
                for (id, to) in &direct {
                    if !missed.contains(id) {
                        to.last_sent.store(notice_id, Ordering::Relaxed);
                    }
                }
            }
            lagged.extend(missed);
        }
        delivery.lagged += lagged.len();
        lagged
    }

    /// Whether a new subscription claiming `name` this way may have it.
    fn name_free_for(&self, name: &str, claim: &NameClaim) -> bool {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .all(|id| claim.may_share_with(&self.subscribers[id].membership.claim))
    }
}

fn remove_from_index(index: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

struct HubShared {
    state: Mutex<HubState>,
    buffer: usize,
    max_subscribers: usize,
    observer: Option<mpsc::UnboundedSender<PresenceChange>>,
}

/// A cheap-to-clone handle to the hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<HubShared>,
}

/// What one publish did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: usize,
    pub lagged: usize,
}

impl Hub {
    /// `buffer` is each subscriber's queue length; `observer` hears every join and leave of a
    /// subscription. Without an observer the hub is the whole service and announces presence
    /// events itself; with one (a cluster) they come back through [`Hub::announce`].
    pub fn new(
        buffer: usize,
        max_subscribers: usize,
        observer: Option<mpsc::UnboundedSender<PresenceChange>>,
    ) -> Hub {
        Hub {
            shared: Arc::new(HubShared {
                state: Mutex::new(HubState {
                    announces_presence: observer.is_none(),
                    ..HubState::default()
                }),
                buffer: buffer.max(1),
                max_subscribers,
                observer,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, HubState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `section` under the lock, then reports the presence changes it made.
    fn change<T>(&self, section: impl FnOnce(&mut HubState, &mut Changes) -> T) -> (T, Delivery) {
        let mut changes = Changes::default();
        let result = section(&mut self.state(), &mut changes);
        if let Some(observer) = &self.shared.observer {
            for change in changes.presence {
                let _ = observer.send(change);
            }
        }
        (result, changes.delivery)
    }

    pub fn subscribe(&self, interest: Interest) -> Result<Subscription, SubscribeError> {
        self.subscribe_with(interest, Membership::default())
    }

    pub fn subscribe_with(
        &self,
        interest: Interest,
        membership: Membership,
    ) -> Result<Subscription, SubscribeError> {
        let (sender, receiver) = mpsc::channel(self.shared.buffer);
        let ending = Arc::new(Ending::default());
        let entry = Entry {
            info: SubscriberInfo {
                name: interest.name.clone(),
                topics: interest.topics.clone(),
                since: Utc::now(),
            },
            membership,
            sender,
            ending: ending.clone(),
            direct: None,
        };
        let (id, _) = self.change(|state, changes| {
            if state.shut_down {
                return Err(SubscribeError::ShuttingDown);
            }
            if state.subscribers.len() >= self.shared.max_subscribers {
                return Err(SubscribeError::Full(self.shared.max_subscribers));
            }
            if let Some(name) = &entry.info.name {
                if !state.name_free_for(name, &entry.membership.claim) {
                    return Err(SubscribeError::NameTaken(name.clone()));
                }
            }
            state.next_id += 1;
            let id = state.next_id;
            state.insert(id, entry, changes);
            Ok(id)
        });
        Ok(Subscription {
            id: id?,
            hub: self.clone(),
            receiver,
            ending,
            interest,
        })
    }

    /// Whether a subscription claiming `name` this way would get it here now.
    pub fn name_free_for(&self, name: &str, claim: &NameClaim) -> bool {
        self.state().name_free_for(name, claim)
    }

    /// Hands a notice to every subscriber entitled to it, in the order notices are published.
    pub fn publish(&self, notice: Arc<OutgoingNotice>) -> Delivery {
        let ((), delivery) = self.change(|state, changes| {
            // The same audience rule as `Interest::wants`, through the indexes: a whisper goes
            // only to the subscriptions named after its addressee (the `Whispers` rule).
            let ids: Box<dyn Iterator<Item = &u64>> = match (&notice.to, &notice.topic) {
                (Some(to), _) => Box::new(state.by_name.get(to).into_iter().flatten()),
                (None, Some(topic)) => Box::new(state.by_topic.get(topic).into_iter().flatten()),
                (None, None) => Box::new(state.subscribers.keys()),
            };
            let lagged = state.offer(ids, &Live::Notice(notice), &mut changes.delivery);
            for id in lagged {
                state.remove(id, Some(EndReason::Lagged), changes);
            }
        });
        crate::metrics::count_fan_out(delivery.delivered, delivery.lagged);
        delivery
    }

    /// Hands a presence event decided elsewhere (by the cluster) to this instance's presence
    /// subscribers of its topic.
    pub fn announce(&self, event: PresenceEvent) -> Delivery {
        self.change(|state, changes| {
            let lagged = state.offer_presence(Arc::new(event), &mut changes.delivery);
            for id in lagged {
                state.remove(id, Some(EndReason::Lagged), changes);
            }
        })
        .1
    }

    /// Ends every subscription with this name; returns how many there were.
    pub fn kick(&self, name: &str) -> usize {
        self.change(|state, changes| {
            let ids: Vec<u64> = state
                .by_name
                .get(name)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            for id in &ids {
                state.remove(*id, Some(EndReason::Kicked), changes);
            }
            ids.len()
        })
        .0
    }

    /// Gives every subscription named `from` the name `to`: whispers to `to` reach them from
    /// now on, and presence sees `from` leave and `to` join. Returns how many there were.
    pub fn rename(&self, from: &str, to: &str) -> usize {
        self.change(|state, changes| {
            let ids: Vec<u64> = state
                .by_name
                .get(from)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            if ids.is_empty() || from == to {
                return ids.len();
            }
            let before_from = state.topics_of(Some(from));
            let before_to = state.topics_of(Some(to));
            for id in &ids {
                remove_from_index(&mut state.by_name, from, *id);
                state.by_name.entry(to.to_string()).or_default().insert(*id);
                let entry = state.subscribers.get_mut(id).expect("indexed");
                entry.info.name = Some(to.to_string());
                changes.presence.push(PresenceChange::Left(*id));
                changes
                    .presence
                    .push(PresenceChange::Joined(LocalSubscriber {
                        id: *id,
                        info: entry.info.clone(),
                        claim: entry.membership.claim.clone(),
                    }));
            }
            let mut lagged = state.announce_difference(Some(from), &before_from, changes);
            lagged.extend(state.announce_difference(Some(to), &before_to, changes));
            for id in lagged {
                state.remove(id, Some(EndReason::Lagged), changes);
            }
            ids.len()
        })
        .0
    }

    /// Ends every subscription and refuses new ones.
    pub fn shut_down(&self) {
        self.change(|state, changes| {
            state.shut_down = true;
            let ids: Vec<u64> = state.subscribers.keys().copied().collect();
            for id in ids {
                state.remove(id, Some(EndReason::Shutdown), changes);
            }
        });
    }

    /// Who is subscribed here now, oldest first.
    pub fn presence(&self) -> Vec<LocalSubscriber> {
        let state = self.state();
        let mut all: Vec<LocalSubscriber> = state
            .subscribers
            .iter()
            .map(|(id, entry)| LocalSubscriber {
                id: *id,
                info: entry.info.clone(),
                claim: entry.membership.claim.clone(),
            })
            .collect();
        all.sort_by_key(|present| present.id);
        all
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state().subscribers.len()
    }

    fn unsubscribe(&self, id: u64) {
        self.change(|state, changes| state.remove(id, None, changes));
    }
}

/// One live subscription. Dropping it (the client went away, the stream handler's future was
/// dropped) removes it from the hub and from presence at once.
pub struct Subscription {
    id: u64,
    hub: Hub,
    receiver: mpsc::Receiver<Live>,
    ending: Arc<Ending>,
    interest: Interest,
}

impl Subscription {
    pub fn interest(&self) -> &Interest {
        &self.interest
    }

    /// The reason this subscription was ended by the service, if it was.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.ending.reason.get().copied()
    }

    /// Resolves once the service ended this subscription (lagged, kicked, shutdown).
    pub async fn ended(&self) -> EndReason {
        self.ending.token.cancelled().await;
        self.end_reason().unwrap_or(EndReason::Shutdown)
    }

    /// From now on, lets the hub send this subscription's live notices and presence events
    /// to `address` itself, multicast with the other direct subscriptions of its connection,
    /// rather than wake this subscription's task for each. `last_sent` is the last notice id
    /// its stream got. Only once the task has queued everything it received: refused (false)
    /// while its buffer holds anything, since a notice multicast now would overtake those.
    /// [`Subscription::recv`] then only tells how the subscription ended.
    pub fn go_direct(&self, address: &StreamAddress, last_sent: i64) -> bool {
        // First without the hub's lock: while the task is still catching up, the answer is
        // known without making publishers wait.
        if !self.receiver.is_empty() {
            return false;
        }
        let mut state = self.hub.state();
        // Offers are made under this lock, so the buffer cannot fill between check and switch.
        let Some(entry) = state.subscribers.get_mut(&self.id) else {
            return false;
        };
        if !self.receiver.is_empty() {
            return false;
        }
        entry.direct = Some(Direct {
            address: address.clone(),
            last_sent: AtomicI64::new(last_sent),
        });
        true
    }

    /// The last notice id the hub sent this subscription directly, once it has ended; 0 if it
    /// never did.
    pub fn last_direct_id(&self) -> i64 {
        self.ending.last_direct_id.load(Ordering::Relaxed)
    }

    /// The next live notice or presence event. A kicked or shut-down subscription stops at
    /// once; a lagged one first hands out what its buffer still holds, so the client resumes
    /// from a later id.
    pub async fn recv(&mut self) -> Result<Live, EndReason> {
        if let Some(reason @ (EndReason::Kicked | EndReason::Shutdown)) = self.end_reason() {
            return Err(reason);
        }
        match self.receiver.recv().await {
            Some(live) => Ok(live),
            None => Err(self.end_reason().unwrap_or(EndReason::Shutdown)),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notice::NewNotice;

    fn notice(id: i64, topic: Option<&str>, to: Option<&str>) -> Arc<OutgoingNotice> {
        OutgoingNotice::new(
            NewNotice {
                message: format!("n{id}"),
                topic: topic.map(Into::into),
                to: to.map(Into::into),
                from: None,
            }
            .stored(id, Utc::now()),
        )
    }

    fn interest(name: Option<&str>, topics: &[&str]) -> Interest {
        Interest {
            name: name.map(Into::into),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn notice_id(live: Live) -> i64 {
        match live {
            Live::Notice(notice) => notice.id,
            other => panic!("expected a notice, got {other:?}"),
        }
    }

    fn stream_request(key: u64) -> shared::Packet {
        shared::Packet {
            key,
            ..shared::Packet::request("GET", "/notices/stream", Value::Null)
        }
    }

    /// A stream address on a connection of its own, whose queue holds `room` frames.
    fn address(key: u64, room: usize) -> (StreamAddress, mpsc::Receiver<bytes::Bytes>) {
        let (outgoing, frames) = mpsc::channel(room);
        (StreamAddress::new(&stream_request(key), outgoing), frames)
    }

    /// The frames queued on a connection right now, decoded.
    fn frames(queue: &mut mpsc::Receiver<bytes::Bytes>) -> Vec<shared::Packet> {
        let mut codec = shared::codec::PacketCodec::<shared::Packet>::new();
        let mut packets = Vec::new();
        while let Ok(frame) = queue.try_recv() {
            let mut bytes = bytes::BytesMut::from(&frame[..]);
            use tokio_util::codec::Decoder;
            packets.push(codec.decode(&mut bytes).unwrap().unwrap());
        }
        packets
    }

    #[test]
    fn direct_subscriptions_of_one_connection_get_one_packet_per_notice() {
        let hub = Hub::new(8, 100, None);
        let (outgoing, mut queue) = mpsc::channel(8);
        let first = StreamAddress::new(&stream_request(11), outgoing.clone());
        let second = StreamAddress::new(&stream_request(12), outgoing);
        let mut a = hub.subscribe(interest(None, &["room"])).unwrap();
        let mut b = hub.subscribe(interest(None, &["room"])).unwrap();
        let mut elsewhere = hub.subscribe(interest(None, &["other"])).unwrap();
        assert!(a.go_direct(&first, 0));
        assert!(b.go_direct(&second, 0));

        let delivery = hub.publish(notice(1, Some("room"), None));
        assert_eq!(delivery.delivered, 2);
        let packets = frames(&mut queue);
        assert_eq!(packets.len(), 1, "{packets:?}");
        let mut keys = packets[0].keys.clone();
        keys.sort();
        assert_eq!(keys, [11, 12]);
        assert_eq!(packets[0].id, Some(json!(1)));
        assert_eq!(packets[0].event.as_deref(), Some("notice"));
        assert_eq!(packets[0].params["message"], "n1");
        assert!(a.receiver.try_recv().is_err(), "the task is not woken");
        assert!(b.receiver.try_recv().is_err());
        assert!(elsewhere.receiver.try_recv().is_err(), "not its topic");
    }

    #[test]
    fn going_direct_waits_for_the_buffer_and_skips_what_the_replay_sent() {
        let hub = Hub::new(8, 100, None);
        let (to, mut queue) = address(7, 8);
        let mut sub = hub.subscribe(everyone_interest()).unwrap();
        hub.publish(notice(1, None, None));
        assert!(!sub.go_direct(&to, 0), "a notice is still buffered");
        assert_eq!(notice_id(sub.receiver.try_recv().unwrap()), 1);
        // The replay already sent notice 3 (stored before its fan-out came).
        assert!(sub.go_direct(&to, 3));
        for id in 2..=4 {
            hub.publish(notice(id, None, None));
        }
        let ids: Vec<_> = frames(&mut queue).into_iter().map(|p| p.id).collect();
        assert_eq!(ids, [Some(json!(4))]);
    }

    #[test]
    fn a_direct_subscription_whose_connection_is_full_ends_lagged_at_its_last_notice() {
        let hub = Hub::new(8, 100, None);
        let (to, mut queue) = address(7, 2);
        let mut sub = hub.subscribe(everyone_interest()).unwrap();
        assert!(sub.go_direct(&to, 0));
        for id in 1..=3 {
            hub.publish(notice(id, None, None));
        }
        assert_eq!(sub.end_reason(), Some(EndReason::Lagged));
        assert_eq!(
            sub.last_direct_id(),
            2,
            "the client resumes after the last queued"
        );
        assert_eq!(frames(&mut queue).len(), 2);
        assert!(matches!(
            sub.receiver.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    fn everyone_interest() -> Interest {
        interest(None, &[])
    }

    /// The presence events a subscription has buffered right now, as "join alice@room".
    fn presence_events(sub: &mut Subscription) -> Vec<String> {
        let mut events = Vec::new();
        while let Ok(live) = sub.receiver.try_recv() {
            if let Live::Presence(event) = live {
                events.push(format!(
                    "{} {}@{}",
                    event.kind.event_name(),
                    event.name,
                    event.topic
                ));
            }
        }
        events
    }

    fn watcher(hub: &Hub, topics: &[&str]) -> Subscription {
        let membership = Membership {
            presence: true,
            ..Membership::default()
        };
        hub.subscribe_with(interest(None, topics), membership)
            .unwrap()
    }

    fn chosen(client: Option<&str>) -> Membership {
        Membership {
            presence: false,
            claim: NameClaim::Chosen {
                client: client.map(Into::into),
            },
        }
    }

    /// Everything a subscription has buffered right now.
    fn drain(sub: &mut Subscription) -> Vec<i64> {
        let mut ids = Vec::new();
        while let Ok(live) = sub.receiver.try_recv() {
            if let Live::Notice(n) = live {
                ids.push(n.id);
            }
        }
        ids
    }

    #[test]
    fn notices_reach_exactly_their_audience() {
        let hub = Hub::new(16, 100, None);
        let mut alice = hub.subscribe(interest(Some("alice"), &["room"])).unwrap();
        let mut bob = hub.subscribe(interest(Some("bob"), &["other"])).unwrap();
        let mut anon = hub.subscribe(interest(None, &[])).unwrap();
        hub.publish(notice(1, None, None));
        hub.publish(notice(2, Some("room"), None));
        hub.publish(notice(3, Some("other"), None));
        hub.publish(notice(4, None, Some("alice")));
        hub.publish(notice(5, Some("room"), Some("bob")));
        hub.publish(notice(6, Some("nobody"), None));
        assert_eq!(drain(&mut alice), [1, 2, 4]);
        assert_eq!(drain(&mut bob), [1, 3, 5]);
        assert_eq!(drain(&mut anon), [1]);
    }

    #[tokio::test]
    async fn a_full_buffer_ends_only_that_subscriber() {
        let (observer, mut changes) = mpsc::unbounded_channel();
        let hub = Hub::new(2, 100, Some(observer));
        let mut slow = hub.subscribe(interest(None, &[])).unwrap();
        let mut fast = hub.subscribe(interest(None, &[])).unwrap();
        for id in 1..=5 {
            let delivery = hub.publish(notice(id, None, None));
            assert_eq!(notice_id(fast.recv().await.unwrap()), id);
            if id == 3 {
                assert_eq!(delivery.lagged, 1);
            }
        }
        assert_eq!(hub.len(), 1, "the slow one is gone from presence");
        // The slow one still gets what it had buffered, then the lagged end.
        assert_eq!(notice_id(slow.recv().await.unwrap()), 1);
        assert_eq!(notice_id(slow.recv().await.unwrap()), 2);
        assert_eq!(slow.recv().await.unwrap_err(), EndReason::Lagged);
        let mut left = 0;
        while let Ok(change) = changes.try_recv() {
            if matches!(change, PresenceChange::Left(_)) {
                left += 1;
            }
        }
        assert_eq!(left, 1);
    }

    #[tokio::test]
    async fn kick_ends_every_subscription_of_a_name_at_once() {
        let hub = Hub::new(8, 100, None);
        let mut first = hub.subscribe(interest(Some("alice"), &[])).unwrap();
        let second = hub.subscribe(interest(Some("alice"), &["t"])).unwrap();
        let _bob = hub.subscribe(interest(Some("bob"), &[])).unwrap();
        hub.publish(notice(1, None, None));
        assert_eq!(hub.kick("alice"), 2);
        assert_eq!(hub.kick("alice"), 0);
        assert_eq!(hub.kick("nobody"), 0);
        // Kicked wins over what is still buffered.
        assert_eq!(first.recv().await.unwrap_err(), EndReason::Kicked);
        assert_eq!(second.ended().await, EndReason::Kicked);
        let names: Vec<_> = hub
            .presence()
            .into_iter()
            .map(|present| present.info.name)
            .collect();
        assert_eq!(names, [Some("bob".to_string())]);
    }

    #[test]
    fn dropping_a_subscription_frees_it() {
        let (observer, mut changes) = mpsc::unbounded_channel();
        let hub = Hub::new(8, 100, Some(observer));
        let sub = hub.subscribe(interest(Some("alice"), &["t"])).unwrap();
        assert_eq!(hub.len(), 1);
        drop(sub);
        assert_eq!(hub.len(), 0);
        let state = hub.state();
        assert!(state.by_topic.is_empty() && state.by_name.is_empty());
        drop(state);
        assert!(matches!(changes.try_recv(), Ok(PresenceChange::Joined(..))));
        assert!(matches!(changes.try_recv(), Ok(PresenceChange::Left(_))));
    }

    #[test]
    fn subscriber_cap_and_shutdown_refuse_new_subscriptions() {
        let hub = Hub::new(8, 1, None);
        let first = hub.subscribe(interest(None, &[])).unwrap();
        assert_eq!(
            hub.subscribe(interest(None, &[])).err(),
            Some(SubscribeError::Full(1))
        );
        hub.shut_down();
        assert_eq!(first.end_reason(), Some(EndReason::Shutdown));
        assert_eq!(
            hub.subscribe(interest(None, &[])).err(),
            Some(SubscribeError::ShuttingDown)
        );
    }

    #[test]
    fn a_name_joins_with_its_first_tab_and_leaves_with_its_last() {
        let hub = Hub::new(16, 100, None);
        let mut watching = watcher(&hub, &["room", "hall"]);
        let first = hub.subscribe(interest(Some("alice"), &["room"])).unwrap();
        let second = hub
            .subscribe(interest(Some("alice"), &["room", "hall"]))
            .unwrap();
        let _other_topic = hub
            .subscribe(interest(Some("bob"), &["elsewhere"]))
            .unwrap();
        let _anonymous = hub.subscribe(interest(None, &["room"])).unwrap();
        assert_eq!(
            presence_events(&mut watching),
            ["join alice@room", "join alice@hall"]
        );
        drop(second);
        assert_eq!(presence_events(&mut watching), ["leave alice@hall"]);
        drop(first);
        assert_eq!(presence_events(&mut watching), ["leave alice@room"]);
    }

    #[test]
    fn presence_reaches_only_the_subscriptions_that_asked_for_it_on_that_topic() {
        let hub = Hub::new(16, 100, None);
        let mut on_room = watcher(&hub, &["room"]);
        let mut on_hall = watcher(&hub, &["hall"]);
        let mut not_asking = hub.subscribe(interest(None, &["room"])).unwrap();
        let alice = hub.subscribe(interest(Some("alice"), &["room"])).unwrap();
        hub.kick("alice");
        drop(alice);
        assert_eq!(
            presence_events(&mut on_room),
            ["join alice@room", "leave alice@room"]
        );
        assert!(presence_events(&mut on_hall).is_empty());
        assert!(presence_events(&mut not_asking).is_empty());
    }

    #[test]
    fn a_chosen_name_is_unique_except_to_the_same_client() {
        let hub = Hub::new(16, 100, None);
        let tab = hub
            .subscribe_with(interest(Some("ann"), &[]), chosen(Some("c1")))
            .unwrap();
        let _second_tab = hub
            .subscribe_with(interest(Some("ann"), &[]), chosen(Some("c1")))
            .unwrap();
        for other in [chosen(Some("c2")), chosen(None)] {
            assert_eq!(
                hub.subscribe_with(interest(Some("ann"), &[]), other).err(),
                Some(SubscribeError::NameTaken("ann".into()))
            );
        }
        // Without a client id a chosen name cannot be shared, not even by a second stream.
        let _lone = hub
            .subscribe_with(interest(Some("lone"), &[]), chosen(None))
            .unwrap();
        assert!(hub
            .subscribe_with(interest(Some("lone"), &[]), chosen(None))
            .is_err());
        // An entitled name (a token's subject) is not bound by it.
        assert!(hub.subscribe(interest(Some("ann"), &[])).is_ok());
        drop(tab);
    }

    #[test]
    fn rename_moves_whispers_and_presence_to_the_new_name() {
        let hub = Hub::new(16, 100, None);
        let mut watching = watcher(&hub, &["room"]);
        let mut alice = hub.subscribe(interest(Some("alice"), &["room"])).unwrap();
        let _alice_tab = hub.subscribe(interest(Some("alice"), &["room"])).unwrap();
        presence_events(&mut watching);
        assert_eq!(hub.rename("alice", "ally"), 2);
        assert_eq!(hub.rename("alice", "ally"), 0);
        assert_eq!(
            presence_events(&mut watching),
            ["leave alice@room", "join ally@room"]
        );
        hub.publish(notice(1, None, Some("alice")));
        hub.publish(notice(2, None, Some("ally")));
        assert_eq!(drain(&mut alice), [2]);
        let names: Vec<_> = hub.presence().into_iter().map(|p| p.info.name).collect();
        assert_eq!(names, [None, Some("ally".into()), Some("ally".into())]);
    }

    #[tokio::test]
    async fn a_presence_watcher_that_lags_is_ended_like_any_other() {
        let hub = Hub::new(2, 100, None);
        let watching = watcher(&hub, &["room"]);
        let _subscribers: Vec<_> = (0..3)
            .map(|i| {
                hub.subscribe(interest(Some(&format!("n{i}")), &["room"]))
                    .unwrap()
            })
            .collect();
        assert_eq!(watching.ended().await, EndReason::Lagged);
    }
}
