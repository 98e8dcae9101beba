//! Several instances on one PostgreSQL database behaving as one service.
//!
//! Fan-out: every publish commits a `NOTIFY notice_published` (see `store::postgres`). Each
//! instance LISTENs, and on a notification reads the notices after the last id it fanned out
//! and hands them to its own hub. PostgreSQL delivers notifications in commit order and
//! publishers commit in id order, so reading "everything after my last id" never skips one and
//! never repeats one: each notice reaches each instance's subscribers exactly once. The same
//! read also runs every second, which covers notifications lost while the listening connection
//! was being re-established.
//!
//! Presence: each instance mirrors its hub's subscribers into `notice_subscribers` and keeps a
//! heartbeat in `notice_instances`. Presence lists this instance's hub plus the rows of the
//! other instances whose heartbeat is fresh; an instance that died without cleaning up is
//! deleted (its subscribers cascade) by the others once its heartbeat is `STALE_AFTER` (15 s)
//! old.
//!
//! Presence events: every change to the rows (subscribers arriving, leaving, renamed, an
//! instance stopping or found dead) runs in one transaction that first takes an advisory lock,
//! reads which (name, topic) pairs are present among the names it touches, changes the rows,
//! reads them again, and records the difference as `join`/`leave` rows in
//! `notice_presence_events`, then `NOTIFY notice_presence`. Under the lock, changes are decided
//! one at a time against every instance's rows, so a name with tabs on two instances joins once
//! and leaves once; the events' ids commit in order, so each instance fans them out like
//! notices: everything after the last one it read, exactly once.
//!
//! Kick and rename: the instance that receives one applies it to its own subscribers, counts
//! the other instances' subscribers of that name, and tells them with `NOTIFY notice_kick` or
//! `NOTIFY notice_rename`.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::{postgres::PgListener, PgPool, Postgres, Row, Transaction};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    hub::{
        Hub, LocalSubscriber, NameClaim, PresenceChange, PresenceEvent, PresenceKind,
        SubscriberInfo,
    },
    notice::{from_millis, OutgoingNotice, Whispers},
    store::{NoticeBackend, NoticeQuery, NoticeStore, Selector, StoreError, PUBLISHED_CHANNEL},
};

/// NOTIFY channel asking the other instances to kick a name.
const KICK_CHANNEL: &str = "notice_kick";
/// NOTIFY channel asking the other instances to rename a name's subscribers.
const RENAME_CHANNEL: &str = "notice_rename";
/// NOTIFY channel announcing new rows in `notice_presence_events`.
const PRESENCE_CHANNEL: &str = "notice_presence";
/// The advisory lock every presence change takes (any fixed number; "notice" in ASCII).
const PRESENCE_LOCK: i64 = 0x6e6f_7469_6365;
/// How long presence events are kept: far longer than any instance takes to read them.
const PRESENCE_EVENTS_KEPT: Duration = Duration::from_secs(600);
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// An instance whose heartbeat is older than this no longer counts as present.
const STALE_AFTER: Duration = Duration::from_secs(15);
/// How often an instance reads new notices even without a notification.
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);
/// Notices read per catch-up query.
const FAN_OUT_BATCH: u32 = 1000;

#[derive(Serialize, Deserialize)]
struct KickMessage {
    name: String,
    origin: String,
}

#[derive(Serialize, Deserialize)]
struct RenameMessage {
    from: String,
    to: String,
    origin: String,
}

/// A subscriber of another instance as `notice_subscribers` keeps it: topics as a JSON array,
/// `since` in Unix milliseconds.
#[derive(sqlx::FromRow)]
struct PresenceRow {
    name: Option<String>,
    topics: String,
    since: i64,
}

/// This instance's membership in the cluster.
#[derive(Clone)]
pub struct Cluster {
    pool: PgPool,
    instance_id: String,
}

