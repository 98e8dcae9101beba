//! PostgreSQL the same way for every service that keeps its data there: connecting at start-up,
//! and telling callers honestly what a failed operation did.
//!
//! A service and its database are often started together (docker-compose, a reboot), and the
//! service may be up first, or the database may be down for a while. So a server that does not
//! answer is waited for as long as it takes ([`connect`]), rather than failing the start; what
//! waiting cannot fix (a bad URL, wrong credentials, a missing database) fails at once.
//!
//! Once running, every operation has a deadline (`--store-timeout`), shorter than the gateway's
//! request timeout, and a failure says what the caller may conclude ([`StoreFailure`]):
//! - no connection in time, or a read that failed: nothing happened, "the store is unavailable";
//! - a write that was sent but never answered (the connection dropped, or the deadline passed
//!   while the server had it): it may have been applied, "outcome unknown". Only then.
//!
//! A write is only ever sent on a connection already taken from the pool ([`acquire`]), so a
//! write that fails while waiting for a connection is known not to have been applied, and one
//! that is abandoned at its deadline is never applied later without the caller having been told
//! that it might be. [`Database`] runs the two kinds of step: `uncommitted` and `committing`.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use sqlx::{
    migrate::{MigrateError, Migrator},
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool, Postgres,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store_spec::StoreOptions;

/// The first pause between two attempts to reach the server at start-up.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest pause between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// While the server stays unreachable, a warning this often (each attempt is logged at info).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Opens a pool on `url` with `pool`'s settings once the server answers, retrying an unreachable
/// server for as long as it takes, with a backoff capped at [`MAX_RETRY`]. The pool has made one
/// connection when this returns. Callers that must give up (shutdown) drop the future.
pub async fn connect(url: &str, pool: PgPoolOptions) -> Result<PgPool, sqlx::Error> {
    connect_with_patience(url, pool, Duration::MAX).await
}

/// [`connect`], giving up on an unreachable server after `patience`.
pub async fn connect_with_patience(
    url: &str,
    pool: PgPoolOptions,
    patience: Duration,
) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let started = Instant::now();
    let mut last_warning = started;
    let mut pause = FIRST_RETRY;
    for attempt in 1u64.. {
        match pool.clone().connect_with(options.clone()).await {
            Ok(pool) => {
                if attempt > 1 {
                    tracing::info!(attempt, waited = ?started.elapsed(), "PostgreSQL is reachable");
                }
                return Ok(pool);
            }
            Err(err) if is_unreachable(&err) && started.elapsed() < patience => {
                if last_warning.elapsed() >= WARN_EVERY {
                    last_warning = Instant::now();
                    tracing::warn!(%err, attempt, waited = ?started.elapsed(),
                        "PostgreSQL is still not reachable; still waiting for it");
                } else {
                    tracing::info!(%err, attempt, retry_in = ?pause,
                        "PostgreSQL not reachable yet; waiting for it");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_RETRY);
            }
            Err(err) => return Err(err),
        }
    }
    unreachable!("the attempts never run out")
}

/// Errors worth waiting out at start-up: the server is not up (yet), or did not answer in time.
pub fn is_unreachable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // The server is starting up, shutting down or in recovery: it will take connections soon.
        sqlx::Error::Database(err) => matches!(err.code().as_deref(), Some("57P03" | "57P01")),
        _ => false,
    }
}

/// A store operation that failed, as its caller must report it.
#[derive(Debug, thiserror::Error)]
pub enum StoreFailure {
    /// Nothing was applied: no connection came in time, or a read failed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A write was sent but its answer never came: it may or may not have been applied.
    #[error("the outcome of the write is unknown: {0}")]
    OutcomeUnknown(String),
    /// The server answered with an error: nothing was applied.
    #[error(transparent)]
    Database(sqlx::Error),
}

