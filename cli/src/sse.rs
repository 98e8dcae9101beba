//! A small reader of `text/event-stream` bodies: the fields msctl needs (`event`, `id`, `data`),
//! comments skipped, lines bounded so a misbehaving server cannot make it hold unbounded memory.

use std::pin::Pin;

use bytes::BytesMut;
use futures::{Stream, StreamExt};

use crate::CliError;

/// The longest line (and event) accepted: far above any kv value (1 MiB) or notice, JSON-escaped.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `message` when the event has no `event:` line, as in a browser.
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// The events of one response, in order.
pub struct EventReader {
    body: Body,
    buffer: BytesMut,
    parser: Parser,
}

impl EventReader {
    pub fn new(response: reqwest::Response) -> EventReader {
        EventReader {
            body: Box::pin(response.bytes_stream()),
            buffer: BytesMut::new(),
            parser: Parser::default(),
        }
    }

    /// The next event; `None` when the body ended.
    pub async fn next(&mut self) -> Result<Option<Event>, CliError> {
        loop {
            while let Some(line) = take_line(&mut self.buffer)? {
                if let Some(event) = self.parser.line(&line)? {
                    return Ok(Some(event));
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(err)) => {
                    return Err(CliError::Stream(format!("the connection broke: {err}")))
                }
                None => return Ok(None),
            }
        }
    }
}

/// Takes one line (without its `\n` or `\r\n`) from the front of `buffer`, if a whole one is
/// there.
fn take_line(buffer: &mut BytesMut) -> Result<Option<String>, CliError> {
    let Some(end) = buffer.iter().position(|&byte| byte == b'\n') else {
        if buffer.len() > MAX_EVENT_BYTES {
            return Err(CliError::Stream(format!(
                "an event line is longer than {MAX_EVENT_BYTES} bytes"
            )));
        }
        return Ok(None);
    };
    let mut line = buffer.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    let line = String::from_utf8(line.to_vec())
        .map_err(|_| CliError::Stream("the stream is not UTF-8".into()))?;
    Ok(Some(line))
}

/// The fields of the event being read.
#[derive(Default)]
struct Parser {
    event: Option<String>,
    id: Option<String>,
    data: Option<String>,
}

impl Parser {
    /// Takes one line; a blank line completes an event (one without data is dropped, as a
    /// browser drops it).
    fn line(&mut self, line: &str) -> Result<Option<Event>, CliError> {
        if line.is_empty() {
            let (event, id, data) = (self.event.take(), self.id.take(), self.data.take());
            return Ok(data.map(|data| Event {
                event: event.unwrap_or_else(|| "message".into()),
                id,
                data,
            }));
        }
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = Some(value.to_owned()),
            "id" => self.id = Some(value.to_owned()),
            "data" => {
                let data = self.data.get_or_insert_with(String::new);
                if data.len() + value.len() > MAX_EVENT_BYTES {
                    return Err(CliError::Stream(format!(
                        "an event is longer than {MAX_EVENT_BYTES} bytes"
                    )));
                }
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value);
            }
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Vec<Event> {
        let mut buffer = BytesMut::from(text);
        let mut parser = Parser::default();
        let mut events = Vec::new();
        while let Some(line) = take_line(&mut buffer).unwrap() {
            events.extend(parser.line(&line).unwrap());
        }
        events
    }

    #[test]
    fn fields_make_events_at_blank_lines() {
        let parsed = events("id: 3\nevent: notice\ndata: {\"a\":1}\n\n:\n\ndata: x\ndata: y\n\n");
        assert_eq!(
            parsed,
            [
                Event {
                    event: "notice".into(),
                    id: Some("3".into()),
                    data: "{\"a\":1}".into()
                },
                Event {
                    event: "message".into(),
                    id: None,
                    data: "x\ny".into()
                },
            ]
        );
    }

    #[test]
    fn crlf_lines_and_an_unfinished_event_at_the_end() {
        let parsed = events("event: log\r\ndata: 1\r\n\r\nevent: log\ndata: 2\n");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].data, "1");
    }

    #[test]
    fn a_line_without_end_beyond_the_limit_is_refused() {
        let mut buffer = BytesMut::from(vec![b'a'; MAX_EVENT_BYTES + 1].as_slice());
        assert!(take_line(&mut buffer).is_err());
    }
}