impl Cluster {
    /// Registers this instance, starts listening, and notes the last notice already stored.
    /// Every notice after that one is fanned out by [`run_fan_out`]; every notice up to it is
    /// already visible to a subscriber's replay. Both happen here, before the service accepts
    /// a subscriber: noted later, the notices committed in between would reach nobody live.
    pub async fn join(
        pool: PgPool,
        store: &NoticeBackend,
    ) -> Result<(Cluster, ClusterListener), StoreError> {
        let instance_id = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT INTO notice_instances (instance_id) VALUES ($1)")
            .bind(&instance_id)
            .execute(&pool)
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener
            .listen_all([
                PUBLISHED_CHANNEL,
                KICK_CHANNEL,
                RENAME_CHANNEL,
                PRESENCE_CHANNEL,
            ])
            .await?;
        // Read after LISTEN: a notice or event committed in between is both announced and above.
        let last_fanned_out = store.last_id().await?;
        let (last_presence_event,): (i64,) =
            sqlx::query_as("SELECT coalesce(max(id), 0) FROM notice_presence_events")
                .fetch_one(&pool)
                .await?;
        info!(instance = %instance_id, "joined the notice cluster");
        let cluster = Cluster { pool, instance_id };
        let listener = ClusterListener {
            listener,
            last_fanned_out,
            last_presence_event,
        };
        Ok((cluster, listener))
    }

