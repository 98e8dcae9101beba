//! A reconnecting, multiplexed packet client.
//!
//! One [`PacketClient`] keeps one TCP connection to one node and lets any number of tasks have
//! requests in flight on it at once: each request gets a fresh `key`, and the reader task hands
//! each answer to whoever waits for that key. The connection is owned by a supervisor task with an
//! explicit [`State`]; when it drops, every waiter is told at once (no request waits for a timeout
//! on a dead connection) and the supervisor reconnects every [`RECONNECT_INTERVAL`].
//!
//! The handle is cheap to clone; when the last clone is dropped the supervisor stops and the
//! connection closes, which is how the gateway forgets a node that left the topology.
//!
//! Waiters live in a map behind a std `Mutex`, held only to insert or remove one entry and never
//! across an `.await`. A request abandoned by its caller (timeout, client gone) removes its entry
//! on drop, so nothing is left behind for it.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

use crate::{
    cluster::{self, ClusterSecret},
    codec::{encode_frame, CodecError, PacketCodec},
    connection::{queue_frame, tune_socket, write_frames, PacketReader, OUTGOING_CAPACITY},
    packet::{key_in, Params},
    service::MAX_KEYS_PER_PACKET,
    Packet,
};

/// How long the client waits before trying a lost connection again.
pub const RECONNECT_INTERVAL: Duration = Duration::from_secs(3);

/// How many events of one stream may be queued for a consumer that has not taken them yet.
/// A consumer that falls further behind is cut off ([`ClientError::Lagged`]).
pub const STREAM_BUFFER: usize = 256;

/// Which packet shapes the node speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Our protocol: the key at the top level, answers as packets.
    Packet,
    /// The original design: the key inside `params.key`, answers as flat objects
    /// `{key, errorcode, errormessage, ...}`.
    Legacy,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// There is no connection right now, or the request could not be written to it.
    #[error("not connected")]
    NotConnected,
    /// The connection closed while the request waited for its answer.
    #[error("connection closed before the answer arrived")]
    ConnectionClosed,
    /// A stream's consumer fell more than [`STREAM_BUFFER`] events behind and was cut off.
    #[error("stream consumer too slow")]
    Lagged,
    #[error("could not encode the request: {0}")]
    Encode(#[from] CodecError),
}

/// Handle to a reconnecting connection; see the module docs.
///
/// Requests are sent with [`Value`] params; answers arrive with params of type `P`: a parsed
/// [`Value`] by default, or [`crate::RawParams`] for a caller that passes them on unread.
pub struct PacketClient<P = Value> {
    handle: Arc<Handle<P>>,
}

impl<P> Clone for PacketClient<P> {
    fn clone(&self) -> Self {
        PacketClient {
            handle: self.handle.clone(),
        }
    }
}

struct Handle<P> {
    shared: Arc<Shared<P>>,
    /// Stops the supervisor when the last handle goes away.
    _close: DropGuard,
}

struct Shared<P> {
    addr: String,
    dialect: Dialect,
    /// With a secret, every connection starts with the cluster handshake.
    secret: Option<ClusterSecret>,
    state: Mutex<State<P>>,
    /// Tells `connected()` callers when a connection comes up.
    connected: watch::Sender<bool>,
    next_key: AtomicU64,
}

/// The supervisor's view of the connection.
enum State<P> {
    Disconnected,
    Connecting,
    Connected(Arc<Link<P>>),
}

/// One live connection: where to send frames and who waits for which key.
struct Link<P> {
    outgoing: mpsc::Sender<Bytes>,
    /// `None` once the connection is gone, so that no waiter can be added after the final drain.
    waiters: Mutex<Option<HashMap<u64, Waiter<P>>>>,
}

enum Waiter<P> {
    Once(oneshot::Sender<Packet<P>>),
    /// A [`PacketClient::call`] before its first answer. Most answers are one plain packet, so
    /// the channel for a stream's further events is made only when the first answer turns out to
    /// be one, and handed over with it.
    First(oneshot::Sender<FirstAnswer<P>>),
    Stream {
        /// Boxed: the channel allocates its slots in blocks, and a block of pointers is a small
        /// fraction of a block of packets, which matters with thousands of idle streams.
        events: mpsc::Sender<Box<Packet<P>>>,
        lagged: Arc<AtomicBool>,
    },
}

