//! The text protocol's server: raw TCP connections (from `nc`, the load tool, ...) answered
//! through the same core as the REST routes.
//!
//! Each connection is served by one task that reads whatever has arrived, answers every complete
//! request in it in order, and writes all those answers with one `write` before reading again:
//! pipelined requests cost one read and one write per batch, not per request.
//!
//! Who may do what. With a JWT key ([`TextConfig::tokens`]) a connection must first send
//! `auth<TOKEN>`, as Redis clients send AUTH: a good token is answered `ok<SUBJECT>` and its
//! scopes decide the rest (`get` needs `kv:read`, `put` and `del` `kv:write`, `admin` implies
//! both); any other command before it is answered `err<...>`, and the third refused token closes
//! the connection. Because requests are answered in order, `auth<T>put<a,1>get<a>` works in one
//! write. Without a key nobody authenticates, and the port serves loopback clients only unless
//! `--insecure` (protected mode, see config.rs). Tokens are never logged, only why one was
//! refused.
//!
//! Connections end by themselves: one that sends nothing for `idle_timeout` is closed, and so is
//! one that has not authenticated `auth_timeout` after it opened, so silent or anonymous
//! connections cannot hold the connection slots that real clients need. A peer that vanished is
//! also found by TCP keepalive, and one that stops reading our answers by a write timeout. The
//! number of connections is capped overall and per client address. A connection's failure is
//! logged and ends that connection only.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::BytesMut;
use shared::{
    connection::{tune_socket, WRITE_TIMEOUT},
    packet::Identity,
    server::serve_connections,
    token::TokenVerifier,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::{
    codec::{Decoder, Encoder},
    sync::CancellationToken,
};
use tracing::{debug, info, warn, Instrument};

use crate::{
    config::TextConfig,
    core::{Kv, KvError},
    store::{Condition, StoreError, StoreFailure, Write, WriteOutcome},
    text_protocol::{DecodeError, Frame, Reply, Request, RequestCodec, Token},
    READ_SCOPE, WRITE_SCOPE,
};

/// Room made in the input buffer before each read.
const READ_CHUNK: usize = 16 * 1024;

/// Requests decoded before they are answered, at most.
const MAX_BATCH: usize = 256;

/// Answers are written once this many bytes are waiting, even in the middle of a batch, so a
/// long pipeline does not pile up answers in memory.
const FLUSH_AT: usize = 64 * 1024;

/// After a fatal error the connection reads (and drops) what the client still sends for this
/// long before closing, so the closing `err<...>` is not lost to a TCP reset.
const LINGER: Duration = Duration::from_secs(1);

/// Refused tokens a connection may send; the last one closes it.
pub const MAX_FAILED_AUTHS: u32 = 3;

/// The answer to a command sent before a good `auth<TOKEN>`.
pub const AUTH_REQUIRED: &str = "authentication required: send auth<TOKEN> first";

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client stopped reading")]
    WriteTimeout,
}

/// Serves text connections on `listener` until `shutdown` is cancelled, then closes them.
pub async fn serve(listener: TcpListener, kv: Kv, config: TextConfig, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(
            %addr,
            authentication = config.tokens.is_some(),
            loopback_only = config.limits.loopback_only,
            max_connections_per_ip = config.limits.max_per_ip,
            idle_timeout = %humantime::format_duration(config.idle_timeout),
            "serving the text protocol"
        );
    }
    let config = Arc::new(config);
    serve_connections(listener, config.limits, &shutdown, |stream, peer| {
        let kv = kv.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        async move {
            match serve_connection(stream, peer, &kv, &config, &shutdown).await {
                Ok(()) => debug!("connection closed"),
                Err(err) => debug!(%err, "connection failed"),
            }
        }
        .instrument(tracing::debug_span!("text_connection", %peer))
    })
    .await;
}

/// Whether a connection goes on after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Too many refused tokens: answer what is answered so far, then close.
    Close,
}

/// One connection's authentication state.
struct Session {
    tokens: Option<Arc<TokenVerifier>>,
    /// The caller a good token named; `None` before one (or after a refused one).
    identity: Option<Identity>,
    failed_auths: u32,
    peer: SocketAddr,
}

impl Session {
    fn new(config: &TextConfig, peer: SocketAddr) -> Session {
        Session {
            tokens: config.tokens.clone(),
            identity: None,
            failed_auths: 0,
            peer,
        }
    }

    /// True while the connection must still authenticate before it may do anything.
    fn awaits_auth(&self) -> bool {
        self.tokens.is_some() && self.identity.is_none()
    }

    /// Why `request` is refused, if it is.
    fn refusal(&self, request: &Request) -> Option<String> {
        let (command, scope) = match request {
            Request::Auth { .. } => return None,
            Request::Get { .. } => ("get", READ_SCOPE),
            Request::Put { .. } => ("put", WRITE_SCOPE),
            Request::Del { .. } => ("del", WRITE_SCOPE),
        };
        self.tokens.as_ref()?;
        match &self.identity {
            None => Some(AUTH_REQUIRED.to_owned()),
            Some(identity) if !identity.has_scope(scope) => {
                debug!(subject = ?identity.sub, scope, "refused a command without its scope");
                Some(format!("{command} needs scope {scope}"))
            }
            Some(_) => None,
        }
    }