    /// Subscribers of the other live instances.
    pub async fn remote_presence(&self) -> Result<Vec<SubscriberInfo>, StoreError> {
        let rows: Vec<PresenceRow> = sqlx::query_as(
            "SELECT s.name, s.topics, s.since FROM notice_subscribers s
             JOIN notice_instances i ON i.instance_id = s.instance_id
             WHERE s.instance_id <> $1 AND i.heartbeat_at > now() - make_interval(secs => $2)",
        )
        .bind(&self.instance_id)
        .bind(STALE_AFTER.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| SubscriberInfo {
                name: row.name,
                topics: serde_json::from_str(&row.topics).unwrap_or_default(),
                since: from_millis(row.since),
            })
            .collect())
    }

    /// How the other live instances' subscribers hold `name`.
    async fn remote_claims(&self, name: &str) -> Result<Vec<NameClaim>, StoreError> {
        let rows: Vec<(bool, Option<String>)> = sqlx::query_as(
            "SELECT s.chosen, s.client FROM notice_subscribers s
             JOIN notice_instances i ON i.instance_id = s.instance_id
             WHERE s.name = $1 AND s.instance_id <> $2
               AND i.heartbeat_at > now() - make_interval(secs => $3)",
        )
        .bind(name)
        .bind(&self.instance_id)
        .bind(STALE_AFTER.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(chosen, client)| match chosen {
                true => NameClaim::Chosen { client },
                false => NameClaim::Entitled,
            })
            .collect())
    }

    /// Whether a subscriber of another instance holds `name` in a way `claim` may not share.
    /// (Two instances checking the same new name at the same moment can both find it free:
    /// the check is as exact as one instance's only when the claims are a moment apart.)
    pub async fn name_taken(&self, name: &str, claim: &NameClaim) -> Result<bool, StoreError> {
        let holders = self.remote_claims(name).await?;
        Ok(holders.iter().any(|holder| !claim.may_share_with(holder)))
    }

    /// Asks the other instances to kick `name`; returns how many subscribers they have by it.
    pub async fn kick_remote(&self, name: &str) -> Result<usize, StoreError> {
        let message = KickMessage {
            name: name.to_string(),
            origin: self.instance_id.clone(),
        };
        self.tell_holders(name, KICK_CHANNEL, &message).await
    }

    /// Asks the other instances to rename `from`'s subscribers to `to`; returns how many
    /// subscribers they have by `from`.
    pub async fn rename_remote(&self, from: &str, to: &str) -> Result<usize, StoreError> {
        let message = RenameMessage {
            from: from.to_string(),
            to: to.to_string(),
            origin: self.instance_id.clone(),
        };
        self.tell_holders(from, RENAME_CHANNEL, &message).await
    }

    /// Sends `message` on `channel` when other instances have subscribers named `name`;
    /// returns how many they have.
    async fn tell_holders(
        &self,
        name: &str,
        channel: &str,
        message: &impl Serialize,
    ) -> Result<usize, StoreError> {
        let count = self.remote_claims(name).await?.len();
        if count > 0 {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(serde_json::to_string(message).expect("strings serialize"))
                .execute(&self.pool)
                .await?;
        }
        Ok(count)
    }

    /// Removes this instance (and so its presence rows) on a clean shutdown.
    async fn leave(&self) {
        if let Err(err) = self.remove_instances(InstanceSet::This).await {
            warn!(%err, "could not remove this instance from presence");
        }
    }

    /// Deletes this instance or the stale ones, with the leave events of their subscribers.
    async fn remove_instances(&self, which: InstanceSet) -> Result<(), StoreError> {
        let condition = match which {
            InstanceSet::This => "instance_id = $1::text",
            InstanceSet::Stale => "heartbeat_at < now() - make_interval(secs => $1::float8)",
        };
        let bind = |query| match which {
            InstanceSet::This => sqlx::query(query).bind(self.instance_id.clone()),
            InstanceSet::Stale => sqlx::query(query).bind(STALE_AFTER.as_secs_f64()),
        };
        let mut change = PresenceTransaction::begin(&self.pool).await?;
        let select = format!(
            "SELECT DISTINCT name FROM notice_subscribers WHERE name IS NOT NULL
               AND instance_id IN (SELECT instance_id FROM notice_instances WHERE {condition})"
        );
        let names = bind(&select).fetch_all(&mut *change.tx).await?;
        change
            .touching(names.iter().map(|row| row.get::<String, _>(0)))
            .await?;
        let delete = format!("DELETE FROM notice_instances WHERE {condition}");
        let deleted = bind(&delete).execute(&mut *change.tx).await?;
        if which == InstanceSet::Stale && deleted.rows_affected() > 0 {
            info!(
                instances = deleted.rows_affected(),
                "removed instances whose heartbeat stopped; their subscribers left"
            );
        }
        change.commit().await
    }

    /// Refreshes the heartbeat, recreating the row if others deleted it as stale; returns
    /// whether it had to be recreated (the presence rows went with it).
    async fn heartbeat(&self) -> Result<bool, StoreError> {
        let (recreated,): (bool,) = sqlx::query_as(
            "INSERT INTO notice_instances (instance_id) VALUES ($1)
             ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now()
             RETURNING (xmax = 0)",
        )
        .bind(&self.instance_id)
        .fetch_one(&self.pool)
        .await?;
        let (any_stale,): (bool,) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM notice_instances
                            WHERE heartbeat_at < now() - make_interval(secs => $1))",
        )
        .bind(STALE_AFTER.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        if any_stale {
            self.remove_instances(InstanceSet::Stale).await?;
        }
        sqlx::query("DELETE FROM notice_presence_events WHERE at < $1")
            .bind(Utc::now().timestamp_millis() - PRESENCE_EVENTS_KEPT.as_millis() as i64)
            .execute(&self.pool)
            .await?;
        Ok(recreated)
    }

    async fn apply(&self, changes: &[PresenceChange]) -> Result<(), StoreError> {
        let mut change = PresenceTransaction::begin(&self.pool).await?;
        let left: Vec<i64> = changes
            .iter()
            .filter_map(|change| match change {
                PresenceChange::Left(id) => Some(*id as i64),
                PresenceChange::Joined(_) => None,
            })
            .collect();
        let leaving: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT name FROM notice_subscribers
             WHERE instance_id = $1 AND subscriber_id = ANY($2) AND name IS NOT NULL",
        )
        .bind(&self.instance_id)
        .bind(&left)
        .fetch_all(&mut *change.tx)
        .await?;
        let joining = changes.iter().filter_map(|change| match change {
            PresenceChange::Joined(present) => present.info.name.clone(),
            PresenceChange::Left(_) => None,
        });
        let names: Vec<String> = leaving
            .into_iter()
            .map(|(name,)| name)
            .chain(joining)
            .collect();
        change.touching(names).await?;
        for each in changes {
            match each {
                PresenceChange::Joined(present) => {
                    insert_subscriber(&mut change.tx, &self.instance_id, present).await?;
                }
                PresenceChange::Left(id) => {
                    sqlx::query(
                        "DELETE FROM notice_subscribers
                         WHERE instance_id = $1 AND subscriber_id = $2",
                    )
                    .bind(&self.instance_id)
                    .bind(*id as i64)
                    .execute(&mut *change.tx)
                    .await?;
                }
            }
        }
        change.commit().await
    }

    /// Rewrites this instance's presence rows from the hub, after a failure left them unsure.
    async fn resync(&self, hub: &Hub) -> Result<(), StoreError> {
        let mut change = PresenceTransaction::begin(&self.pool).await?;
        let present = hub.presence();
        let listed: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT name FROM notice_subscribers
             WHERE instance_id = $1 AND name IS NOT NULL",
        )
        .bind(&self.instance_id)
        .fetch_all(&mut *change.tx)
        .await?;
        let names = listed
            .into_iter()
            .map(|(name,)| name)
            .chain(present.iter().filter_map(|p| p.info.name.clone()));
        change.touching(names).await?;
        sqlx::query("DELETE FROM notice_subscribers WHERE instance_id = $1")
            .bind(&self.instance_id)
            .execute(&mut *change.tx)
            .await?;
        for subscriber in &present {
            insert_subscriber(&mut change.tx, &self.instance_id, subscriber).await?;
        }
        change.commit().await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InstanceSet {
    This,
    Stale,
}