/// A call's first answer, with the rest of the stream when the answer is a stream's event.
type FirstAnswer<P> = (Packet<P>, Option<StreamEvents<P>>);

/// The events of a stream after its first, and whether the node got ahead of their consumer.
struct StreamEvents<P> {
    events: mpsc::Receiver<Box<Packet<P>>>,
    lagged: Arc<AtomicBool>,
}

impl PacketClient {
    /// Starts connecting to `addr` in the background and returns at once. Answers' params are
    /// parsed into [`Value`]s; [`PacketClient::connect_as`] chooses another type.
    pub fn connect(addr: impl Into<String>, dialect: Dialect) -> PacketClient {
        PacketClient::connect_as(addr, dialect)
    }
}

impl<P: Params> PacketClient<P> {
    /// Starts connecting to `addr` in the background and returns at once; answers' params
    /// arrive as `P`.
    pub fn connect_as(addr: impl Into<String>, dialect: Dialect) -> PacketClient<P> {
        PacketClient::connect_with_secret(addr, dialect, None)
    }

    /// [`PacketClient::connect_as`] in a cluster with a secret: each connection starts with the
    /// handshake ([`crate::cluster`]). An original-design node cannot do it, so a
    /// [`Dialect::Legacy`] connection never does.
    pub fn connect_with_secret(
        addr: impl Into<String>,
        dialect: Dialect,
        secret: Option<ClusterSecret>,
    ) -> PacketClient<P> {
        let close = CancellationToken::new();
        let shared = Arc::new(Shared {
            addr: addr.into(),
            dialect,
            secret: secret.filter(|_| dialect == Dialect::Packet),
            state: Mutex::new(State::Disconnected),
            connected: watch::channel(false).0,
            next_key: AtomicU64::new(1),
        });
        tokio::spawn(supervise(shared.clone(), close.clone()));
        PacketClient {
            handle: Arc::new(Handle {
                shared,
                _close: close.drop_guard(),
            }),
        }
    }

    pub fn is_connected(&self) -> bool {
        matches!(*self.shared().state.lock().unwrap(), State::Connected(_))
    }

    /// Waits until the connection is up. Use under a timeout: it waits for as long as it takes.
    pub async fn connected(&self) -> &PacketClient<P> {
        let mut connected = self.shared().connected.subscribe();
        // The sender lives in `Shared`, which we hold, so this cannot fail.
        let _ = connected.wait_for(|up| *up).await;
        self
    }

    /// Sends `packet` as a request (its key is assigned here) and waits for the answer.
    /// If the node answers with a stream, the first event is returned and the rest is cancelled.
    pub async fn request(&self, packet: Packet) -> Result<Packet<P>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let pending = self.send(packet, Waiter::Once(tx)).await?;
        let answer = rx.await.map_err(|_| ClientError::ConnectionClosed);
        drop(pending);
        answer
    }

    /// Sends `packet` as a stream request and returns the stream of answers. A node may also
    /// answer with one plain packet, which the stream then yields as its only item.
    pub async fn stream(&self, mut packet: Packet) -> Result<ResponseStream<P>, ClientError> {
        packet.stream = true;
        self.call(packet).await
    }

    /// Sends `packet` as it is (its key is assigned here) and returns every answer to it: one
    /// plain packet, or a stream's events up to its end. For callers that must take whatever the
    /// node answers, such as the gateway, which turns a stream into Server-Sent Events even when
    /// the request did not ask for one.
    pub async fn call(&self, packet: Packet) -> Result<ResponseStream<P>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let pending = self.send(packet, Waiter::First(tx)).await?;
        Ok(ResponseStream {
            pending: Some(pending),
            answers: Answers::First(rx),
            finished: false,
        })
    }

    fn shared(&self) -> &Shared<P> {
        &self.handle.shared
    }

    async fn send(&self, mut packet: Packet, waiter: Waiter<P>) -> Result<Pending<P>, ClientError> {
        let link = match &*self.shared().state.lock().unwrap() {
            State::Connected(link) => link.clone(),
            State::Disconnected | State::Connecting => return Err(ClientError::NotConnected),
        };
        let key = self.shared().next_key.fetch_add(1, Ordering::Relaxed);
        match self.shared().dialect {
            Dialect::Packet => packet.key = key,
            Dialect::Legacy => put_legacy_key(&mut packet, key),
        }
        let frame = encode_frame(&packet)?;
        link.waiters
            .lock()
            .unwrap()
            .as_mut()
            .ok_or(ClientError::NotConnected)?
            .insert(key, waiter);
        let pending = Pending {
            link,
            key,
            method: packet.method,
            uri: packet.uri,
        };
        pending
            .link
            .outgoing
            .send(frame)
            .await
            .map_err(|_| ClientError::NotConnected)?;
        Ok(pending)
    }
}

