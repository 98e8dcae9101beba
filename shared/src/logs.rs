//! The recent log lines of this process, kept in memory so that an operator can read them from
//! the gateway (`GET /_/logs`) without a log shipper or a shell on the host.
//!
//! [`BufferLayer`] is a `tracing` layer that copies every event the process logs (after the
//! `RUST_LOG` filter) into one process-wide [`LogBuffer`], bounded both by lines
//! ([`MAX_LINES`]) and by bytes ([`MAX_BYTES`]): the oldest lines go first. Every line gets a
//! sequence number, so a reader that follows the log asks for the lines after the last one it
//! saw.
//!
//! The buffer is read over the packet protocol: the service runtime answers [`LOGS_URI`] on every
//! service (with the `admin` scope), and the distributor answers it too; [`answer`] is what both
//! reply. docs/PROTOCOL.md, "Logs", describes the request and its answer.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    sync::{Mutex, OnceLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{
    field::{Field, Visit},
    Event, Level, Subscriber,
};
use tracing_subscriber::{layer::Context, Layer};

/// The `uri` of the log request (`GET`) every node answers.
pub const LOGS_URI: &str = "/_/logs";
/// The most lines kept, and the most one request may ask for.
pub const MAX_LINES: usize = 10_000;
/// The most bytes of text kept (times, levels, targets and messages together).
pub const MAX_BYTES: usize = 4 * 1024 * 1024;
/// The lines one request returns by default.
pub const DEFAULT_LIMIT: usize = 200;
/// The most bytes of messages one answer carries: an answer is one packet, and a packet must
/// stay well under the codec's 4 MiB frame limit, JSON escaping included. The newest lines win.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// A longer message is cut to this many bytes, so that one huge line cannot push out the others.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024;

/// One log line as a node reports it. The gateway adds which node and service it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Increases by one per line in this process, from the process's start time in
    /// microseconds; readers that follow ask for lines after it.
    pub seq: u64,
    /// RFC 3339, UTC, microseconds: lines of several processes sort by it as text.
    pub time: String,
    /// `TRACE`, `DEBUG`, `INFO`, `WARN` or `ERROR`.
    pub level: String,
    /// The message, then the event's other fields as `key=value`.
    pub message: String,
}

impl LogLine {
    fn size(&self) -> usize {
        self.time.len() + self.level.len() + self.message.len() + 32
    }
}

/// A minimum level, as `level=` names it: trace, debug, info, warn or error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinLevel(pub Level);

impl std::str::FromStr for MinLevel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let level = match text.to_ascii_lowercase().as_str() {
            "trace" => Level::TRACE,
            "debug" => Level::DEBUG,
            "info" => Level::INFO,
            "warn" | "warning" => Level::WARN,
            "error" => Level::ERROR,
            _ => {
                return Err(format!(
                    "unknown level {text:?}: use trace, debug, info, warn or error"
                ))
            }
        };
        Ok(MinLevel(level))
    }
}

impl MinLevel {
    /// True when a line at `level` (as written in [`LogLine::level`]) is at least this level.
    pub fn admits(&self, level: &str) -> bool {
        // tracing orders levels by verbosity: ERROR < WARN < ... < TRACE.
        level.parse::<Level>().is_ok_and(|level| level <= self.0)
    }
}

/// Which lines a reader wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogQuery {
    /// At least this level; every level when `None`.
    pub level: Option<MinLevel>,
    /// The newest this many matching lines (at most [`MAX_LINES`]).
    pub limit: usize,
    /// Only lines with a sequence number above this one.
    pub after: Option<u64>,
}

impl Default for LogQuery {
    fn default() -> Self {
        LogQuery {
            level: None,
            limit: DEFAULT_LIMIT,
            after: None,
        }
    }
}

/// The params of a log request: `{"level":"warn","limit":200,"after":17}`, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    level: Option<String>,
    limit: Option<usize>,
    after: Option<u64>,
}

