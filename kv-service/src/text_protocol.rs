//! The text protocol's grammar, as pure incremental codecs with no I/O, so every framing case
//! (glued requests, a request split at any byte, escapes, each error) is testable without a
//! socket. docs/PROTOCOL.md describes it for users.
//!
//! ```text
//! input    = *( blank / request )          blank = SP / HTAB / CR / LF
//! request  = command "<" body ">"          command = "auth" / "get" / "put" / "del"  (any case)
//! body     = key                           for get and del
//!          / key "," value                 for put: the first unescaped "," splits
//!          / token                         for auth: a bearer token (JWT), at most 8 KiB
//! escape   = "\" ( "<" / ">" / "," / "\" ) inside a body; any other "\x" is an error
//! answer   = ( "value" / "none" / "ok" / "err" ) "<" escaped-text ">" LF
//! ```
//!
//! - [`RequestCodec`] (server side) decodes requests and encodes answers. A malformed request is
//!   not a decoding error: it becomes a [`Frame::Malformed`] that the server answers with
//!   `err<...>`, and decoding carries on with the next request. Only a request over the size
//!   limits is an error ([`DecodeError::TooLong`]): the connection is answered and closed.
//! - `auth<TOKEN>` is decoded like any request; whether it is needed, and what it allows, is the
//!   server's business (text_server.rs). The token is held in a [`Token`], whose `Debug` never
//!   shows it, so a request can be logged without leaking a credential.
//! - The decoder never keeps more than the decoded key and value of the current request: the
//!   input buffer is consumed as it is scanned, so memory is bounded by the limits whatever a
//!   client sends.
//! - [`ReplyCodec`] (client side) decodes answers; the load tool and the tests use it.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::core::{MAX_KEY_BYTES, MAX_VALUE_BYTES};

/// Longest command word kept for an error message; longer words are reported cut short.
const MAX_WORD: usize = 16;

/// Longest token `auth<...>` accepts. JWTs are a few hundred bytes; 8 KiB leaves room for large
/// RSA signatures and many scopes while bounding what an unauthenticated client can make us hold.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Auth { token: Token },
    Get { key: String },
    Put { key: String, value: String },
    Del { key: String },
}

/// A bearer token as sent in `auth<TOKEN>`. Its `Debug` hides the text: a token is a credential
/// and must never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    /// The token's text, to verify it (never to log it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({} bytes)", self.0.len())
    }
}

/// What the decoder yields: a request, or the reason one was malformed (answered with
/// `err<reason>`; the connection keeps working).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Request(Request),
    Malformed(String),
}

/// An answer, borrowing the text it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// `value<V>`: the value of a found key.
    Value(&'a str),
    /// `none<K>`: get or del found nothing.
    None(&'a str),
    /// `ok<K>`: put or del done; `ok<SUBJECT>`: auth accepted.
    Ok(&'a str),
    /// `err<REASON>`
    Err(&'a str),
}

impl Reply<'_> {
    fn word(&self) -> &'static [u8] {
        match self {
            Reply::Value(_) => b"value",
            Reply::None(_) => b"none",
            Reply::Ok(_) => b"ok",
            Reply::Err(_) => b"err",
        }
    }

    fn text(&self) -> &str {
        match self {
            Reply::Value(text) | Reply::None(text) | Reply::Ok(text) | Reply::Err(text) => text,
        }
    }
}

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A key or value over the limit. The message is what the client is told.
    #[error("{0}")]
    TooLong(String),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    Auth,
    Get,
    Put,
    Del,
}

#[derive(Debug)]
enum State {
    /// Between requests, skipping blanks.
    Idle,
    /// Reading a command word.
    Word,
    /// Inside `<...>`.
    Body(Body),
    /// Skipping the rest of a malformed request (its error is already out) up to the end of
    /// the line or a `>`, whichever comes first.
    Skip,
}

#[derive(Debug)]
struct Body {
    /// `None` for an unknown command, whose body is skipped.
    command: Option<Command>,
    key: Vec<u8>,
    value: Vec<u8>,
    /// Past the separating comma of a put.
    in_value: bool,
    /// The previous byte was an unescaped backslash.
    escaped: bool,
    /// Bytes of the key and value so far, counted even when not kept (after an error).
    key_len: usize,
    value_len: usize,
    /// The first error seen; reported when the request ends.
    error: Option<String>,
}

