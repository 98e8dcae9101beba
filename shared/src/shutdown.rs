//! The shutdown signal every binary waits for, and the life of a binary around it.

/// Completes on SIGINT (Ctrl-C) or SIGTERM (`docker stop`, `kill`).
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown signal received");
}

/// Why [`run_until_signal`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError<E> {
    #[error(transparent)]
    Server(E),
    #[error("the server task panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
    #[error("the server was still busy when the shutdown grace of {0:?} ran out")]
    GraceExpired(std::time::Duration),
}

/// A binary's life: runs `server` until SIGINT/SIGTERM, then cancels `shutdown` (which `server`
/// watches) and gives it `grace` to finish what it is doing. A server that ends by itself first,
/// such as one whose store cannot be opened, ends the process at once with its result.
pub async fn run_until_signal<E>(
    server: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
    grace: std::time::Duration,
) -> Result<(), RunError<E>>
where
    E: Send + 'static,
{
    let mut server = tokio::spawn(server);
    tokio::select! {
        _ = shutdown_signal() => {}
        finished = &mut server => return finished?.map_err(RunError::Server),
    }
    shutdown.cancel();
    match tokio::time::timeout(grace, server).await {
        Ok(finished) => finished?.map_err(RunError::Server),
        Err(_) => Err(RunError::GraceExpired(grace)),
    }
}
