//! The gateway's HTTP edge: accepting connections from the outside and holding every client to
//! the limits that keep one of them (or a thousand) from starving the others.
//!
//! - Connections: at most `max_connections` at once and `max_connections_per_ip` from one
//!   address ([`shared::server::serve_connections`]).
//! - Heads: whole within `header_timeout`, at most `max_headers` fields and `max_header_bytes`
//!   (431 above either). Between two requests an HTTP/1.1 connection waits for the next head, so
//!   an idle keep-alive connection is closed after `header_timeout` as well.
//! - Bodies: every piece within `body_timeout` of the one before, the whole within
//!   `body_timeout` plus its size at [`MIN_BODY_RATE`] ([`PacedBody`]; the proxy answers 408).
//! - Idle connections: no byte moving either way for `idle_timeout` closes the connection
//!   (gracefully first: an answer in progress is finished).
//! - CORS, when origins are configured: tower-http's layer, outermost, so preflights are
//!   answered here and every answer (errors included) carries the headers.
//! - TLS, when configured ([`crate::tls`]): HTTP/2 or HTTP/1.1 as ALPN chose; the handshake is
//!   bounded by `header_timeout` too.
//!
//! Without TLS the gateway serves HTTP/1.1 only, with hyper's HTTP/1 connection directly rather
//! than the auto-detecting HTTP/1-or-2 connection that `axum::serve` uses: what every client of
//! the gateway speaks over plain TCP (curl, browsers' EventSource, load balancers in front of it)
//! at a lower cost per connection, which counts when thousands of event streams sit open.
//!
//! Every request carries the peer's address as [`ConnectInfo<SocketAddr>`] in its extensions.
//!
//! Why not tower-http's `RequestBodyLimitLayer` for `--max-body` (read from tower-http 0.6's
//! code; no benchmark run): it has no clock, so [`PacedBody`] and its 408 stay whatever it
//! does; it answers an over-long `Content-Length` itself, with a `text/plain` "length limit
//! exceeded" instead of the gateway's JSON error, request id, metrics and log line
//! (gateway/tests/errors.rs asserts that JSON message); an over-long chunked body still reaches
//! the proxy as a body error it must turn into 413, so `proxy::read_body`'s count stays too; and
//! its `Limited<Body>` is boxed again by axum's router, one more allocation per request with a
//! body. So the limit stays where the body is read, in [`crate::proxy`].

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::ConnectInfo,
    http::{header, HeaderName, HeaderValue, Request, StatusCode},
    response::Response,
    Router,
};
use futures::{
    future::{ready, Either, Ready},
    FutureExt,
};
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    server::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use shared::{
    connection::tune_socket,
    server::{serve_connections, ConnectionLimits},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::Service;
use tower_http::cors::{AllowMethods, AllowOrigin, CorsLayer};
use tracing::debug;

use crate::{
    config::{CorsOrigins, EdgeConfig},
    error::json_error,
};

/// The default `header_timeout`: a client must send a request's whole head within this time,
/// or the connection is closed, so a peer that trickles bytes cannot hold a connection for long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The default `max_headers`, which is also hyper's own: hyper parses up to this many fields
/// on the stack, and on the heap (for every request) once another number is set.
pub const DEFAULT_MAX_HEADERS: usize = 100;

/// The slowest pace a request body may average, in bytes per second, beyond its `body_timeout`
/// of grace: 16 KiB/s, a crawl for any real uploader, lets a 1 MiB body take 74 s.
pub const MIN_BODY_RATE: u64 = 16 * 1024;

/// How long a browser may cache a preflight's answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(600);

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops accepting, lets every
/// connection finish the request it is answering, and returns when all of them have closed.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    config: EdgeConfig,
    open_connections: Arc<AtomicUsize>,
    shutdown: CancellationToken,
) {
    let limits = ConnectionLimits {
        max_connections: config.max_connections,
        max_per_ip: config.max_connections_per_ip,
        loopback_only: false,
    };
    let edge = Arc::new(Edge::new(app, config));
    serve_connections(listener, limits, &shutdown, |stream, peer| {
        // Counted for `/_/connections` until the connection's future ends.
        open_connections.fetch_add(1, Ordering::Relaxed);
        let open = open_connections.clone();
        serve_connection(stream, peer, edge.clone(), shutdown.clone()).map(move |()| {
            open.fetch_sub(1, Ordering::Relaxed);
        })
    })
    .await;
}

