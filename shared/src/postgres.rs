//! Connecting to PostgreSQL at start-up, the same way for every service that keeps its data there.
//!
//! A service and its database are often started together (docker-compose, a reboot), and the
//! service may be up first. So a server that does not answer yet is waited for, for a while,
//! rather than failing the start; what waiting cannot fix (a bad URL, wrong credentials, a
//! missing database) fails at once.

use std::time::{Duration, Instant};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool,
};

/// How long [`connect`] keeps retrying a server that does not answer yet.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// The pause between two attempts.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Opens a pool on `url` with `pool`'s settings once the server answers, retrying an unreachable
/// server for [`CONNECT_PATIENCE`]. The pool has made one connection when this returns.
pub async fn connect(url: &str, pool: PgPoolOptions) -> Result<PgPool, sqlx::Error> {
    connect_with_patience(url, pool, CONNECT_PATIENCE).await
}

/// [`connect`], giving up on an unreachable server after `patience`.
pub async fn connect_with_patience(
    url: &str,
    pool: PgPoolOptions,
    patience: Duration,
) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    let started = Instant::now();
    loop {
        match pool.clone().connect_with(options.clone()).await {
            Ok(pool) => return Ok(pool),
            Err(err) if is_unreachable(&err) && started.elapsed() < patience => {
                tracing::warn!(%err, "PostgreSQL not reachable yet; retrying");
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Errors worth waiting out at start-up: the server is not up (yet), or did not answer in time.
pub fn is_unreachable(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
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

    #[tokio::test]
    async fn a_malformed_url_fails_at_once() {
        let err = connect("postgres://[not a host", quick_pool())
            .await
            .unwrap_err();
        assert!(!is_unreachable(&err), "{err:?}");
    }
}
