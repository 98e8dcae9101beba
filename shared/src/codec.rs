//! The `¶` framing codec.
//!
//! Every connection in the system carries JSON objects, each followed by the delimiter `¶`
//! (U+00B6, the two UTF-8 bytes `C2 B6`). This module is the only place that knows this: it turns
//! a byte stream into values and values into bytes, and everything above it deals in packets.
//!
//! The decoder is modelled on tokio-util's `LinesCodec`:
//! - it remembers how far it already searched (`next_index`), so a frame arriving one byte per
//!   read is scanned once, not quadratically; because the delimiter is two bytes, a resumed search
//!   backs up one byte in case the previous read ended between `C2` and `B6`;
//! - a frame longer than `max_frame_length` is reported once with
//!   [`CodecError::MaxFrameLengthExceeded`] and then skipped up to the next delimiter without being
//!   buffered, so a hostile peer cannot make us hold more than the limit;
//! - a frame that is not valid JSON for the target type is reported as [`CodecError::Json`]
//!   (carrying the frame's `key` when one can be read) and the stream goes on with the next frame.
//!
//! The encoder writes `¶` inside strings as the JSON escape `\u00b6`, so a raw `¶` on the wire is
//! always a delimiter.

use std::{io, marker::PhantomData};

use bytes::{Buf, BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// The frame delimiter `¶` as UTF-8 bytes.
pub const DELIMITER: &[u8] = "¶".as_bytes();

/// The default upper bound on one frame, delimiter excluded.
pub const DEFAULT_MAX_FRAME_LENGTH: usize = 4 * 1024 * 1024;

/// Why a frame could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame grew past the limit; its bytes up to the next delimiter are dropped.
    #[error("frame longer than {max} bytes")]
    MaxFrameLengthExceeded { max: usize },
    /// A complete frame held something other than the expected JSON.
    #[error("invalid packet: {source}")]
    Json {
        /// The frame's `key`, when the frame is a JSON object that has one, so it can be answered.
        key: Option<u64>,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl CodecError {
    /// True when the connection can go on reading after this error.
    pub fn is_recoverable(&self) -> bool {
        !matches!(self, CodecError::Io(_))
    }
}

/// Decodes `¶`-delimited JSON frames into `T` and encodes any `Serialize` value as one frame.
#[derive(Debug)]
pub struct PacketCodec<T = crate::Packet> {
    /// Where the next delimiter search starts in the buffer.
    next_index: usize,
    max_frame_length: usize,
    /// True while skipping the rest of an oversized frame.
    is_discarding: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T> PacketCodec<T> {
    pub fn new() -> Self {
        Self::with_max_frame_length(DEFAULT_MAX_FRAME_LENGTH)
    }

    pub fn with_max_frame_length(max_frame_length: usize) -> Self {
        PacketCodec {
            next_index: 0,
            max_frame_length,
            is_discarding: false,
            _item: PhantomData,
        }
    }

    /// Finds the next complete frame in `buf` and splits it off, delimiter included.
    /// Returns the frame's length without the delimiter.
    fn next_frame(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        loop {
            let found = memchr::memmem::find(&buf[self.next_index..], DELIMITER)
                .map(|offset| self.next_index + offset);
            match (self.is_discarding, found) {
                (true, Some(end)) => {
                    buf.advance(end + DELIMITER.len());
                    self.is_discarding = false;
                    self.next_index = 0;
                }
                (true, None) => {
                    // Keep a trailing C2: it may be the first half of the delimiter.
                    let keep = usize::from(buf.last() == Some(&DELIMITER[0]));
                    buf.advance(buf.len() - keep);
                    self.next_index = 0;
                    return Ok(None);
                }
                (false, Some(end)) => {
                    self.next_index = 0;
                    if end > self.max_frame_length {
                        buf.advance(end + DELIMITER.len());
                        return Err(CodecError::MaxFrameLengthExceeded {
                            max: self.max_frame_length,
                        });
                    }
                    let mut frame = buf.split_to(end + DELIMITER.len());
                    frame.truncate(end);
                    return Ok(Some(frame));
                }
                (false, None) if buf.len() > self.max_frame_length => {
                    self.is_discarding = true;
                    return Err(CodecError::MaxFrameLengthExceeded {
                        max: self.max_frame_length,
                    });
                }
                (false, None) => {
                    self.next_index = buf.len().saturating_sub(DELIMITER.len() - 1);
                    return Ok(None);
                }
            }
        }
    }
}

impl<T> Default for PacketCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for PacketCodec<T> {
    fn clone(&self) -> Self {
        Self::with_max_frame_length(self.max_frame_length)
    }
}

impl<T: DeserializeOwned> Decoder for PacketCodec<T> {
    type Item = T;
    type Error = CodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<T>, CodecError> {
        loop {
            let Some(frame) = self.next_frame(buf)? else {
                return Ok(None);
            };
            // Blank frames (a stray delimiter, whitespace between packets) carry nothing.
            if frame.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&frame)
                .map(Some)
                .map_err(|source| CodecError::Json {
                    key: key_of(&frame),
                    source,
                });
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<T>, CodecError> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None => {
                // Bytes after the last delimiter are an unfinished frame: the peer left mid-packet.
                let leftover = !self.is_discarding && !buf.iter().all(u8::is_ascii_whitespace);
                buf.clear();
                self.next_index = 0;
                self.is_discarding = false;
                if leftover {
                    Err(CodecError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a packet",
                    )))
                } else {
                    Ok(None)
                }
            }
        }
    }
}