    /// True when puts and deletes are allowed, so a run of them may go to the store at once.
    fn may_write(&self) -> bool {
        self.tokens.is_none()
            || self
                .identity
                .as_ref()
                .is_some_and(|identity| identity.has_scope(WRITE_SCOPE))
    }

    /// Checks `token` and answers it.
    fn authenticate(
        &mut self,
        token: &Token,
        codec: &mut RequestCodec,
        output: &mut BytesMut,
    ) -> Flow {
        let Some(tokens) = &self.tokens else {
            encode(
                codec,
                Reply::Err("authentication is not enabled on this server"),
                output,
            );
            return Flow::Continue;
        };
        match tokens.verify(token.expose()) {
            Ok(identity) => {
                debug!(subject = ?identity.sub, "authenticated");
                encode(
                    codec,
                    Reply::Ok(identity.sub.as_deref().unwrap_or("")),
                    output,
                );
                self.identity = Some(identity);
                Flow::Continue
            }
            Err(err) => {
                // A refused token also ends an earlier authentication: whoever holds the
                // connection now is not known to be its first owner.
                self.identity = None;
                self.failed_auths += 1;
                warn!(peer = %self.peer, reason = %err, attempt = self.failed_auths,
                    "refused a token on the text port");
                if self.failed_auths >= MAX_FAILED_AUTHS {
                    let reason = format!("{err}; too many failed attempts, closing");
                    encode(codec, Reply::Err(&reason), output);
                    return Flow::Close;
                }
                encode(codec, Reply::Err(&err.to_string()), output);
                Flow::Continue
            }
        }
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    kv: &Kv,
    config: &TextConfig,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    tune_socket(&stream);
    let mut session = Session::new(config, peer);
    let auth_deadline = Instant::now() + config.auth_timeout;
    let mut codec = RequestCodec::new();
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    let mut frames = Vec::new();
    loop {
        let mut flow = Flow::Continue;
        let too_long = loop {
            match codec.decode(&mut input) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break None,
                Err(DecodeError::TooLong(reason)) => break Some(reason),
                Err(DecodeError::Io(err)) => return Err(err.into()),
            }
            if frames.len() >= MAX_BATCH {
                flow = answer_all(kv, &mut session, &mut frames, &mut codec, &mut output).await;
                if flow == Flow::Close {
                    break None;
                }
                if output.len() >= FLUSH_AT {
                    write(&mut stream, &mut output).await?;
                }
            }
        };
        if flow == Flow::Continue {
            flow = answer_all(kv, &mut session, &mut frames, &mut codec, &mut output).await;
        }
        if flow == Flow::Close {
            debug!("too many refused tokens; closing");
            return close_after_error(stream, &mut output).await;
        }
        if let Some(reason) = too_long {
            debug!(%reason, "request over the limits; closing");
            encode(&mut codec, Reply::Err(&reason), &mut output);
            return close_after_error(stream, &mut output).await;
        }
        write(&mut stream, &mut output).await?;

        // The client has until the earlier of its idle deadline and, while it has not
        // authenticated, its authentication deadline to send something.
        let idle_deadline = Instant::now() + config.idle_timeout;
        let (deadline, why) = if session.awaits_auth() && auth_deadline <= idle_deadline {
            let why = format!(
                "closing: not authenticated within {}",
                humantime::format_duration(config.auth_timeout)
            );
            (auth_deadline, why)
        } else {
            let why = format!(
                "closing: idle for {}",
                humantime::format_duration(config.idle_timeout)
            );
            (idle_deadline, why)
        };
        input.reserve(READ_CHUNK);
        let read = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep_until(deadline) => {
                debug!(reason = %why, "closing a connection");
                encode(&mut codec, Reply::Err(&why), &mut output);
                write(&mut stream, &mut output).await?;
                let _ = stream.shutdown().await;
                return Ok(());
            }
            read = stream.read_buf(&mut input) => read?,
        };
        if read == 0 {
            // The client closed its side; answer what it sent last (an incomplete request gets
            // an error), then close ours.
            while let Some(frame) = codec.decode_eof(&mut input).map_err(|err| match err {
                DecodeError::Io(err) => err,
                DecodeError::TooLong(reason) => std::io::Error::other(reason),
            })? {
                if answer(kv, &mut session, frame, &mut codec, &mut output).await == Flow::Close {
                    break;
                }
            }
            write(&mut stream, &mut output).await?;
            let _ = stream.shutdown().await;
            return Ok(());
        }
    }
}

/// Writes the answers so far (the last of them says why the connection ends) and closes.
async fn close_after_error(
    mut stream: TcpStream,
    output: &mut BytesMut,
) -> Result<(), ConnectionError> {
    write(&mut stream, output).await?;
    linger_and_close(stream).await;
    Ok(())
}

