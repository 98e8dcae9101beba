//! Reading and writing packets on one TCP connection.
//!
//! Every packet connection in the system, whichever side opened it, has the same two halves:
//! - a [`PacketReader`] that owns the read half and the receive buffer and hands out decoded
//!   frames one at a time. Unlike `FramedRead`, it keeps going after a bad frame: a peer that sends
//!   one malformed packet gets an error for it, not a dropped connection;
//! - a writer task ([`write_frames`]) that owns the write half and drains a channel of encoded
//!   frames. Callers encode on their own task (spreading the JSON work over cores) and the writer
//!   batches whatever is queued into one `write` call, so many small answers cost one syscall.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_util::codec::Decoder;

use crate::codec::{CodecError, PacketCodec};

/// How many encoded frames may wait for the writer before senders wait too.
pub const OUTGOING_CAPACITY: usize = 1024;

/// The room a reader's buffer starts with. A read takes whatever has arrived up to the room
/// left, so this bounds how many packets one `read` can bring in: a buffer only as large as one
/// packet would cost a system call per packet on a connection that receives them in batches.
const READ_BUFFER_CAPACITY: usize = 8 * 1024;

/// Batches are written once they reach this size, even if more frames are queued.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// How long a single write may block before the peer is considered gone. A peer that stopped
/// reading (frozen process, vanished host) otherwise holds our writer forever.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Decodes packets from a byte stream, one at a time, recovering from bad frames.
pub struct PacketReader<R, T = crate::Packet> {
    reader: R,
    buffer: BytesMut,
    codec: PacketCodec<T>,
}

impl<R: AsyncRead + Unpin, T: DeserializeOwned> PacketReader<R, T> {
    pub fn new(reader: R, codec: PacketCodec<T>) -> Self {
        PacketReader {
            reader,
            buffer: BytesMut::with_capacity(READ_BUFFER_CAPACITY),
            codec,
        }
    }

    /// A reader that starts with `buffer`, bytes already read off `reader` (past a handshake).
    /// The buffer is given the room of a new reader's: what a handshake leaves is often an empty
    /// buffer with no room at all, which would otherwise grow only to the first packet's size.
    pub fn with_buffer(reader: R, mut buffer: BytesMut, codec: PacketCodec<T>) -> Self {
        buffer.reserve(READ_BUFFER_CAPACITY.saturating_sub(buffer.len()));
        PacketReader {
            reader,
            buffer,
            codec,
        }
    }

    /// The bytes read but not yet decoded, for the connection's next reader.
    pub fn into_buffer(self) -> BytesMut {
        self.buffer
    }

    /// The next frame: `None` once the peer closed cleanly, `Some(Err)` for a frame that could not
    /// be decoded. After an error for which [`CodecError::is_recoverable`] holds, reading can go on.
    pub async fn next(&mut self) -> Option<Result<T, CodecError>> {
        loop {
            match self.codec.decode(&mut self.buffer) {
                Ok(Some(item)) => return Some(Ok(item)),
                Ok(None) => {}
                Err(err) => return Some(Err(err)),
            }
            match self.reader.read_buf(&mut self.buffer).await {
                Ok(0) => return self.codec.decode_eof(&mut self.buffer).transpose(),
                Ok(_) => {}
                Err(err) => return Some(Err(err.into())),
            }
        }
    }
}