impl LogQuery {
    /// Reads a log request's params (null or an object); the error says what is wrong.
    pub fn from_params(params: &Value) -> Result<LogQuery, String> {
        let params = match params {
            Value::Null => LogParams::default(),
            params => LogParams::deserialize(params)
                .map_err(|err| format!("invalid log request: {err}"))?,
        };
        let level = params.level.as_deref().map(str::parse).transpose()?;
        let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LINES {
            return Err(format!("limit must be between 1 and {MAX_LINES}"));
        }
        Ok(LogQuery {
            level,
            limit,
            after: params.after,
        })
    }

    /// The params a node reads back with [`LogQuery::from_params`].
    pub fn to_params(&self) -> Value {
        let mut params = serde_json::json!({ "limit": self.limit });
        if let Some(MinLevel(level)) = self.level {
            params["level"] = level.as_str().to_ascii_lowercase().into();
        }
        if let Some(after) = self.after {
            params["after"] = after.into();
        }
        params
    }
}

/// The answer to a log request: `{"lines":[...]}` from this process's buffer.
pub fn answer(params: &Value) -> Result<Value, String> {
    let query = LogQuery::from_params(params)?;
    Ok(serde_json::json!({ "lines": buffer().query(&query) }))
}

/// The lines of one process, bounded by count and bytes.
#[derive(Debug, Default)]
pub struct LogBuffer {
    inner: Mutex<Lines>,
}

#[derive(Debug, Default)]
struct Lines {
    lines: VecDeque<LogLine>,
    bytes: usize,
    next_seq: u64,
}

impl LogBuffer {
    /// A buffer whose first line is numbered `last + 1`.
    pub fn numbered_after(last: u64) -> LogBuffer {
        LogBuffer {
            inner: Mutex::new(Lines {
                next_seq: last,
                ..Lines::default()
            }),
        }
    }

    /// Appends a line (its `seq` is assigned here), dropping the oldest ones beyond the bounds.
    pub fn push(&self, time: String, level: &Level, mut message: String) {
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let mut inner = self.inner.lock().unwrap();
        inner.next_seq += 1;
        let line = LogLine {
            seq: inner.next_seq,
            time,
            level: level.as_str().to_owned(),
            message,
        };
        inner.bytes += line.size();
        inner.lines.push_back(line);
        while inner.lines.len() > MAX_LINES || inner.bytes > MAX_BYTES {
            let Some(old) = inner.lines.pop_front() else {
                break;
            };
            inner.bytes -= old.size();
        }
    }

    /// The newest lines matching `query`, oldest first, within [`MAX_ANSWER_BYTES`].
    pub fn query(&self, query: &LogQuery) -> Vec<LogLine> {
        let inner = self.inner.lock().unwrap();
        let mut picked = Vec::new();
        let mut bytes = 0;
        for line in inner.lines.iter().rev() {
            if query.after.is_some_and(|after| line.seq <= after) {
                break;
            }
            if query.level.is_some_and(|level| !level.admits(&line.level)) {
                continue;
            }
            bytes += line.size();
            if picked.len() == query.limit || bytes > MAX_ANSWER_BYTES {
                break;
            }
            picked.push(line.clone());
        }
        drop(inner);
        picked.reverse();
        picked
    }
}

/// This process's buffer, which [`BufferLayer`] fills.
pub fn buffer() -> &'static LogBuffer {
    static BUFFER: OnceLock<LogBuffer> = OnceLock::new();
    // Numbers start at the process's start time in microseconds. A node restarted at the same
    // address (the same source for a follower) then numbers its lines above those of its
    // previous run, which logged far fewer than a line per microsecond, so a follower holding the
    // old run's last number reads the new run's lines at once rather than after as many lines.
    BUFFER.get_or_init(|| {
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        LogBuffer::numbered_after(u64::try_from(started.as_micros()).unwrap_or(u64::MAX / 2))
    })
}

/// The time of a line now, as [`LogLine::time`] writes it.
pub fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// Copies every event into [`buffer`].
#[derive(Debug, Default, Clone, Copy)]
pub struct BufferLayer;

impl<S: Subscriber> Layer<S> for BufferLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut text = MessageText::default();
        event.record(&mut text);
        buffer().push(now(), event.metadata().level(), text.finish());
    }
}

/// An event's fields as one line: the message first, then `key=value` for the others.
#[derive(Default)]
struct MessageText {
    message: String,
    fields: String,
}