/// A request in flight: removes its waiter when dropped, whatever happened to the request.
struct Pending<P> {
    link: Arc<Link<P>>,
    key: u64,
    method: String,
    uri: String,
}

impl<P> Pending<P> {
    /// Tells the node we no longer want the stream with this key.
    fn cancel(&self) {
        if let Some(frame) = cancel_frame(&self.uri, &self.method, self.key) {
            queue_frame(&self.link.outgoing, frame);
        }
    }
}

impl<P> Drop for Pending<P> {
    fn drop(&mut self) {
        if let Some(waiters) = self.link.waiters.lock().unwrap().as_mut() {
            waiters.remove(&self.key);
        }
    }
}

/// The answers to a stream request, in order. Dropping it before the end cancels the stream.
pub struct ResponseStream<P = Value> {
    // Dropped before `answers`: the waiter is gone before the first answer's channel closes.
    pending: Option<Pending<P>>,
    answers: Answers<P>,
    finished: bool,
}

/// Where a [`ResponseStream`]'s next answer comes from.
enum Answers<P> {
    First(oneshot::Receiver<FirstAnswer<P>>),
    Rest(StreamEvents<P>),
}

impl<P> ResponseStream<P> {
    /// The next answer. `None` after the final packet (`end: true`, or a plain answer);
    /// an error when the connection closed or this consumer fell behind before that.
    pub async fn next(&mut self) -> Option<Result<Packet<P>, ClientError>> {
        if self.finished {
            return None;
        }
        let rest = match &mut self.answers {
            Answers::First(first) => {
                return match first.await {
                    Ok((packet, Some(rest))) => {
                        self.answers = Answers::Rest(rest);
                        Some(Ok(packet))
                    }
                    Ok((packet, None)) => {
                        self.finish();
                        Some(Ok(packet))
                    }
                    Err(_) => {
                        self.finish();
                        Some(Err(ClientError::ConnectionClosed))
                    }
                };
            }
            Answers::Rest(rest) => rest,
        };
        match rest.events.recv().await {
            Some(packet) => {
                if is_final(&packet) {
                    self.finish();
                }
                Some(Ok(*packet))
            }
            None => {
                let lagged = rest.lagged.load(Ordering::Relaxed);
                if lagged {
                    if let Some(pending) = &self.pending {
                        pending.cancel();
                    }
                }
                self.finish();
                Some(Err(if lagged {
                    ClientError::Lagged
                } else {
                    ClientError::ConnectionClosed
                }))
            }
        }
    }

    fn finish(&mut self) {
        self.finished = true;
        self.pending = None;
    }
}

impl<P> Drop for ResponseStream<P> {
    fn drop(&mut self) {
        if let Some(pending) = &self.pending {
            pending.cancel();
        }
    }
}

/// True for the last packet a key will get: a stream's end marker, or any non-stream answer.
fn is_final<P>(packet: &Packet<P>) -> bool {
    packet.end || !packet.stream
}

