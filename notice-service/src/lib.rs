//! notice-service: real-time notices pushed to subscribers, with topics, whispers (notices to
//! one named subscriber), schedules, presence and replay.
//!
//! A publisher posts a notice; it is stored with an id from one increasing sequence, then pushed
//! to every live subscriber entitled to it (broadcasts to all, topic notices to that topic's
//! subscribers, whispers to the subscribers with that name). A subscriber that reconnects with
//! its last id first gets what it missed from the store, then the live notices, with no gap and
//! no duplicate. Several instances on one PostgreSQL database behave as one service.
//! docs/HTTP.md describes the routes and the stream events; ARCHITECTURE.md the guarantees.
//!
//! Layout:
//! - [`notice`]: the notice, its validation, and who may receive it ([`notice::Interest`]).
//! - [`store`]: the [`store::NoticeStore`] trait with its memory, SQLite and PostgreSQL
//!   backends, and [`store::NoticeBackend`], the one `--store` picks.
//! - [`hub`]: this instance's live subscribers and the bounded, never-blocking fan-out.
//! - [`feed`]: one subscriber's replay-then-live sequence.
//! - [`service`]: the operations (publish, list, subscribe, presence, kick), wire-independent.
//! - [`scheduler`]: publishing scheduled notices on time, and retention.
//! - [`cluster`]: LISTEN/NOTIFY fan-out and shared presence across instances on PostgreSQL.
//! - [`routes`]: the packet routes on shared's service runtime.
//! - [`udp`]: the UDP door (`--udp-listen`), subscribers that register an address.
//! - `metrics`: publishes, deliveries, subscribers and lagged cut-offs, for `--metrics-listen`.
//! - `main.rs`: flags and process wiring only; `src/bin/notice-bench.rs`: the fan-out benchmark.

pub mod cluster;
pub mod feed;
pub mod hub;
mod metrics;
pub mod notice;
pub mod routes;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod udp;

use std::{sync::Arc, time::Duration};

use shared::{service::ServiceConfig, store_spec::StoreOptions};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    cluster::Cluster,
    hub::Hub,
    service::NoticeService,
    store::{NoticeBackend, Retention, StoreError, StoreSpec},
    udp::{UdpConfig, UdpDoor},
};

/// The name the service registers under with the distributor.
pub const SERVICE_NAME: &str = "notice";

/// How long streams get at shutdown to send their final event.
const STREAM_GRACE: Duration = Duration::from_secs(2);

/// Everything `run` needs; main.rs fills it from flags and environment variables.
#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreSpec,
    /// How long a store operation may wait, and how the store is checked at open.
    pub store_options: StoreOptions,
    /// How the service is a node: the distributor it registers with (`None`: tests, direct
    /// packet clients), who may connect, what one client may hold.
    pub node: ServiceConfig,
    pub retention: Retention,
    /// Notices queued per subscriber before it is cut off as too slow.
    pub subscriber_buffer: usize,
    /// Live subscriptions this instance accepts at once.
    pub max_subscribers: usize,
    /// The UDP door, when it is open.
    pub udp: Option<UdpConfig>,
}

impl Config {
    /// An unregistered service over `store` with no retention cap (embedding and tests).
    pub fn standalone(store: StoreSpec) -> Config {
        Config {
            store,
            store_options: StoreOptions::default(),
            node: ServiceConfig::named(SERVICE_NAME),
            retention: Retention::default(),
            subscriber_buffer: 1024,
            max_subscribers: 100_000,
            udp: None,
        }
    }
}

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum NoticeServiceError {
    #[error("could not open the notice store: {0}")]
    Store(#[from] StoreError),
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the notice routes on `listener` until `shutdown` is cancelled, then ends every
/// subscription with a final `shutdown` event and stops the background tasks.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), NoticeServiceError> {
    info!(store = ?config.store, retention = ?config.retention, "opening the notice store");
    // Until the store opens (PostgreSQL may be away for a while), the service is not registered,
    // so nothing is routed to it.
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        opened = NoticeBackend::open(&config.store, config.store_options) => opened,
    };
    let store = Arc::new(opened?);
    let postgres = store.postgres_pool().cloned();
    let background = shutdown.child_token();
    let tasks = TaskTracker::new();

    let (observer, presence_changes) = match postgres {
        Some(_) => {
            let (observer, changes) = mpsc::unbounded_channel();
            (Some(observer), Some(changes))
        }
        None => (None, None),
    };
    let hub = Hub::new(config.subscriber_buffer, config.max_subscribers, observer);
    let cluster = match (postgres, presence_changes) {
        (Some(pool), Some(changes)) => {
            let (cluster, listener) = Cluster::join(pool, &store).await?;
            tasks.spawn(cluster::run_fan_out(
                cluster.clone(),
                listener,
                store.clone(),
                hub.clone(),
                background.clone(),
            ));
            tasks.spawn(cluster::run_presence(
                cluster.clone(),
                hub.clone(),
                changes,
                background.clone(),
            ));
            Some(cluster)
        }
        _ => None,
    };
    let service = NoticeService::new(store.clone(), hub.clone(), cluster, config.retention);
    if let Some(udp) = config.udp {
        let socket = tokio::net::UdpSocket::bind(udp.listen).await?;
        let door = UdpDoor::new(socket, service.clone(), udp);
        tasks.spawn(door.run(background.clone()));
    }
    tasks.spawn(scheduler::run_scheduler(
        service.clone(),
        background.clone(),
    ));
    tasks.spawn(scheduler::run_retention(
        service.clone(),
        background.clone(),
    ));
    // Subscriptions never end by themselves. At shutdown they are ended first, so each stream
    // closes with a final `shutdown` event, and only then are the connections closed.
    let streams = TaskTracker::new();
    let serve_shutdown = CancellationToken::new();
    tasks.spawn({
        let background = background.clone();
        let streams = streams.clone();
        let serve_shutdown = serve_shutdown.clone();
        async move {
            background.cancelled().await;
            hub.shut_down();
            streams.close();
            let _ = tokio::time::timeout(STREAM_GRACE, streams.wait()).await;
            serve_shutdown.cancel();
        }
    });

    let service_config = ServiceConfig {
        readiness: store.follow_readiness(background.clone()),
        ..config.node
    };
    let served = shared::service::serve(
        listener,
        routes::router(service, streams),
        service_config,
        serve_shutdown,
    )
    .await;
    background.cancel();
    tasks.close();
    tasks.wait().await;
    store.close().await;
    served?;
    Ok(())
}