impl Body {
    fn new(command: Option<Command>, word: &[u8]) -> Body {
        Body {
            command,
            key: Vec::new(),
            value: Vec::new(),
            in_value: false,
            escaped: false,
            key_len: 0,
            value_len: 0,
            error: command
                .is_none()
                .then(|| format!("unknown command {}", printable(word))),
        }
    }

    fn fail(&mut self, reason: impl FnOnce() -> String) {
        if self.error.is_none() {
            self.error = Some(reason());
        }
        // What was kept is no longer needed.
        self.key = Vec::new();
        self.value = Vec::new();
    }
}

/// Server side: decodes [`Frame`]s, encodes [`Reply`]s.
#[derive(Debug)]
pub struct RequestCodec {
    max_key: usize,
    max_value: usize,
    state: State,
    word: Vec<u8>,
}

impl Default for RequestCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestCodec {
    /// A codec with the service's limits (1 KiB keys, 1 MiB values).
    pub fn new() -> Self {
        Self::with_limits(MAX_KEY_BYTES, MAX_VALUE_BYTES)
    }

    pub fn with_limits(max_key: usize, max_value: usize) -> Self {
        RequestCodec {
            max_key,
            max_value,
            state: State::Idle,
            word: Vec::with_capacity(MAX_WORD),
        }
    }

    /// Scans `src` from the start; returns how many bytes it consumed and the frame completed
    /// by the last of them, if any.
    fn scan(&mut self, src: &[u8]) -> Result<(usize, Option<Frame>), DecodeError> {
        let mut at = 0;
        while at < src.len() {
            match &mut self.state {
                State::Idle => {
                    let byte = src[at];
                    at += 1;
                    if is_blank(byte) {
                        continue;
                    }
                    if byte.is_ascii_alphabetic() {
                        self.word.clear();
                        self.word.push(byte);
                        self.state = State::Word;
                        continue;
                    }
                    self.state = if byte == b'\n' || byte == b'>' {
                        State::Idle
                    } else {
                        State::Skip
                    };
                    let reason = format!(
                        "expected a command (auth, get, put or del), got {}",
                        printable(&[byte])
                    );
                    return Ok((at, Some(Frame::Malformed(reason))));
                }
                State::Word => {
                    let byte = src[at];
                    at += 1;
                    if byte.is_ascii_alphabetic() {
                        if self.word.len() < MAX_WORD {
                            self.word.push(byte);
                        }
                        continue;
                    }
                    if byte == b'<' {
                        let command = match self.word.to_ascii_lowercase().as_slice() {
                            b"auth" => Some(Command::Auth),
                            b"get" => Some(Command::Get),
                            b"put" => Some(Command::Put),
                            b"del" => Some(Command::Del),
                            _ => None,
                        };
                        self.state = State::Body(Body::new(command, &self.word));
                        continue;
                    }
                    // A newline or `>` ends the malformed request; anything else starts the
                    // junk to skip.
                    self.state = if byte == b'\n' || byte == b'>' {
                        State::Idle
                    } else {
                        State::Skip
                    };
                    let reason = format!("missing < after {}", printable(&self.word));
                    return Ok((at, Some(Frame::Malformed(reason))));
                }
                State::Skip => match memchr::memchr2(b'\n', b'>', &src[at..]) {
                    Some(end) => {
                        at += end + 1;
                        self.state = State::Idle;
                    }
                    None => at = src.len(),
                },
                State::Body(body) => {
                    let (used, ended) = scan_body(body, &src[at..], self.max_key, self.max_value)?;
                    at += used;
                    if ended {
                        let State::Body(body) = std::mem::replace(&mut self.state, State::Idle)
                        else {
                            unreachable!("in the body state");
                        };
                        return Ok((at, Some(finish(body))));
                    }
                }
            }
        }
        Ok((at, None))
    }
}