/// Writes the frames sent on `frames` until every sender is gone, batching queued frames.
/// Fails when a write fails or blocks for longer than [`WRITE_TIMEOUT`].
///
/// What a connection holds stays in proportion to what is queued on it, never to what it once
/// sent: a frame on its own, or one too large to be worth copying, is written straight from its
/// `Bytes` (which may be shared, as the distributor's topology is by every node), and a batch
/// buffer that grew past a few kilobytes is let go after its write. A buffer that kept the
/// capacity of the largest batch ever written would cost every connection that much for as long
/// as it lives: thousands of distributor connections times the topology's size.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::Receiver<Bytes>,
) -> std::io::Result<()> {
    /// Frames at least this large are written from their own buffer, not copied into a batch.
    const DIRECT_WRITE_BYTES: usize = 16 * 1024;
    /// The most capacity a batch buffer keeps between writes.
    const KEPT_BATCH_CAPACITY: usize = 16 * 1024;

    async fn write_within_timeout<W: AsyncWrite + Unpin>(
        writer: &mut W,
        bytes: &[u8],
    ) -> std::io::Result<()> {
        tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(bytes))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "peer stopped reading")
            })?
    }

    let mut batch = BytesMut::new();
    while let Some(mut frame) = frames.recv().await {
        if frames.is_empty() {
            // Under load, the tasks about to queue the next frames are already runnable: letting
            // them run first turns many one-frame writes into one write (one syscall instead of
            // dozens). When idle this costs one trip through the scheduler.
            tokio::task::yield_now().await;
        }
        loop {
            let alone = batch.is_empty() && frames.is_empty();
            if alone || frame.len() >= DIRECT_WRITE_BYTES {
                // Keep the order: what is batched goes first.
                if !batch.is_empty() {
                    write_within_timeout(&mut writer, &batch).await?;
                    batch.clear();
                }
                write_within_timeout(&mut writer, &frame).await?;
            } else {
                batch.extend_from_slice(&frame);
                if batch.len() >= MAX_BATCH_BYTES {
                    write_within_timeout(&mut writer, &batch).await?;
                    batch.clear();
                }
            }
            match frames.try_recv() {
                Ok(next) => frame = next,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_within_timeout(&mut writer, &batch).await?;
            batch.clear();
        }
        if batch.capacity() > KEPT_BATCH_CAPACITY {
            batch = BytesMut::new();
        }
    }
    writer.shutdown().await
}

/// Queues `frame` without waiting when the channel has room, and from a task of its own when it
/// has not, so that the caller never waits: for frames sent from `Drop` (a cancel) or from a
/// task that must not hold a waiting send while it lives (a stream's end packet).
pub fn queue_frame(outgoing: &mpsc::Sender<Bytes>, frame: Bytes) {
    if let Err(mpsc::error::TrySendError::Full(frame)) = outgoing.try_send(frame) {
        let outgoing = outgoing.clone();
        tokio::spawn(async move { outgoing.send(frame).await });
    }
}

/// Sets the socket options every connection of the workspace wants (packet, text protocol and
/// the gateway's HTTP): no Nagle delay (requests and answers are small and latency-bound), and
/// TCP keepalive so a vanished peer is eventually noticed even on a connection that is otherwise
/// idle, such as an event stream waiting for its next event.
pub fn tune_socket(stream: &TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "set_nodelay failed");
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(3))
        .with_retries(3);
    if let Err(err) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%err, "set_tcp_keepalive failed");
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::io::ReadBuf;

    use super::*;
    use crate::{codec::encode_frame, Packet};

    /// Bytes that have all arrived, handed out as a socket would: as many as the read has room
    /// for. Counts the reads.
    struct Arrived {
        bytes: Vec<u8>,
        reads: usize,
    }

    impl AsyncRead for Arrived {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads += 1;
            let taken = buf.remaining().min(self.bytes.len());
            let rest = self.bytes.split_off(taken);
            buf.put_slice(&std::mem::replace(&mut self.bytes, rest));
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_reader_past_a_handshake_takes_a_batch_of_packets_in_one_read() {
        let mut bytes = Vec::new();
        for key in 1..=20 {
            let packet = Packet {
                key,
                ..Packet::request("GET", "/kv", serde_json::json!({"params": "hello"}))
            };
            bytes.extend_from_slice(&encode_frame(&packet).unwrap());
        }
        let arrived = Arrived { bytes, reads: 0 };
        // What a connection without a handshake secret passes on: an empty buffer.
        let mut reader = PacketReader::with_buffer(arrived, BytesMut::new(), PacketCodec::new());
        for key in 1..=20 {
            let packet: Packet = reader.next().await.unwrap().unwrap();
            assert_eq!(packet.key, key);
        }
        assert_eq!(reader.reader.reads, 1);
    }
}