impl MessageText {
    fn finish(mut self) -> String {
        if self.message.is_empty() {
            return self.fields.trim_start().to_owned();
        }
        self.message.push_str(&self.fields);
        self.message
    }
}

impl Visit for MessageText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(buffer: &LogBuffer, level: Level, message: &str) {
        buffer.push(now(), &level, message.to_owned());
    }

    #[test]
    fn lines_beyond_the_line_bound_push_out_the_oldest() {
        let buffer = LogBuffer::default();
        for i in 0..MAX_LINES + 5 {
            line(&buffer, Level::INFO, &format!("line {i}"));
        }
        let all = buffer.query(&LogQuery {
            limit: MAX_LINES,
            ..LogQuery::default()
        });
        assert_eq!(all.len(), MAX_LINES);
        assert_eq!(all[0].message, "line 5");
        assert_eq!(
            all.last().unwrap().message,
            format!("line {}", MAX_LINES + 4)
        );
    }

    #[test]
    fn bytes_beyond_the_byte_bound_push_out_the_oldest() {
        let buffer = LogBuffer::default();
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        for _ in 0..(MAX_BYTES / MAX_MESSAGE_BYTES) * 2 {
            line(&buffer, Level::INFO, &big);
        }
        let inner = buffer.inner.lock().unwrap();
        assert!(inner.bytes <= MAX_BYTES);
        assert!(inner.lines.len() < (MAX_BYTES / MAX_MESSAGE_BYTES) + 1);
    }

    #[test]
    fn a_buffer_numbers_its_lines_after_the_number_it_starts_from() {
        let buffer = LogBuffer::numbered_after(1_000);
        line(&buffer, Level::INFO, "first");
        line(&buffer, Level::INFO, "second");
        let seqs: Vec<u64> = buffer
            .query(&LogQuery::default())
            .iter()
            .map(|l| l.seq)
            .collect();
        assert_eq!(seqs, [1_001, 1_002]);
    }

    #[test]
    fn a_huge_message_is_cut() {
        let buffer = LogBuffer::default();
        line(&buffer, Level::INFO, &"é".repeat(MAX_MESSAGE_BYTES));
        let lines = buffer.query(&LogQuery::default());
        assert!(lines[0].message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert!(lines[0].message.ends_with('…'));
    }

    #[test]
    fn a_query_filters_by_level_limit_and_sequence() {
        let buffer = LogBuffer::default();
        line(&buffer, Level::DEBUG, "d");
        line(&buffer, Level::WARN, "w1");
        line(&buffer, Level::INFO, "i");
        line(&buffer, Level::ERROR, "e");
        line(&buffer, Level::WARN, "w2");
        let warn = Some("warn".parse().unwrap());
        let messages = |query: LogQuery| -> Vec<String> {
            buffer
                .query(&query)
                .into_iter()
                .map(|l| l.message)
                .collect()
        };
        assert_eq!(
            messages(LogQuery {
                level: warn,
                ..LogQuery::default()
            }),
            ["w1", "e", "w2"]
        );
        assert_eq!(
            messages(LogQuery {
                level: warn,
                limit: 2,
                after: None
            }),
            ["e", "w2"]
        );
        assert_eq!(
            messages(LogQuery {
                level: None,
                limit: 10,
                after: Some(3)
            }),
            ["e", "w2"]
        );
    }

    #[test]
    fn bad_params_are_refused_with_what_is_wrong() {
        let refusal = |params: Value| LogQuery::from_params(&params).unwrap_err();
        assert!(refusal(serde_json::json!({"level": "loud"})).contains("unknown level"));
        assert!(refusal(serde_json::json!({"limit": 0})).contains("limit"));
        assert!(refusal(serde_json::json!({"limit": 10_001})).contains("limit"));
        assert!(refusal(serde_json::json!({"limit": "many"})).contains("invalid log request"));
        assert!(refusal(serde_json::json!({"colour": "red"})).contains("invalid log request"));
        let query = LogQuery::from_params(&serde_json::json!({"level": "WARN", "after": 3}));
        let query = query.unwrap();
        assert_eq!(query.limit, DEFAULT_LIMIT);
        assert_eq!(LogQuery::from_params(&query.to_params()).unwrap(), query);
    }
}
