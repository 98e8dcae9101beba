//! Sending one event to many streams at once.
//!
//! A service that fans one event out to thousands of streams (notice-service's subscribers)
//! would otherwise wake each stream's task to encode and queue a packet of its own, and the
//! caller would decode each of those packets again. A caller that sets `multicast` on its stream
//! request takes instead one packet per connection whose `keys` list every stream it is for;
//! [`multicast`] builds and queues those packets from wherever the event is produced, without
//! waiting and without waking the streams' tasks.
//!
//! The order of a stream's events holds as long as whoever multicasts to a stream does so only
//! once the stream's own task has queued everything it sent before (the frames go into the same
//! per-connection queue as [`super::EventSink::send`]'s).

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{Event, EventSink};
use crate::{codec::encode_frame, Packet};

/// The most keys one packet carries; more streams on one connection get several packets. It
/// bounds a packet's size (a key is up to 20 characters) and what the receiver does per packet.
pub const MAX_KEYS_PER_PACKET: usize = 1024;

/// Where a stream's events can be sent from outside its handler, together with other streams
/// of the same connection.
#[derive(Clone)]
pub struct StreamAddress {
    reply: Arc<Packet>,
    outgoing: mpsc::Sender<Bytes>,
}

impl StreamAddress {
    /// The address of the stream `request` opened, on a connection whose outgoing frames are
    /// queued on `outgoing`. The runtime hands these out ([`EventSink::address`]); tests make
    /// their own.
    pub fn new(request: &Packet, outgoing: mpsc::Sender<Bytes>) -> StreamAddress {
        StreamAddress {
            reply: Arc::new(Packet::reply_to(request, serde_json::Value::Null)),
            outgoing,
        }
    }

    pub fn key(&self) -> u64 {
        self.reply.key
    }
}

impl EventSink {
    /// This stream's address for [`multicast`], when its caller takes multicast packets.
    pub fn address(&self) -> Option<StreamAddress> {
        self.multicast.then(|| StreamAddress {
            reply: self.request.clone(),
            outgoing: self.outgoing.clone(),
        })
    }
}

/// Sends `event` to every stream of `targets`: one packet per connection (and per
/// [`MAX_KEYS_PER_PACKET`] streams), queued without waiting. Returns the targets whose
/// connection's queue was full: their streams did not get the event.
pub fn multicast<'a, T, D: Serialize>(
    targets: impl IntoIterator<Item = (T, &'a StreamAddress)>,
    event: &Event<D>,
) -> Vec<T> {
    // Connections are few (a gateway or two), so a list scanned per target groups them.
    let mut connections: Vec<(&'a StreamAddress, Vec<(T, u64)>)> = Vec::new();
    for (target, address) in targets {
        let key = address.key();
        match connections
            .iter_mut()
            .find(|(first, _)| first.outgoing.same_channel(&address.outgoing))
        {
            Some((_, streams)) => streams.push((target, key)),
            None => connections.push((address, vec![(target, key)])),
        }
    }
    let mut missed = Vec::new();
    for (first, streams) in connections {
        let mut streams = streams.into_iter().peekable();
        while streams.peek().is_some() {
            let chunk: Vec<(T, u64)> = streams.by_ref().take(MAX_KEYS_PER_PACKET).collect();
            let keys: Vec<u64> = chunk.iter().map(|(_, key)| *key).collect();
            let queued = encode(&first.reply, keys, event)
                .is_some_and(|frame| first.outgoing.try_send(frame).is_ok());
            if !queued {
                missed.extend(chunk.into_iter().map(|(target, _)| target));
            }
        }
    }
    missed
}

/// The packet for the streams `keys` (not empty); one stream's is a plain event packet.
fn encode<D: Serialize>(reply: &Packet, mut keys: Vec<u64>, event: &Event<D>) -> Option<Bytes> {
    let key = keys[0];
    if keys.len() == 1 {
        keys.clear();
    }
    let packet = Packet {
        key,
        keys,
        stream: true,
        id: event.id.clone(),
        event: event.event.clone(),
        ..Packet::reply_to(reply, &event.data)
    };
    encode_frame(&packet).ok()
}