/// Answers a batch of requests, in order. With a store that queues its writes, each run of
/// consecutive puts and deletes goes to the store at once, so the run shares one commit rather
/// than waiting for a commit apiece; reads still see every write sent before them. A run holds
/// no `auth`, so the connection may make all of its writes or none.
async fn answer_all(
    kv: &Kv,
    session: &mut Session,
    frames: &mut Vec<Frame>,
    codec: &mut RequestCodec,
    output: &mut BytesMut,
) -> Flow {
    let batches_writes = kv.queues_writes();
    let mut frames = frames.drain(..).peekable();
    while let Some(frame) = frames.next() {
        let starts_run = batches_writes
            && is_write(&frame)
            && frames.peek().is_some_and(is_write)
            && session.may_write();
        if !starts_run {
            if answer(kv, session, frame, codec, output).await == Flow::Close {
                return Flow::Close;
            }
            continue;
        }
        let mut run = vec![frame];
        while let Some(next) = frames.next_if(is_write) {
            run.push(next);
        }
        answer_writes(kv, run, codec, output).await;
    }
    Flow::Continue
}

fn is_write(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Request(Request::Put { .. } | Request::Del { .. })
    )
}

async fn answer_writes(kv: &Kv, run: Vec<Frame>, codec: &mut RequestCodec, output: &mut BytesMut) {
    let mut keys = Vec::with_capacity(run.len());
    let writes: Vec<Write> = run
        .into_iter()
        .map(|frame| match frame {
            Frame::Request(Request::Put { key, value }) => {
                keys.push(key.clone());
                Write::Put {
                    key,
                    value,
                    condition: Condition::Always,
                    expires_at: None,
                }
            }
            Frame::Request(Request::Del { key }) => {
                keys.push(key.clone());
                Write::Delete { key }
            }
            _ => unreachable!("only writes are in a run"),
        })
        .collect();
    for (key, result) in keys.iter().zip(kv.write_batch(writes).await) {
        match result {
            Ok(WriteOutcome::Delete(None)) => encode(codec, Reply::None(key), output),
            Ok(_) => encode(codec, Reply::Ok(key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        }
    }
}

/// Runs one request through the session's checks and the core, and encodes its answer.
async fn answer(
    kv: &Kv,
    session: &mut Session,
    frame: Frame,
    codec: &mut RequestCodec,
    output: &mut BytesMut,
) -> Flow {
    let request = match frame {
        Frame::Request(request) => request,
        Frame::Malformed(reason) => {
            encode(codec, Reply::Err(&reason), output);
            return Flow::Continue;
        }
    };
    if let Some(refusal) = session.refusal(&request) {
        encode(codec, Reply::Err(&refusal), output);
        return Flow::Continue;
    }
    match request {
        Request::Auth { token } => return session.authenticate(&token, codec, output),
        Request::Get { key } => match kv.get(&key).await {
            Ok(Some(found)) => encode(codec, Reply::Value(&found.value), output),
            Ok(None) => encode(codec, Reply::None(&key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        },
        Request::Put { key, value } => match kv.put(&key, value, Condition::Always, None).await {
            Ok(_written) => encode(codec, Reply::Ok(&key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        },
        Request::Del { key } => match kv.delete(&key).await {
            Ok(Some(_revision)) => encode(codec, Reply::Ok(&key), output),
            Ok(None) => encode(codec, Reply::None(&key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        },
    }
    Flow::Continue
}

/// What a client is told about a failed request. Store failures are logged here and reported
/// without their internals.
fn reason(err: KvError) -> String {
    match err {
        KvError::Store(StoreError::Failed(StoreFailure::Unavailable(err))) => {
            debug!(%err, "store unavailable");
            "store unavailable".to_owned()
        }
        KvError::Store(StoreError::Failed(StoreFailure::OutcomeUnknown(err))) => {
            warn!(%err, "store error");
            "outcome unknown".to_owned()
        }
        KvError::Store(err) => {
            warn!(%err, "store error");
            "store unavailable".to_owned()
        }
        err => err.to_string(),
    }
}

fn encode(codec: &mut RequestCodec, reply: Reply<'_>, output: &mut BytesMut) {
    // Encoding into memory cannot fail.
    let _ = codec.encode(reply, output);
}

async fn write(stream: &mut TcpStream, output: &mut BytesMut) -> Result<(), ConnectionError> {
    if output.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(output))
        .await
        .map_err(|_| ConnectionError::WriteTimeout)??;
    output.clear();
    Ok(())
}

/// Closes our side, then drops whatever the client still sends for a moment: closing a socket
/// with unread input makes the kernel send a reset, which can destroy the answer just written
/// before the client reads it.
async fn linger_and_close(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; READ_CHUNK];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(read) = stream.read(&mut sink).await {
            if read == 0 {
                break;
            }
        }
    })
    .await;
}