/// Scans body bytes up to and including the closing `>`. Returns the bytes used and whether the
/// body ended.
fn scan_body(
    body: &mut Body,
    src: &[u8],
    max_key: usize,
    max_value: usize,
) -> Result<(usize, bool), DecodeError> {
    let mut at = 0;
    while at < src.len() {
        let splits = body.command == Some(Command::Put) && !body.in_value;
        if !body.escaped {
            // Copy the run of ordinary bytes in one go.
            let run = &src[at..];
            let ordinary = if splits {
                run.iter()
                    .position(|&b| matches!(b, b'\\' | b'<' | b'>' | b','))
                    .unwrap_or(run.len())
            } else {
                memchr::memchr3(b'\\', b'<', b'>', run).unwrap_or(run.len())
            };
            if ordinary > 0 {
                push(body, &run[..ordinary], max_key, max_value)?;
                at += ordinary;
                continue;
            }
        }
        let byte = src[at];
        at += 1;
        if body.escaped {
            body.escaped = false;
            if matches!(byte, b'<' | b'>' | b',' | b'\\') {
                push(body, &[byte], max_key, max_value)?;
            } else {
                body.fail(|| {
                    format!(
                        "bad escape \\{} (only \\<, \\>, \\, and \\\\ are escapes)",
                        printable(&[byte])
                    )
                });
            }
            continue;
        }
        match byte {
            b'\\' => body.escaped = true,
            b'>' => return Ok((at, true)),
            b'<' => body.fail(|| "unescaped < inside a request (escape it as \\<)".to_owned()),
            b',' => body.in_value = true,
            _ => unreachable!("only special bytes reach here"),
        }
    }
    Ok((at, false))
}

fn push(
    body: &mut Body,
    bytes: &[u8],
    max_key: usize,
    max_value: usize,
) -> Result<(), DecodeError> {
    let keep = body.error.is_none();
    if body.in_value {
        body.value_len += bytes.len();
        if body.value_len > max_value {
            return Err(DecodeError::TooLong(format!(
                "value too long (max {max_value} bytes)"
            )));
        }
        if keep {
            body.value.extend_from_slice(bytes);
        }
    } else {
        body.key_len += bytes.len();
        // An unknown command's body is measured against the largest request, not a key.
        let max = match body.command {
            Some(Command::Auth) => MAX_TOKEN_BYTES,
            Some(_) => max_key,
            None => max_key + 1 + max_value,
        };
        if body.key_len > max {
            return Err(DecodeError::TooLong(match body.command {
                Some(Command::Auth) => format!("token too long (max {MAX_TOKEN_BYTES} bytes)"),
                Some(_) => format!("key too long (max {max_key} bytes)"),
                None => "request too long".to_owned(),
            }));
        }
        if keep {
            body.key.extend_from_slice(bytes);
        }
    }
    Ok(())
}

fn finish(body: Body) -> Frame {
    if let Some(error) = body.error {
        return Frame::Malformed(error);
    }
    let command = body.command.expect("an unknown command is an error");
    if command == Command::Put && !body.in_value {
        return Frame::Malformed("put needs a key and a value: put<key,value>".to_owned());
    }
    if command == Command::Auth {
        // Nothing of the token goes into an error message.
        return match String::from_utf8(body.key) {
            Ok(token) if !token.is_empty() => Frame::Request(Request::Auth {
                token: Token(token),
            }),
            Ok(_) => Frame::Malformed("auth needs a token: auth<TOKEN>".to_owned()),
            Err(_) => Frame::Malformed("token is not valid UTF-8".to_owned()),
        };
    }
    if body.key.is_empty() {
        return Frame::Malformed("empty key".to_owned());
    }
    let Ok(key) = String::from_utf8(body.key) else {
        return Frame::Malformed("key is not valid UTF-8".to_owned());
    };
    Frame::Request(match command {
        Command::Auth => unreachable!("answered above"),
        Command::Get => Request::Get { key },
        Command::Del => Request::Del { key },
        Command::Put => match String::from_utf8(body.value) {
            Ok(value) => Request::Put { key, value },
            Err(_) => return Frame::Malformed("value is not valid UTF-8".to_owned()),
        },
    })
}

impl Decoder for RequestCodec {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let (used, frame) = self.scan(src)?;
        src.advance(used);
        Ok(frame)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if let Some(frame) = self.decode(src)? {
            return Ok(Some(frame));
        }
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle | State::Skip => Ok(None),
            State::Word | State::Body(_) => Ok(Some(Frame::Malformed(
                "incomplete request at end of input".to_owned(),
            ))),
        }
    }
}

impl Encoder<Reply<'_>> for RequestCodec {
    type Error = std::io::Error;

    fn encode(&mut self, reply: Reply<'_>, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let text = reply.text().as_bytes();
        dst.reserve(reply.word().len() + text.len() + 3);
        dst.put_slice(reply.word());
        dst.put_u8(b'<');
        escape_into(text, dst);
        dst.put_slice(b">\n");
        Ok(())
    }
}