impl StoreFailure {
    /// The message for the caller: the same whatever the cause, which goes to the log only.
    pub const UNAVAILABLE: &'static str = "the store is unavailable";
    /// The message for a write that may or may not have been applied.
    pub const OUTCOME_UNKNOWN: &'static str = "outcome unknown: the store's connection was lost \
        after the write was sent, so it may or may not have been applied; read it back to know";
}

impl From<&StoreFailure> for crate::service::ServiceError {
    /// 503 for an unavailable store or an unknown outcome, each with its fixed message; 500 for
    /// the rest. The cause goes to the log, never to the caller.
    fn from(failure: &StoreFailure) -> Self {
        use crate::service::ServiceError;
        match failure {
            StoreFailure::Unavailable(_) => {
                ServiceError::Unavailable(StoreFailure::UNAVAILABLE.into())
            }
            StoreFailure::OutcomeUnknown(_) => {
                ServiceError::Unavailable(StoreFailure::OUTCOME_UNKNOWN.into())
            }
            StoreFailure::Database(_) => ServiceError::Internal("the store failed".into()),
        }
    }
}

/// A service's PostgreSQL: the pool, and the store timeout every step runs under.
#[derive(Clone)]
pub struct Database {
    pool: PgPool,
    timeout: Duration,
}

