//! The text protocol's server: raw TCP connections (from `nc`, the load tool, ...) answered
//! through the same core as the REST routes.
//!
//! Each connection is served by one task that reads whatever has arrived, answers every complete
//! request in it in order, and writes all those answers with one `write` before reading again:
//! pipelined requests cost one read and one write per batch, not per request.
//!
//! Connections are never timed out for being idle, since a person at `nc` may think for a
//! while; a peer that vanished is found by TCP keepalive, and one that stops reading our answers
//! by a write timeout, and either frees its task. A connection's failure is logged and ends that
//! connection only. The number of connections is capped by a semaphore; further clients wait in
//! the listen backlog.

use std::time::Duration;

use bytes::BytesMut;
use shared::{
    connection::{tune_socket, WRITE_TIMEOUT},
    service::serve_connections,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{
    codec::{Decoder, Encoder},
    sync::CancellationToken,
};
use tracing::{debug, info, warn, Instrument};

use crate::{
    core::{Kv, KvError},
    store::{Condition, Write, WriteOutcome},
    text_protocol::{DecodeError, Frame, Reply, Request, RequestCodec},
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

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client stopped reading")]
    WriteTimeout,
}

/// Serves text connections on `listener` until `shutdown` is cancelled, then closes them.
pub async fn serve(listener: TcpListener, kv: Kv, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving the text protocol");
    }
    serve_connections(listener, &shutdown, |stream, peer| {
        let kv = kv.clone();
        let shutdown = shutdown.clone();
        async move {
            match serve_connection(stream, &kv, &shutdown).await {
                Ok(()) => debug!("connection closed"),
                Err(err) => debug!(%err, "connection failed"),
            }
        }
        .instrument(tracing::debug_span!("text_connection", %peer))
    })
    .await;
}

async fn serve_connection(
    mut stream: TcpStream,
    kv: &Kv,
    shutdown: &CancellationToken,
) -> Result<(), ConnectionError> {
    tune_socket(&stream);
    let mut codec = RequestCodec::new();
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    let mut frames = Vec::new();
    loop {
        let fatal = loop {
            match codec.decode(&mut input) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break None,
                Err(DecodeError::TooLong(reason)) => break Some(reason),
                Err(DecodeError::Io(err)) => return Err(err.into()),
            }
            if frames.len() >= MAX_BATCH {
                answer_all(kv, &mut frames, &mut codec, &mut output).await;
                if output.len() >= FLUSH_AT {
                    write(&mut stream, &mut output).await?;
                }
            }
        };
        answer_all(kv, &mut frames, &mut codec, &mut output).await;
        if let Some(reason) = fatal {
            debug!(%reason, "request over the limits; closing");
            encode(&mut codec, Reply::Err(&reason), &mut output);
            write(&mut stream, &mut output).await?;
            linger_and_close(stream).await;
            return Ok(());
        }
        write(&mut stream, &mut output).await?;

        input.reserve(READ_CHUNK);
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            read = stream.read_buf(&mut input) => read?,
        };
        if read == 0 {
            // The client closed its side; answer what it sent last (an incomplete request gets
            // an error), then close ours.
            while let Some(frame) = codec.decode_eof(&mut input).map_err(|err| match err {
                DecodeError::Io(err) => err,
                DecodeError::TooLong(reason) => std::io::Error::other(reason),
            })? {
                answer(kv, frame, &mut codec, &mut output).await;
            }
            write(&mut stream, &mut output).await?;
            let _ = stream.shutdown().await;
            return Ok(());
        }
    }
}

/// Answers a batch of requests, in order. With a store that queues its writes, each run of
/// consecutive puts and deletes goes to the store at once, so the run shares one commit rather
/// than waiting for a commit apiece; reads still see every write sent before them.
async fn answer_all(
    kv: &Kv,
    frames: &mut Vec<Frame>,
    codec: &mut RequestCodec,
    output: &mut BytesMut,
) {
    if !kv.queues_writes() {
        for frame in frames.drain(..) {
            answer(kv, frame, codec, output).await;
        }
        return;
    }
    let mut frames = frames.drain(..).peekable();
    while let Some(frame) = frames.next() {
        if !is_write(&frame) || frames.peek().is_none_or(|next| !is_write(next)) {
            answer(kv, frame, codec, output).await;
            continue;
        }
        let mut run = vec![frame];
        while let Some(next) = frames.next_if(is_write) {
            run.push(next);
        }
        answer_writes(kv, run, codec, output).await;
    }
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
            Ok(WriteOutcome::Put(_) | WriteOutcome::Delete(true)) => {
                encode(codec, Reply::Ok(key), output)
            }
            Ok(WriteOutcome::Delete(false)) => encode(codec, Reply::None(key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        }
    }
}

/// Runs one request through the core and encodes its answer.
async fn answer(kv: &Kv, frame: Frame, codec: &mut RequestCodec, output: &mut BytesMut) {
    let request = match frame {
        Frame::Request(request) => request,
        Frame::Malformed(reason) => return encode(codec, Reply::Err(&reason), output),
    };
    match request {
        Request::Get { key } => match kv.get(&key).await {
            Ok(Some(found)) => encode(codec, Reply::Value(&found.value), output),
            Ok(None) => encode(codec, Reply::None(&key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        },
        Request::Put { key, value } => match kv.put(&key, value, Condition::Always).await {
            Ok(_version) => encode(codec, Reply::Ok(&key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        },
        Request::Del { key } => match kv.delete(&key).await {
            Ok(true) => encode(codec, Reply::Ok(&key), output),
            Ok(false) => encode(codec, Reply::None(&key), output),
            Err(err) => encode(codec, Reply::Err(&reason(err)), output),
        },
    }
}

/// What a client is told about a failed request. Store failures are logged here and reported
/// without their internals.
fn reason(err: KvError) -> String {
    match err {
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