impl<T, I: Serialize> Encoder<I> for PacketCodec<T> {
    type Error = CodecError;

    fn encode(&mut self, item: I, dst: &mut BytesMut) -> Result<(), CodecError> {
        let mut serializer = serde_json::Serializer::with_formatter(dst.writer(), EscapeDelimiter);
        item.serialize(&mut serializer)
            .map_err(|source| CodecError::Json { key: None, source })?;
        dst.extend_from_slice(DELIMITER);
        Ok(())
    }
}

/// What [`encode_frame`] reserves up front: room for a typical request or answer (a gateway
/// request with its request id and caller is about 150 bytes), so serializing one does not
/// reallocate the buffer as it grows from empty.
const FRAME_CAPACITY: usize = 256;

/// Encodes one value as a complete frame, delimiter included.
pub fn encode_frame(item: impl Serialize) -> Result<bytes::Bytes, CodecError> {
    let mut buf = BytesMut::with_capacity(FRAME_CAPACITY);
    PacketCodec::<()>::new().encode(item, &mut buf)?;
    Ok(buf.freeze())
}

/// Reads the `key` of a frame that failed to decode as the target type, so the error can be
/// answered to the request that caused it. Falls back to `params.key` (original-design requests).
fn key_of(frame: &[u8]) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_slice(frame).ok()?;
    crate::packet::key_in(&value)
}

/// A JSON formatter that writes `¶` inside strings as `\u00b6`, so it never appears raw in a frame.
struct EscapeDelimiter;

impl serde_json::ser::Formatter for EscapeDelimiter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        write_escaped(writer, fragment)
    }

    /// Raw JSON ([`crate::RawParams`]) is written as it is, except for `¶`: outside strings it
    /// is not valid JSON, so every `¶` in valid JSON text is inside a string, where the escape
    /// means the same character.
    fn write_raw_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        write_escaped(writer, fragment)
    }
}

fn write_escaped<W: ?Sized + io::Write>(writer: &mut W, text: &str) -> io::Result<()> {
    let mut parts = text.split('¶');
    if let Some(first) = parts.next() {
        writer.write_all(first.as_bytes())?;
    }
    for part in parts {
        writer.write_all(br"\u00b6")?;
        writer.write_all(part.as_bytes())?;
    }
    Ok(())
}
