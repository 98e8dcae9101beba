//! Serving HTTP/1.1 connections.
//!
//! The gateway serves HTTP/1.1 only, with hyper's HTTP/1 connection directly rather than the
//! auto-detecting HTTP/1-or-2 connection that `axum::serve` uses: what every client of the gateway
//! speaks (curl, browsers' EventSource, load balancers in front of it) at a lower cost per
//! connection, which counts when thousands of event streams sit open. Connections are accepted by
//! the same capped accept loop as the packet servers ([`shared::service::serve_connections`]).

use std::{net::SocketAddr, time::Duration};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use shared::connection::tune_socket;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// A client must send a request's whole head within this time after it starts one, or the
/// connection is closed: a peer that trickles bytes cannot hold a connection forever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops accepting, lets every
/// connection finish the request it is answering, and returns when all of them have closed.
pub(crate) async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    shared::service::serve_connections(listener, &shutdown, |stream, peer| {
        serve_connection(stream, peer, app.clone(), shutdown.clone())
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    shutdown: CancellationToken,
) {
    tune_socket(&stream);
    let service = TowerToHyperService::new(app);
    // Pinned where it is built: binding it first and pinning it after would keep room for two
    // connections in this future, which lives as long as the connection does.
    let mut connection = std::pin::pin!(http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service));
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.cancelled() => {
            // Finishes the answer in progress, then closes; an idle connection closes at once.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        debug!(%peer, %err, "HTTP connection ended with an error");
    }
}