/// What every connection of the listener shares.
struct Edge {
    /// The gateway's router, inside the CORS layer when there is one.
    app: Router,
    config: EdgeConfig,
    tls: Option<TlsAcceptor>,
}

impl Edge {
    fn new(app: Router, config: EdgeConfig) -> Edge {
        let app = match cors_layer(&config.cors) {
            Some(cors) => app.layer(cors),
            None => app,
        };
        let tls = config.tls.clone().map(TlsAcceptor::from);
        Edge { app, config, tls }
    }

    fn http1(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout)
            .max_header_size(self.config.max_header_bytes);
        if self.config.max_headers != DEFAULT_MAX_HEADERS {
            builder.max_headers(self.config.max_headers);
        }
        builder
    }

    fn http2(&self) -> http2::Builder<TokioExecutor> {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.config.max_header_bytes).unwrap_or(u32::MAX));
        builder
    }
}

/// The CORS layer for `origins`; `None` when no origin is allowed, so the gateway then answers
/// browsers' preflights like any other request and sends no CORS header.
fn cors_layer(origins: &CorsOrigins) -> Option<CorsLayer> {
    let allow_origin = match origins {
        CorsOrigins::None => return None,
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(origins) => AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            // Whatever method the page asks for: the routes decide what exists.
            .allow_methods(AllowMethods::mirror_request())
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                LAST_EVENT_ID.clone(),
                X_REQUEST_ID.clone(),
            ])
            .expose_headers([
                X_REQUEST_ID.clone(),
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
            ])
            .max_age(CORS_MAX_AGE),
    )
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    edge: Arc<Edge>,
    shutdown: CancellationToken,
) {
    tune_socket(&stream);
    let activity = Activity::default();
    let stream = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    let service = EdgeService {
        edge: edge.clone(),
        peer,
    };
    let result = match &edge.tls {
        None => {
            // Pinned where it is built: binding it first and pinning it after would keep room
            // for two connections in this future, which lives as long as the connection does.
            let connection =
                std::pin::pin!(edge.http1().serve_connection(TokioIo::new(stream), service));
            drive(
                connection,
                |connection| connection.graceful_shutdown(),
                &activity,
                edge.config.idle_timeout,
                &shutdown,
            )
            .await
        }
        // Boxed, so the larger TLS state takes no room in plain connections' futures.
        Some(acceptor) => {
            Box::pin(serve_tls(
                acceptor, stream, service, &edge, &activity, &shutdown,
            ))
            .await
        }
    };
    match result {
        Ok(Closed::Finished) => {}
        Ok(Closed::Idle) => debug!(%peer, "closed an idle HTTP connection"),
        Ok(Closed::Handshake(reason)) => debug!(%peer, reason, "TLS handshake failed"),
        Err(err) => debug!(%peer, %err, "HTTP connection ended with an error"),
    }
}

/// Completes the TLS handshake within `header_timeout`, then serves HTTP/2 or HTTP/1.1 as ALPN
/// chose (HTTP/1.1 when the client offered neither).
async fn serve_tls(
    acceptor: &TlsAcceptor,
    stream: Tracked<TcpStream>,
    service: EdgeService,
    edge: &Edge,
    activity: &Activity,
    shutdown: &CancellationToken,
) -> Result<Closed, hyper::Error> {
    let handshake = tokio::time::timeout(edge.config.header_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return Ok(Closed::Finished),
        accepted = handshake => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => return Ok(Closed::Handshake(err.to_string())),
            Err(_) => return Ok(Closed::Handshake("it did not finish in time".into())),
        },
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let idle_timeout = edge.config.idle_timeout;
    if h2 {
        let connection = std::pin::pin!(edge.http2().serve_connection(io, service));
        drive(
            connection,
            |connection| connection.graceful_shutdown(),
            activity,
            idle_timeout,
            shutdown,
        )
        .await
    } else {
        let connection = std::pin::pin!(edge.http1().serve_connection(io, service));
        drive(
            connection,
            |connection| connection.graceful_shutdown(),
            activity,
            idle_timeout,
            shutdown,
        )
        .await
    }
}

/// How a connection ended without an error.
enum Closed {
    Finished,
    /// Nothing moved on it for the idle timeout.
    Idle,
    /// The TLS handshake failed or took too long; why.
    Handshake(String),
}

