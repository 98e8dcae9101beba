//! Reading `text/event-stream` responses the way a browser's EventSource does: events are blocks
//! of `field: value` lines ended by a blank line; comment lines (`:`) keep the stream alive and
//! carry nothing.
//!
//! [`EventStream::open`] reads through reqwest, for tests. [`EventStream::connect`] speaks just
//! enough HTTP/1.1 over a plain socket to open a stream, for load tools that hold a thousand
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
    buffer: String,
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
        let response = request.send().await?;
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !response.status().is_success() || !content_type.starts_with("text/event-stream") {
            bail!(
                "GET {url}: {} {content_type}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        Ok(EventStream {
            body: response.bytes_stream().map(|chunk| Ok(chunk?)).boxed(),
            buffer: String::new(),
        })
    }

    /// Opens `path` on the HTTP/1.1 server at `addr` (`host:port`) over a plain socket, with
    /// `Accept: text/event-stream`, and checks that the answer is `200`.
    ///
    /// The body's chunked framing is not decoded but skipped by the event parser: the gateway
    /// writes each event as one chunk, so a chunk-size line only ever stands between events, and
    /// a line without a field name is ignored like any unknown field.
    pub async fn connect(addr: &str, path: &str) -> anyhow::Result<EventStream> {
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
        let rest = bytes::Bytes::copy_from_slice(&head[end + 4..]);
        let body = futures::stream::unfold(Some(socket), |socket| async move {
            let mut socket = socket?;
            let mut chunk = bytes::BytesMut::with_capacity(4096);
            match socket.read_buf(&mut chunk).await {
                Ok(0) => None,
                Ok(_) => Some((Ok(chunk.freeze()), Some(socket))),
                Err(err) => Some((Err(err.into()), None)),
            }
        });
        Ok(EventStream {
            body: futures::stream::once(async move { Ok(rest) })
                .chain(body)
                .boxed(),
            buffer: String::new(),
        })
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse_block(&block) {
                    return Ok(Some(event));
                }
                continue;
            }
            match self.body.next().await {
                None => return Ok(None),
                Some(chunk) => {
                    let chunk = chunk.context("reading the event stream")?;
                    self.buffer
                        .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
                }
            }
        }
    }

    /// The next event within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> anyhow::Result<Event> {
        tokio::time::timeout(timeout, self.next())
            .await
            .context("no event arrived in time")??
            .context("the stream ended")
    }
}

fn parse_block(block: &str) -> Option<Event> {
    let mut event = Event::default();
    let mut data = Vec::new();
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
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
        return None;
    }
    event.data = data.join("\n");
    Some(event)
}