fn put_legacy_key(packet: &mut Packet, key: u64) {
    if !packet.params.is_object() {
        packet.params = Value::Object(Default::default());
    }
    packet.params["key"] = key.into();
}

/// Turns an original-design flat answer `{key, errorcode, errormessage, ...}` into a packet
/// whose params are the flat object less `key`.
fn legacy_answer(mut flat: Value) -> Option<Packet> {
    let key = key_in(&flat)?;
    let failed = flat
        .get("errorcode")
        .is_some_and(|code| !(code.is_null() || code == 0 || code == "0"));
    if let Some(object) = flat.as_object_mut() {
        object.remove("key");
    }
    Some(Packet {
        key,
        params: flat,
        status: failed.then_some(500),
        ..Packet::default()
    })
}

/// Owns the connection: connects, runs it until it drops, and tries again.
async fn supervise<P: Params>(shared: Arc<Shared<P>>, close: CancellationToken) {
    loop {
        *shared.state.lock().unwrap() = State::Connecting;
        let connect = TcpStream::connect(shared.addr.as_str());
        let result = tokio::select! {
            _ = close.cancelled() => break,
            result = connect => result,
        };
        match result {
            Ok(stream) => {
                debug!(addr = %shared.addr, "connected");
                run_connection(&shared, stream, &close).await;
                info!(addr = %shared.addr, "connection lost");
            }
            Err(err) => debug!(addr = %shared.addr, %err, "connect failed"),
        }
        *shared.state.lock().unwrap() = State::Disconnected;
        shared.connected.send_replace(false);
        tokio::select! {
            _ = close.cancelled() => break,
            _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
        }
    }
    *shared.state.lock().unwrap() = State::Disconnected;
}

async fn run_connection<P: Params>(
    shared: &Shared<P>,
    stream: TcpStream,
    close: &CancellationToken,
) {
    tune_socket(&stream);
    let (mut read_half, mut write_half) = stream.into_split();
    let buffered = match &shared.secret {
        Some(secret) => match cluster::connect(&mut read_half, &mut write_half, secret).await {
            Ok(buffered) => buffered,
            Err(err) => {
                warn!(addr = %shared.addr, %err, "cluster handshake failed");
                return;
            }
        },
        None => BytesMut::new(),
    };
    let (outgoing, frames) = mpsc::channel(OUTGOING_CAPACITY);
    let link = Arc::new(Link {
        outgoing,
        waiters: Mutex::new(Some(HashMap::new())),
    });
    let mut writer = tokio::spawn(write_frames(write_half, frames));
    *shared.state.lock().unwrap() = State::Connected(link.clone());
    shared.connected.send_replace(true);

    // The connection is over when either half fails: a node that stopped reading makes the
    // writer time out even while its socket still looks readable.
    tokio::select! {
        _ = close.cancelled() => {}
        _ = read_answers(shared.dialect, read_half, buffered, &link) => {}
        _ = &mut writer => {}
    }

    // Dropping the waiters wakes every caller still waiting on this connection with an error.
    link.waiters.lock().unwrap().take();
    writer.abort();
}

