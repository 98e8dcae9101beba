//! Reading `text/event-stream` responses the way a browser's EventSource does: events are blocks
//! of `field: value` lines ended by a blank line; comment lines (`:`) keep the stream alive and
//! carry nothing.
//!
//! The one event-stream reader of the workspace: the end-to-end tests, the gateway's tests and
//! the load tools all read streams through [`EventStream`].
//!
//! [`EventStream::open`] reads through reqwest, for tests; [`EventStream::from_response`] takes a
//! response a test sent itself (its own headers, its own client). [`EventStream::connect`] speaks
//! just enough HTTP/1.1 over a plain socket to open a stream, for load tools that hold a thousand
//! subscribers on the machine they measure and must cost little per event.

use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::Value;

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or(Value::Null)
    }
}

/// An open event stream.
pub struct EventStream {
    body: futures::stream::BoxStream<'static, anyhow::Result<bytes::Bytes>>,
    /// Bytes received but not yet parsed; kept as bytes so that a character split between two
    /// chunks is decoded whole.
    buffer: Vec<u8>,
    /// Comment lines (keep-alives) seen so far.
    comments: usize,
}

impl EventStream {
    /// Opens `url` with `Accept: text/event-stream` (and `Last-Event-ID` when given) and checks
    /// that the answer is an event stream.
    pub async fn open(
        http: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> anyhow::Result<EventStream> {
        let mut request = http
            .get(url)
            .header("Accept", "text/event-stream")
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        EventStream::from_response(request.send().await?).await
    }

    /// Reads the body of `response`, after checking that it is `200` with the content type
    /// `text/event-stream` (and nothing after it: the gateway names no charset).
    pub async fn from_response(response: reqwest::Response) -> anyhow::Result<EventStream> {
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if response.status() != reqwest::StatusCode::OK || content_type != "text/event-stream" {
            bail!(
                "GET {}: {} {content_type}: {}",
                response.url().clone(),
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(EventStream::reading(
            response.bytes_stream().map(|chunk| Ok(chunk?)).boxed(),
        ))
    }

    fn reading(
        body: futures::stream::BoxStream<'static, anyhow::Result<bytes::Bytes>>,
    ) -> EventStream {
        EventStream {
            body,
            buffer: Vec::new(),
            comments: 0,
        }
    }

    /// Opens `path` on the HTTP/1.1 server at `addr` (`host:port`) over a plain socket, with
    /// `Accept: text/event-stream`, and checks that the answer is `200`.
    ///
    /// The body's chunked framing is not decoded but skipped by the event parser: the gateway
    /// writes each event as one chunk, so a chunk-size line only ever stands between events, and
    /// a line without a field name is ignored like any unknown field.
    pub async fn connect(addr: &str, path: &str) -> anyhow::Result<EventStream> {
        use tokio::io::AsyncReadExt;
        let (socket, rest) = open_socket(addr, path).await?;
        let body = futures::stream::unfold(Some(socket), |socket| async move {
            let mut socket = socket?;
            let mut chunk = bytes::BytesMut::with_capacity(4096);
            match socket.read_buf(&mut chunk).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(chunk.freeze()), Some(socket))),
                Err(err) => Some((Err(err.into()), None)),
            }
        });
        let rest = bytes::Bytes::from(rest);
        Ok(EventStream::reading(
            futures::stream::once(async move { Ok(rest) })
                .chain(body)
                .boxed(),
        ))
    }

    /// Comment lines (the server's keep-alives) seen so far.
    pub fn comments(&self) -> usize {
        self.comments
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            while let Some(block) = self.next_block() {
                let (event, comments) = parse_block(&block);
                self.comments += comments;
                if let Some(event) = event {
                    return Ok(Some(event));
                }
            }
            match self.body.next().await {
                None => return Ok(None),
                Some(chunk) => {
                    let chunk = chunk.context("reading the event stream")?;
                    self.buffer.extend_from_slice(&chunk);
                }
            }
        }
    }

    /// Takes the first complete block (up to a blank line) off the buffer, with CRLF line ends
    /// made LF.
    fn next_block(&mut self) -> Option<String> {
        let end = [&b"\n\n"[..], b"\r\n\r\n"]
            .into_iter()
            .filter_map(|blank| {
                let at = self.buffer.windows(blank.len()).position(|w| w == blank)?;
                Some((at, blank.len()))
            })
            .min()?;
        let block: Vec<u8> = self.buffer.drain(..end.0 + end.1).collect();
        Some(String::from_utf8_lossy(&block).replace("\r\n", "\n"))
    }

    /// The next event within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> anyhow::Result<Event> {
        tokio::time::timeout(timeout, self.next())
            .await
            .context("no event arrived in time")??
            .context("the stream ended")
    }

    /// Every event until the stream ends, which must happen within `timeout`.
    pub async fn rest_within(&mut self, timeout: Duration) -> anyhow::Result<Vec<Event>> {
        tokio::time::timeout(timeout, async {
            let mut events = Vec::new();
            while let Some(event) = self.next().await? {
                events.push(event);
            }
            Ok(events)
        })
        .await
        .context("the stream did not end in time")?
    }
}

/// Sends `GET path` with `Accept: text/event-stream` to the HTTP/1.1 server at `addr`
/// (`host:port`) over a plain socket and checks that the answer is `200`. Returns the socket
/// and the body bytes that arrived with the head, for a reader of its own.
pub async fn open_socket(
    addr: &str,
    path: &str,
) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    socket.set_nodelay(true)?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(1024);
    let end = loop {
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if socket.read_buf(&mut head).await? == 0 {
            bail!("GET {path}: the connection closed before the response head");
        }
    };
    let status_line = String::from_utf8_lossy(&head[..end])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if !status_line.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {status_line}");
    }
    Ok((socket, head.split_off(end + 4)))
}

/// The event in `block`, if it has one, and how many comment lines it had.
fn parse_block(block: &str) -> (Option<Event>, usize) {
    let mut event = Event::default();
    let mut data = Vec::new();
    let mut comments = 0;
    for line in block.lines() {
        if line.starts_with(':') {
            comments += 1;
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() && event.event.is_none() {
        return (None, comments);
    }
    event.data = data.join("\n");
    (Some(event), comments)
}
