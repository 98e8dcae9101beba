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
//! ignored after `STALE_AFTER` (15 s) and deleted (its subscribers cascade) after twice that.
//!
//! Kick: the instance that receives it kicks its own subscribers, counts the other instances'
//! subscribers of that name, and tells them with `NOTIFY notice_kick`.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use sqlx::{postgres::PgListener, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    hub::{Hub, PresenceChange, SubscriberInfo},
    notice::{from_millis, OutgoingNotice, Whispers},
    store::{NoticeBackend, NoticeQuery, NoticeStore, Selector, StoreError, PUBLISHED_CHANNEL},
};

/// NOTIFY channel asking the other instances to kick a name.
const KICK_CHANNEL: &str = "notice_kick";
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
            .listen_all([PUBLISHED_CHANNEL, KICK_CHANNEL])
            .await?;
        // Read after LISTEN: a notice committed in between is both announced and above it.
        let last_fanned_out = store.last_id().await?;
        info!(instance = %instance_id, "joined the notice cluster");
        let cluster = Cluster { pool, instance_id };
        let listener = ClusterListener {
            listener,
            last_fanned_out,
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

    /// Asks the other instances to kick `name`; returns how many subscribers they have by it.
    pub async fn kick_remote(&self, name: &str) -> Result<usize, StoreError> {
        let (count,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM notice_subscribers s
             JOIN notice_instances i ON i.instance_id = s.instance_id
             WHERE s.name = $1 AND s.instance_id <> $2
               AND i.heartbeat_at > now() - make_interval(secs => $3)",
        )
        .bind(name)
        .bind(&self.instance_id)
        .bind(STALE_AFTER.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        if count > 0 {
            let message = KickMessage {
                name: name.to_string(),
                origin: self.instance_id.clone(),
            };
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(KICK_CHANNEL)
                .bind(serde_json::to_string(&message).expect("strings serialize"))
                .execute(&self.pool)
                .await?;
        }
        Ok(usize::try_from(count).unwrap_or(0))
    }

    /// Removes this instance (and so its presence rows) on a clean shutdown.
    async fn leave(&self) {
        let left = sqlx::query("DELETE FROM notice_instances WHERE instance_id = $1")
            .bind(&self.instance_id)
            .execute(&self.pool)
            .await;
        if let Err(err) = left {
            warn!(%err, "could not remove this instance from presence");
        }
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
        sqlx::query(
            "DELETE FROM notice_instances WHERE heartbeat_at < now() - make_interval(secs => $1)",
        )
        .bind(2.0 * STALE_AFTER.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(recreated)
    }

    async fn apply(&self, changes: &[PresenceChange]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for change in changes {
            match change {
                PresenceChange::Joined(present) => {
                    insert_subscriber(&mut tx, &self.instance_id, present.id, &present.info)
                        .await?;
                }
                PresenceChange::Left(id) => {
                    sqlx::query(
                        "DELETE FROM notice_subscribers
                         WHERE instance_id = $1 AND subscriber_id = $2",
                    )
                    .bind(&self.instance_id)
                    .bind(*id as i64)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Rewrites this instance's presence rows from the hub, after a failure left them unsure.
    async fn resync(&self, hub: &Hub) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM notice_subscribers WHERE instance_id = $1")
            .bind(&self.instance_id)
            .execute(&mut *tx)
            .await?;
        for present in hub.presence() {
            insert_subscriber(&mut tx, &self.instance_id, present.id, &present.info).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

async fn insert_subscriber(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    instance_id: &str,
    id: u64,
    info: &SubscriberInfo,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO notice_subscribers (instance_id, subscriber_id, name, topics, since)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(instance_id)
    .bind(id as i64)
    .bind(&info.name)
    .bind(serde_json::to_string(&info.topics).expect("strings serialize"))
    .bind(info.since.timestamp_millis())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The LISTEN connection, opened by [`Cluster::join`] and driven by [`run_fan_out`].
pub struct ClusterListener {
    listener: PgListener,
    /// The last notice stored when the listening began.
    last_fanned_out: i64,
}

/// Fans out every notice committed by any instance to this instance's hub, until `shutdown`.
pub async fn run_fan_out(
    cluster: Cluster,
    ClusterListener {
        mut listener,
        last_fanned_out: mut last,
    }: ClusterListener,
    store: Arc<NoticeBackend>,
    hub: Hub,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(CATCH_UP_INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            notification = listener.try_recv() => match notification {
                Ok(Some(notification)) => {
                    handle_notification(&cluster, &hub, notification.channel(), notification.payload());
                    // Coalesce a burst of notifications into one read.
                    while let Some(more) = listener.next_buffered() {
                        handle_notification(&cluster, &hub, more.channel(), more.payload());
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
        if let Err(err) = catch_up(store.as_ref(), &hub, &mut last).await {
            warn!(%err, "could not read new notices; retrying");
        }
    }
}

fn handle_notification(cluster: &Cluster, hub: &Hub, channel: &str, payload: &str) {
    if channel != KICK_CHANNEL {
        return;
    }
    match serde_json::from_str::<KickMessage>(payload) {
        Ok(kick) if kick.origin != cluster.instance_id => {
            let kicked = hub.kick(&kick.name);
            debug!(name = %kick.name, kicked, "kicked at another instance's request");
        }
        Ok(_) => {}
        Err(err) => warn!(%err, "ignoring a malformed kick notification"),
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