async fn read_answers<P: Params>(
    dialect: Dialect,
    read_half: impl tokio::io::AsyncRead + Unpin,
    buffered: BytesMut,
    link: &Link<P>,
) {
    match dialect {
        Dialect::Packet => {
            let mut reader =
                PacketReader::with_buffer(read_half, buffered, PacketCodec::<Packet<P>>::new());
            while let Some(frame) = reader.next().await {
                match frame {
                    Ok(packet) => deliver(link, packet),
                    Err(err) => {
                        if !handle_bad_frame(link, err) {
                            return;
                        }
                    }
                }
            }
        }
        Dialect::Legacy => {
            let mut reader = PacketReader::new(read_half, PacketCodec::<Value>::new());
            while let Some(frame) = reader.next().await {
                match frame {
                    Ok(flat) => match legacy_answer(flat) {
                        Some(packet) => deliver(link, packet.map_params(P::from_value)),
                        None => warn!("answer without a key from an original-design node"),
                    },
                    Err(err) => {
                        if !handle_bad_frame(link, err) {
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// Answers the waiter of a malformed answer with a 502; returns false if the connection is done.
fn handle_bad_frame<P: Params>(link: &Link<P>, err: CodecError) -> bool {
    warn!(%err, "bad frame from node");
    if let CodecError::Json { key: Some(key), .. } = &err {
        let packet = Packet {
            key: *key,
            status: Some(502),
            error: Some(format!("invalid answer from the node: {err}")),
            ..Packet::default()
        };
        deliver(link, packet);
    }
    err.is_recoverable()
}

/// Hands an answer to the task waiting for its key; a multicast event (`keys`) to the task of
/// each of its streams, as if each had come alone.
fn deliver<P: Clone>(link: &Link<P>, mut packet: Packet<P>) {
    let mut waiters = link.waiters.lock().unwrap();
    let Some(waiters) = waiters.as_mut() else {
        return;
    };
    let keys = std::mem::take(&mut packet.keys);
    if keys.len() > MAX_KEYS_PER_PACKET {
        // Past the protocol's bound: one packet must not fan out into unbounded work here.
        warn!(
            keys = keys.len(),
            "multicast packet naming too many streams; dropped"
        );
        return;
    }
    let Some((last, others)) = keys.split_last() else {
        return deliver_one(link, waiters, packet);
    };
    for key in others {
        let copy = Packet {
            key: *key,
            ..packet.clone()
        };
        deliver_one(link, waiters, copy);
    }
    packet.key = *last;
    deliver_one(link, waiters, packet);
}

fn deliver_one<P>(link: &Link<P>, waiters: &mut HashMap<u64, Waiter<P>>, packet: Packet<P>) {
    let key = packet.key;
    let final_packet = is_final(&packet);
    match waiters.get(&key) {
        Some(Waiter::Once(_)) => {
            if let Some(Waiter::Once(tx)) = waiters.remove(&key) {
                if !final_packet {
                    // `request` takes only the first packet of a stream. Stop the rest now: the
                    // next event, which would otherwise trigger the cancel, may never come.
                    send_cancel(link, &packet);
                }
                let _ = tx.send(packet);
            }
        }
        Some(Waiter::First(_)) => {
            if let Some(Waiter::First(first)) = waiters.remove(&key) {
                if final_packet {
                    let _ = first.send((packet, None));
                    return;
                }
                let (events, rest) = mpsc::channel(STREAM_BUFFER);
                let lagged = Arc::new(AtomicBool::new(false));
                let rest = StreamEvents {
                    events: rest,
                    lagged: lagged.clone(),
                };
                // A consumer gone already cancelled the stream when it dropped it.
                if first.send((packet, Some(rest))).is_ok() {
                    waiters.insert(key, Waiter::Stream { events, lagged });
                }
            }
        }
        Some(Waiter::Stream { events, lagged }) => {
            match events.try_send(Box::new(packet)) {
                Ok(()) if !final_packet => return,
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => lagged.store(true, Ordering::Relaxed),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
            waiters.remove(&key);
        }
        None if !final_packet => {
            // A stream nobody reads any more (its consumer left, or asked with `request`):
            // tell the node to stop it.
            debug!(key, "event for an abandoned stream; cancelling");
            send_cancel(link, &packet);
        }
        None => {}
    }
}

/// Asks the node to stop the stream `packet` belongs to. Queued like a dropped stream's cancel:
/// with a full outgoing queue, a cancel that was not sent would leave the stream running at the
/// node when no further event comes to trigger another.
fn send_cancel<P>(link: &Link<P>, packet: &Packet<P>) {
    if let Some(frame) = cancel_frame(&packet.uri, &packet.method, packet.key) {
        queue_frame(&link.outgoing, frame);
    }
}

/// The cancel packet for the stream with `key`.
fn cancel_frame(uri: &str, method: &str, key: u64) -> Option<Bytes> {
    let cancel: Packet = Packet {
        uri: uri.to_owned(),
        method: method.to_owned(),
        key,
        cancel: true,
        ..Packet::default()
    };
    encode_frame(&cancel).ok()
}