/// Runs `connection` to its end. At shutdown, or once nothing has moved on it for
/// `idle_timeout`, it is asked to finish gracefully (the answer in progress is completed, an
/// idle connection closes at once); if still nothing moves for as long again, it is dropped.
async fn drive<C>(
    mut connection: Pin<&mut C>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    activity: &Activity,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<Closed, hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    // Checked twice per timeout: a connection is found idle after one to one and a half times
    // the timeout, without a clock read on every read and write.
    let period = (idle_timeout / 2).max(Duration::from_millis(1));
    let tick = tokio::time::sleep(period);
    let mut tick = std::pin::pin!(tick);
    let mut silent_periods = 0u32;
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => return result.map(|()| Closed::Finished),
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                graceful_shutdown(connection.as_mut());
            }
            _ = tick.as_mut() => {
                tick.as_mut().reset(Instant::now() + period);
                if activity.take() {
                    silent_periods = 0;
                    continue;
                }
                silent_periods += 1;
                if silent_periods >= 4 {
                    return Ok(Closed::Idle);
                }
                if silent_periods >= 2 && !closing {
                    closing = true;
                    graceful_shutdown(connection.as_mut());
                }
            }
        }
    }
}

/// Whether any byte moved on a connection since the last look.
#[derive(Clone, Default)]
struct Activity(Arc<AtomicBool>);

impl Activity {
    fn note(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// True when something moved since the last call.
    fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }
}

/// A socket that notes in its [`Activity`] every read and write that moved bytes.
struct Tracked<S> {
    inner: S,
    activity: Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.note();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.note();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.note();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The service hyper calls for each request of one connection: checks the header count (hyper
/// does for HTTP/1.1, not for HTTP/2), records the peer, paces the body, and hands the request
/// to the router.
struct EdgeService {
    edge: Arc<Edge>,
    peer: SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for EdgeService {
    type Response = Response;
    type Error = Infallible;
    type Future =
        Either<Ready<Result<Response, Infallible>>, axum::routing::future::RouteFuture<Infallible>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        if request.headers().len() > self.edge.config.max_headers {
            return Either::Left(ready(Ok(json_error(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request has too many header fields",
            ))));
        }
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let body_timeout = self.edge.config.body_timeout;
        let request = request.map(|body| {
            if body.is_end_stream() {
                Body::new(body)
            } else {
                Body::new(PacedBody::new(body, body_timeout))
            }
        });
        // The router is always ready (its `poll_ready` does nothing), and a clone is one `Arc`.
        Either::Right(self.edge.app.clone().call(request))
    }
}

/// The error a [`PacedBody`] ends with when its client sends too slowly.
#[derive(Debug, thiserror::Error)]
#[error("the request body arrived too slowly")]
pub struct BodyTooSlow;

impl BodyTooSlow {
    /// Whether `error`, or an error it wraps, is a [`BodyTooSlow`].
    pub fn is_cause_of(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut cause = Some(error);
        while let Some(error) = cause {
            if error.is::<BodyTooSlow>() {
                return true;
            }
            cause = error.source();
        }
        false
    }
}

/// A request body that must keep arriving: each frame within `timeout` of the previous one (or
/// of the head), and all of it within `timeout` plus its size at [`MIN_BODY_RATE`]. The size is
/// the `Content-Length` when there is one, else what has arrived so far, so a chunked body must
/// keep that average pace as it goes. Past either bound it fails with [`BodyTooSlow`].
pub struct PacedBody {
    inner: Incoming,
    timeout: Duration,
    started: Instant,
    last_frame: Instant,
    received: u64,
    declared: u64,
    /// Made on the first wait only: most bodies arrive with their head and never need one.
    timer: Option<Pin<Box<Sleep>>>,
}

impl PacedBody {
    fn new(inner: Incoming, timeout: Duration) -> PacedBody {
        let now = Instant::now();
        PacedBody {
            declared: inner.size_hint().exact().unwrap_or(0),
            inner,
            timeout,
            started: now,
            last_frame: now,
            received: 0,
            timer: None,
        }
    }

    fn deadline(&self) -> Instant {
        let size = self.declared.max(self.received);
        let whole = self.started
            + self.timeout
            + Duration::from_secs_f64(size as f64 / MIN_BODY_RATE as f64);
        (self.last_frame + self.timeout).min(whole)
    }
}

impl HttpBody for PacedBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                this.last_frame = Instant::now();
                let deadline = this.deadline();
                if let Some(timer) = &mut this.timer {
                    timer.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = this.deadline();
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTooSlow.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