/// Writes `text` with `\`, `<`, `>` and `,` escaped.
pub fn escape_into(text: &[u8], dst: &mut BytesMut) {
    let mut rest = text;
    while let Some(special) = rest
        .iter()
        .position(|&b| matches!(b, b'\\' | b'<' | b'>' | b','))
    {
        dst.put_slice(&rest[..special]);
        dst.put_u8(b'\\');
        dst.put_u8(rest[special]);
        rest = &rest[special + 1..];
    }
    dst.put_slice(rest);
}

/// `text` escaped, as a string (for building requests).
pub fn escape(text: &str) -> String {
    let mut out = BytesMut::with_capacity(text.len() + 8);
    escape_into(text.as_bytes(), &mut out);
    String::from_utf8(out.to_vec()).expect("escaping keeps UTF-8 valid")
}

fn is_blank(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\n')
}

/// A command word or byte as shown in an error message.
fn printable(bytes: &[u8]) -> String {
    match bytes {
        [b'\n'] => "a newline".to_owned(),
        [b'\r'] => "a carriage return".to_owned(),
        [b'\t'] => "a tab".to_owned(),
        [b' '] => "a space".to_owned(),
        [byte] if !byte.is_ascii_graphic() => format!("byte 0x{byte:02x}"),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// An answer as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedReply {
    Value(String),
    None(String),
    Ok(String),
    Err(String),
}

/// Client side: decodes answers (`value<..>`, `none<..>`, `ok<..>`, `err<..>`) and encodes
/// requests.
#[derive(Debug, Default)]
pub struct ReplyCodec {
    word: Vec<u8>,
    text: Vec<u8>,
    in_body: bool,
    escaped: bool,
    max_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ReplyCodec {
    pub fn new() -> Self {
        ReplyCodec {
            max_len: 2 * MAX_VALUE_BYTES + 16,
            ..Default::default()
        }
    }
}

impl Decoder for ReplyCodec {
    type Item = OwnedReply;
    type Error = ReplyError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<OwnedReply>, ReplyError> {
        let mut at = 0;
        let result = loop {
            let Some(&byte) = src.get(at) else {
                break None;
            };
            at += 1;
            if !self.in_body {
                match byte {
                    b'<' => self.in_body = true,
                    _ if is_blank(byte) && self.word.is_empty() => {}
                    _ if byte.is_ascii_alphabetic() && self.word.len() < MAX_WORD => {
                        self.word.push(byte)
                    }
                    _ => {
                        src.advance(at);
                        return Err(ReplyError::Malformed(format!(
                            "unexpected {} in an answer",
                            printable(&[byte])
                        )));
                    }
                }
                continue;
            }
            if self.escaped {
                self.escaped = false;
                self.text.push(byte);
            } else if byte == b'\\' {
                self.escaped = true;
            } else if byte == b'>' {
                let text = String::from_utf8(std::mem::take(&mut self.text))
                    .map_err(|_| ReplyError::Malformed("answer is not UTF-8".into()));
                let word = std::mem::take(&mut self.word);
                self.in_body = false;
                let text = match text {
                    Ok(text) => text,
                    Err(err) => {
                        src.advance(at);
                        return Err(err);
                    }
                };
                break Some(match word.as_slice() {
                    b"value" => OwnedReply::Value(text),
                    b"none" => OwnedReply::None(text),
                    b"ok" => OwnedReply::Ok(text),
                    b"err" => OwnedReply::Err(text),
                    other => {
                        src.advance(at);
                        return Err(ReplyError::Malformed(format!(
                            "unknown answer {}",
                            printable(other)
                        )));
                    }
                });
            } else {
                self.text.push(byte);
            }
            if self.text.len() > self.max_len {
                src.advance(at);
                return Err(ReplyError::Malformed("answer too long".into()));
            }
        };
        src.advance(at);
        Ok(result)
    }
}

impl Encoder<&Request> for ReplyCodec {
    type Error = std::io::Error;

    fn encode(&mut self, request: &Request, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        match request {
            Request::Auth { token } => {
                dst.put_slice(b"auth<");
                escape_into(token.expose().as_bytes(), dst);
            }
            Request::Get { key } => {
                dst.put_slice(b"get<");
                escape_into(key.as_bytes(), dst);
            }
            Request::Del { key } => {
                dst.put_slice(b"del<");
                escape_into(key.as_bytes(), dst);
            }
            Request::Put { key, value } => {
                dst.put_slice(b"put<");
                escape_into(key.as_bytes(), dst);
                dst.put_u8(b',');
                escape_into(value.as_bytes(), dst);
            }
        }
        dst.put_u8(b'>');
        Ok(())
    }
}