impl Database {
    /// Opens a pool of at most `max_connections` once the server answers ([`connect`]), each
    /// step bounded by `options.timeout`, the time to get a connection included.
    pub async fn open(
        url: &str,
        max_connections: u32,
        options: StoreOptions,
    ) -> Result<Database, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(options.timeout);
        Ok(Database {
            pool: connect(url, pool).await?,
            timeout: options.timeout,
        })
    }

    /// Brings the schema up to date. The migrator takes an advisory lock, so replicas starting
    /// together apply each migration once.
    pub async fn migrate(&self, migrations: &Migrator) -> Result<(), MigrateError> {
        migrations.run(&self.pool).await
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How long one step may take (`--store-timeout`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Takes a connection, for a write that must not be sent before one is held.
    pub async fn acquire(&self) -> Result<PoolConnection<Postgres>, StoreFailure> {
        acquire(&self.pool).await
    }

    /// Runs a step whose failure leaves nothing applied ([`uncommitted`]).
    pub async fn uncommitted<T>(
        &self,
        step: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreFailure> {
        uncommitted(self.timeout, step).await
    }

    /// Runs a step that applies changes on its own ([`committing`]).
    pub async fn committing<T>(
        &self,
        step: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, StoreFailure> {
        committing(self.timeout, step).await
    }

    /// Whether the server answers, kept up to date until `shutdown` ([`follow_readiness`]).
    pub fn follow_readiness(&self, shutdown: CancellationToken) -> watch::Receiver<bool> {
        follow_readiness(self.pool.clone(), self.timeout, shutdown)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// How often [`follow_readiness`] asks the server whether it answers.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the server answers, kept up to date: a `SELECT 1` within `deadline` every
/// [`PROBE_INTERVAL`] until `shutdown`. A service reports it to the distributor, so the gateway
/// stops sending it requests while its database is away.
fn follow_readiness(
    pool: PgPool,
    deadline: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let (ready_tx, ready) = watch::channel(true);
    tokio::spawn(async move {
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = probe.tick() => {}
            }
            let answered = uncommitted(deadline, sqlx::query("SELECT 1").execute(&pool)).await;
            let now_ready = answered.is_ok();
            ready_tx.send_if_modified(|ready| {
                let changed = *ready != now_ready;
                if changed {
                    match &answered {
                        Ok(_) => tracing::info!("PostgreSQL answers again: ready"),
                        Err(err) => tracing::warn!(%err, "PostgreSQL does not answer: not ready"),
                    }
                    *ready = now_ready;
                }
                changed
            });
        }
    });
    ready
}

/// Takes a connection from `pool` within the pool's acquire timeout (the store timeout).
async fn acquire(pool: &PgPool) -> Result<PoolConnection<Postgres>, StoreFailure> {
    pool.acquire()
        .await
        .map_err(|err| StoreFailure::Unavailable(err.to_string()))
}

/// Runs, within `deadline`, a step whose failure leaves nothing applied: a read, or a statement
/// of a transaction that has not committed (the server rolls it back when the connection goes).
async fn uncommitted<T>(
    deadline: Duration,
    operation: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreFailure> {
    match tokio::time::timeout(deadline, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) if is_lost(&err) => Err(StoreFailure::Unavailable(err.to_string())),
        Ok(Err(err)) => Err(StoreFailure::Database(err)),
        Err(_) => Err(StoreFailure::Unavailable(format!(
            "no answer within {deadline:?}"
        ))),
    }
}

/// Runs, within `deadline`, a step that applies changes on its own: a write outside a transaction
/// (on a connection from [`acquire`]) or a COMMIT. If the server answered (with a result or an
/// error) the outcome is known; if it never did, it is not.
async fn committing<T>(
    deadline: Duration,
    operation: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreFailure> {
    match tokio::time::timeout(deadline, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) if is_lost(&err) => Err(StoreFailure::OutcomeUnknown(err.to_string())),
        Ok(Err(err)) => Err(StoreFailure::Database(err)),
        // Dropping the operation drops its connection; the server may still finish the write.
        Err(_) => Err(StoreFailure::OutcomeUnknown(format!(
            "no answer within {deadline:?}"
        ))),
    }
}

/// The connection failed rather than the server answering: the answer was lost on the way.
fn is_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Terminated by an administrator or a server shutting down, mid-statement.
        sqlx::Error::Database(err) => {
            matches!(err.code().as_deref(), Some("57P01" | "57P02" | "57P03"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port nothing listens on: bound, then released.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn quick_pool() -> PgPoolOptions {
        PgPoolOptions::new().acquire_timeout(Duration::from_millis(200))
    }

    #[tokio::test]
    async fn an_unreachable_server_is_reported_as_such_once_patience_runs_out() {
        let url = format!("postgres://nobody@127.0.0.1:{}/nothing", closed_port());
        let err = connect_with_patience(&url, quick_pool(), Duration::ZERO)
            .await
            .unwrap_err();
        assert!(is_unreachable(&err), "{err:?}");
    }

    fn connection_reset() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }

    #[tokio::test]
    async fn a_lost_connection_means_nothing_happened_before_a_commit_and_unknown_at_it() {
        let read = uncommitted(Duration::from_secs(1), async {
            Err::<(), _>(connection_reset())
        });
        assert!(matches!(read.await, Err(StoreFailure::Unavailable(_))));
        let commit = committing(Duration::from_secs(1), async {
            Err::<(), _>(connection_reset())
        });
        assert!(matches!(commit.await, Err(StoreFailure::OutcomeUnknown(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_past_its_deadline_is_abandoned_with_the_matching_failure() {
        let never = || std::future::pending::<Result<(), sqlx::Error>>();
        let read = uncommitted(Duration::from_secs(1), never()).await;
        assert!(
            matches!(read, Err(StoreFailure::Unavailable(_))),
            "{read:?}"
        );
        let commit = committing(Duration::from_secs(1), never()).await;
        assert!(
            matches!(commit, Err(StoreFailure::OutcomeUnknown(_))),
            "{commit:?}"
        );
    }

    #[tokio::test]
    async fn an_error_the_server_answered_is_neither_unavailable_nor_unknown() {
        let refused = sqlx::Error::RowNotFound;
        let commit = committing(Duration::from_secs(1), async { Err::<(), _>(refused) }).await;
        assert!(
            matches!(commit, Err(StoreFailure::Database(_))),
            "{commit:?}"
        );
    }

    #[tokio::test]
    async fn a_malformed_url_fails_at_once() {
        let err = connect("postgres://[not a host", quick_pool())
            .await
            .unwrap_err();
        assert!(!is_unreachable(&err), "{err:?}");
    }
}