/// One change to the presence rows, with the join/leave events it causes (see the module doc).
/// Call [`PresenceTransaction::touching`] with every name whose rows will change, before
/// changing them, then [`PresenceTransaction::commit`].
struct PresenceTransaction {
    tx: Transaction<'static, Postgres>,
    names: Vec<String>,
    before: BTreeSet<(String, String)>,
}

impl PresenceTransaction {
    async fn begin(pool: &PgPool) -> Result<PresenceTransaction, StoreError> {
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PRESENCE_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(PresenceTransaction {
            tx,
            names: Vec::new(),
            before: BTreeSet::new(),
        })
    }

    async fn touching(
        &mut self,
        names: impl IntoIterator<Item = String>,
    ) -> Result<(), StoreError> {
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        names.dedup();
        self.before = present_pairs(&mut self.tx, &names).await?;
        self.names = names;
        Ok(())
    }

    async fn commit(mut self) -> Result<(), StoreError> {
        let after = present_pairs(&mut self.tx, &self.names).await?;
        let at = Utc::now().timestamp_millis();
        let mut events = 0;
        let changed = self
            .before
            .difference(&after)
            .map(|pair| (PresenceKind::Leave, pair))
            .chain(
                after
                    .difference(&self.before)
                    .map(|pair| (PresenceKind::Join, pair)),
            );
        for (kind, (name, topic)) in changed {
            sqlx::query(
                "INSERT INTO notice_presence_events (kind, name, topic, at)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(kind.event_name())
            .bind(name)
            .bind(topic)
            .bind(at)
            .execute(&mut *self.tx)
            .await?;
            events += 1;
        }
        if events > 0 {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(PRESENCE_CHANNEL)
                .execute(&mut *self.tx)
                .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// The (name, topic) pairs present among `names` on every instance still listed.
async fn present_pairs(
    tx: &mut Transaction<'static, Postgres>,
    names: &[String],
) -> Result<BTreeSet<(String, String)>, StoreError> {
    if names.is_empty() {
        return Ok(BTreeSet::new());
    }
    let pairs: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT s.name, t.topic FROM notice_subscribers s
         CROSS JOIN LATERAL jsonb_array_elements_text(s.topics::jsonb) AS t(topic)
         WHERE s.name = ANY($1)",
    )
    .bind(names)
    .fetch_all(&mut **tx)
    .await?;
    Ok(pairs.into_iter().collect())
}

async fn insert_subscriber(
    tx: &mut Transaction<'static, Postgres>,
    instance_id: &str,
    subscriber: &LocalSubscriber,
) -> Result<(), StoreError> {
    let info = &subscriber.info;
    let (chosen, client) = match &subscriber.claim {
        NameClaim::Entitled => (false, None),
        NameClaim::Chosen { client } => (true, client.as_deref()),
    };
    sqlx::query(
        "INSERT INTO notice_subscribers
           (instance_id, subscriber_id, name, topics, since, chosen, client)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
    )
    .bind(instance_id)
    .bind(subscriber.id as i64)
    .bind(&info.name)
    .bind(serde_json::to_string(&info.topics).expect("strings serialize"))
    .bind(info.since.timestamp_millis())
    .bind(chosen)
    .bind(client)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The LISTEN connection, opened by [`Cluster::join`] and driven by [`run_fan_out`].
pub struct ClusterListener {
    listener: PgListener,
    /// The last notice stored when the listening began.
    last_fanned_out: i64,
    /// The last presence event recorded when the listening began.
    last_presence_event: i64,
}

/// Fans out every notice committed by any instance to this instance's hub, until `shutdown`.
pub async fn run_fan_out(
    cluster: Cluster,
    ClusterListener {
        mut listener,
        last_fanned_out: mut last,
        last_presence_event: mut last_event,
    }: ClusterListener,
    store: Arc<NoticeBackend>,
    hub: Hub,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(CATCH_UP_INTERVAL);
    loop {
        // What to read after this wake-up; the periodic tick reads both.
        let mut reads = Reads::ALL;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            notification = listener.try_recv() => match notification {
                Ok(Some(notification)) => {
                    reads = handle_notification(&cluster, &hub, notification.channel(), notification.payload());
                    // Coalesce a burst of notifications into one read.
                    while let Some(more) = listener.next_buffered() {
                        reads = reads.and(handle_notification(&cluster, &hub, more.channel(), more.payload()));
                    }
                }
                // The connection was lost; the next try_recv reconnects and the periodic read
                // picks up whatever was announced meanwhile.
                Ok(None) => warn!("notification connection lost; reconnecting"),
                Err(err) => {
                    warn!(%err, "notification connection failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(CATCH_UP_INTERVAL) => {}
                    }
                }
            },
        }
        if reads.notices {
            if let Err(err) = catch_up(store.as_ref(), &hub, &mut last).await {
                warn!(%err, "could not read new notices; retrying");
            }
        }
        if reads.presence {
            if let Err(err) = catch_up_presence(&cluster.pool, &hub, &mut last_event).await {
                warn!(%err, "could not read new presence events; retrying");
            }
        }
    }
}

/// Which tables a wake-up of the fan-out has to read.
#[derive(Debug, Clone, Copy)]
struct Reads {
    notices: bool,
    presence: bool,
}

impl Reads {
    const ALL: Reads = Reads {
        notices: true,
        presence: true,
    };
    const NONE: Reads = Reads {
        notices: false,
        presence: false,
    };

    fn and(self, other: Reads) -> Reads {
        Reads {
            notices: self.notices || other.notices,
            presence: self.presence || other.presence,
        }
    }
}

fn handle_notification(cluster: &Cluster, hub: &Hub, channel: &str, payload: &str) -> Reads {
    match channel {
        PUBLISHED_CHANNEL => Reads {
            notices: true,
            presence: false,
        },
        PRESENCE_CHANNEL => Reads {
            notices: false,
            presence: true,
        },
        KICK_CHANNEL => {
            match serde_json::from_str::<KickMessage>(payload) {
                Ok(kick) if kick.origin != cluster.instance_id => {
                    let kicked = hub.kick(&kick.name);
                    debug!(name = %kick.name, kicked, "kicked at another instance's request");
                }
                Ok(_) => {}
                Err(err) => warn!(%err, "ignoring a malformed kick notification"),
            }
            Reads::NONE
        }
        RENAME_CHANNEL => {
            match serde_json::from_str::<RenameMessage>(payload) {
                Ok(rename) if rename.origin != cluster.instance_id => {
                    let renamed = hub.rename(&rename.from, &rename.to);
                    debug!(from = %rename.from, to = %rename.to, renamed, "renamed at another instance's request");
                }
                Ok(_) => {}
                Err(err) => warn!(%err, "ignoring a malformed rename notification"),
            }
            Reads::NONE
        }
        _ => Reads::NONE,
    }
}

/// Hands the presence events recorded after `last` to this instance's presence subscribers.
async fn catch_up_presence(pool: &PgPool, hub: &Hub, last: &mut i64) -> Result<(), StoreError> {
    loop {
        let events: Vec<(i64, String, String, String, i64)> = sqlx::query_as(
            "SELECT id, kind, name, topic, at FROM notice_presence_events
             WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(*last)
        .bind(i64::from(FAN_OUT_BATCH))
        .fetch_all(pool)
        .await?;
        let full = events.len() == FAN_OUT_BATCH as usize;
        for (id, kind, name, topic, at) in events {
            *last = id;
            let kind = match kind.as_str() {
                "join" => PresenceKind::Join,
                _ => PresenceKind::Leave,
            };
            hub.announce(PresenceEvent {
                kind,
                name,
                topic,
                at: from_millis(at),
            });
        }
        if !full {
            return Ok(());
        }
    }
}

async fn catch_up(store: &NoticeBackend, hub: &Hub, last: &mut i64) -> Result<(), StoreError> {
    loop {
        let notices = store
            .query(&NoticeQuery {
                after: *last,
                limit: FAN_OUT_BATCH,
                selector: Selector::All,
                // The hub decides who gets each one; it needs them all.
                whispers: Whispers::All,
            })
            .await?;
        let full = notices.len() == FAN_OUT_BATCH as usize;
        for notice in notices {
            *last = notice.id;
            hub.publish(OutgoingNotice::new(notice));
        }
        if !full {
            return Ok(());
        }
    }
}

/// Mirrors the hub's presence into PostgreSQL and keeps the heartbeat, until `shutdown`;
/// then removes this instance.
pub async fn run_presence(
    cluster: Cluster,
    hub: Hub,
    mut changes: mpsc::UnboundedReceiver<PresenceChange>,
    shutdown: CancellationToken,
) {
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    // After a failed write the rows may be wrong: rewrite them all at the next heartbeat.
    let mut unsure = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            change = changes.recv() => {
                let Some(change) = change else { break };
                let mut batch = vec![change];
                while batch.len() < 500 {
                    match changes.try_recv() {
                        Ok(change) => batch.push(change),
                        Err(_) => break,
                    }
                }
                if let Err(err) = cluster.apply(&batch).await {
                    warn!(%err, "could not update presence; will resync");
                    unsure = true;
                }
            }
            _ = heartbeat.tick() => {
                match cluster.heartbeat().await {
                    Ok(recreated) => unsure |= recreated,
                    Err(err) => {
                        warn!(%err, "presence heartbeat failed");
                        continue;
                    }
                }
                if unsure {
                    match cluster.resync(&hub).await {
                        Ok(()) => unsure = false,
                        Err(err) => warn!(%err, "presence resync failed"),
                    }
                }
            }
        }
    }
    cluster.leave().await;
}
