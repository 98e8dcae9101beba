//! The notice itself: what a publisher asks for, what gets stored and pushed, and which
//! subscribers are entitled to it. Validation lives here so that every store and every entry
//! point (packet route, scheduler) agrees on what a valid notice is.

use std::{ops::Deref, sync::Arc};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use shared::RawParams;

/// The largest message accepted, so that one notice can never blow up every subscriber's buffer.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The longest topic or subscriber name accepted.
pub const MAX_LABEL_BYTES: usize = 128;
/// The most topics one subscription may name.
pub const MAX_TOPICS: usize = 100;

/// A published notice, as stored and as pushed to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub id: i64,
    pub message: String,
    pub topic: Option<String>,
    pub to: Option<String>,
    /// The verified subject of the publisher's token; `null` when the publisher had none (a
    /// caller without a token, or a cluster member publishing on its own behalf).
    #[serde(default)]
    pub from: Option<String>,
    #[serde(serialize_with = "rfc3339_millis")]
    pub created_at: DateTime<Utc>,
}

/// A notice on its way to subscribers, with its JSON written once: a broadcast to a thousand
/// subscribers is serialized once, not a thousand times.
#[derive(Debug)]
pub struct OutgoingNotice {
    notice: Notice,
    /// What every subscriber's event carries as its data.
    pub json: RawParams,
}

impl OutgoingNotice {
    pub fn new(notice: Notice) -> Arc<OutgoingNotice> {
        let json = RawParams::to_raw(&notice).expect("a notice always serializes");
        Arc::new(OutgoingNotice { notice, json })
    }
}

impl Deref for OutgoingNotice {
    type Target = Notice;

    fn deref(&self) -> &Notice {
        &self.notice
    }
}

/// A notice before it has an id: validated, waiting to be stored now or at its scheduled time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNotice {
    pub message: String,
    pub topic: Option<String>,
    pub to: Option<String>,
    /// Never taken from the publisher's params: the routes set it from the verified caller.
    pub from: Option<String>,
}

impl NewNotice {
    /// Checks a publisher's fields; the error is meant to be shown to the caller as is.
    pub fn new(
        message: Option<String>,
        topic: Option<String>,
        to: Option<String>,
    ) -> Result<NewNotice, String> {
        let message = message.ok_or("message is required")?;
        if message.is_empty() {
            return Err("message must not be empty".into());
        }
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "message is {} bytes, the limit is {MAX_MESSAGE_BYTES}",
                message.len()
            ));
        }
        if let Some(topic) = &topic {
            validate_label("topic", topic)?;
        }
        if let Some(to) = &to {
            validate_label("to", to)?;
        }
        Ok(NewNotice {
            message,
            topic,
            to,
            from: None,
        })
    }

    /// The same notice, recorded as sent by `from` (the publisher's verified subject).
    pub fn sent_by(self, from: Option<String>) -> NewNotice {
        NewNotice { from, ..self }
    }

    /// The notice as stored, with its id. Timestamps keep millisecond precision, the same
    /// on every store.
    pub fn stored(self, id: i64, created_at: DateTime<Utc>) -> Notice {
        Notice {
            id,
            message: self.message,
            topic: self.topic,
            to: self.to,
            from: self.from,
            created_at: from_millis(created_at.timestamp_millis()),
        }
    }
}

/// Topics and names travel comma-separated in query strings, so a comma or a control character
/// in one would make it impossible to subscribe to.
pub fn validate_label(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if value.len() > MAX_LABEL_BYTES {
        return Err(format!(
            "{field} is {} bytes, the limit is {MAX_LABEL_BYTES}",
            value.len()
        ));
    }
    if value.chars().any(|c| c == ',' || c.is_control()) {
        return Err(format!(
            "{field} must not contain commas or control characters"
        ));
    }
    Ok(())
}

/// What one subscriber wants to receive.
///
/// A notice with `to` is a whisper: only subscribers with that name get it, whatever its topic
/// (a topic on a whisper is a label, it does not widen the audience). A notice with a topic and
/// no `to` goes to the subscribers of that topic. A notice with neither is a broadcast.
///
/// The routes make sure a verified caller's subscription carries its own name (the token's
/// subject) unless it holds `notice:admin`, so "subscribers with that name" means the
/// addressee.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    pub name: Option<String>,
    /// Distinct topics, in order. A plain vector: most subscribers name one or two topics, and
    /// every open subscription keeps its interest.
    pub topics: Vec<String>,
}

impl Interest {
    pub fn wants(&self, notice: &Notice) -> bool {
        readable_by(notice, self.name.as_deref())
            && match (&notice.to, &notice.topic) {
                (Some(_), _) | (None, None) => true,
                (None, Some(topic)) => self.topics.contains(topic),
            }
    }

    /// The whispers this subscriber may read: the ones addressed to its name.
    pub fn whispers(&self) -> Whispers {
        Whispers::To(self.name.clone())
    }
}

/// Which whispers a reader may see: the privacy rule for whispers, which live delivery (the
/// hub), replay (the feed) and the listing all apply, and the SQL stores write as
/// `recipient IS NULL OR recipient = name`. A whisper is for its addressee only; the only
/// readers who see every whisper are callers holding `notice:admin` and cluster members calling
/// directly over the authenticated packet link (no verified caller in the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whispers {
    /// Every whisper.
    All,
    /// Only the whispers addressed to this name; none at all for `None`.
    To(Option<String>),
}

impl Whispers {
    /// True when the reader may see `notice` (anything but a whisper to someone else).
    pub fn admits(&self, notice: &Notice) -> bool {
        match self {
            Whispers::All => true,
            Whispers::To(name) => readable_by(notice, name.as_deref()),
        }
    }

    /// The name whose whispers are visible (`None` for `All` and for no whisper at all), and
    /// whether every whisper is: the two values the SQL stores bind.
    pub fn sql_binds(&self) -> (bool, Option<&str>) {
        match self {
            Whispers::All => (true, None),
            Whispers::To(name) => (false, name.as_deref()),
        }
    }
}

/// False only for a whisper addressed to someone other than `reader`.
fn readable_by(notice: &Notice, reader: Option<&str>) -> bool {
    notice.to.as_deref().is_none_or(|to| reader == Some(to))
}

/// Notices are shown with millisecond RFC 3339 timestamps in UTC, the same on every store.
pub fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn rfc3339_millis<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_time(time))
}

/// Stores keep timestamps as Unix milliseconds: cheap to compare for schedules and retention.
pub fn from_millis(millis: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(topic: Option<&str>, to: Option<&str>) -> Notice {
        NewNotice {
            message: "hi".into(),
            topic: topic.map(Into::into),
            to: to.map(Into::into),
            from: None,
        }
        .stored(1, Utc::now())
    }

    fn interest(name: Option<&str>, topics: &[&str]) -> Interest {
        Interest {
            name: name.map(Into::into),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn broadcast_reaches_everyone() {
        assert!(interest(None, &[]).wants(&notice(None, None)));
        assert!(interest(Some("alice"), &["a"]).wants(&notice(None, None)));
    }

    #[test]
    fn topic_reaches_only_its_subscribers() {
        assert!(interest(None, &["a", "b"]).wants(&notice(Some("b"), None)));
        assert!(!interest(Some("alice"), &["a"]).wants(&notice(Some("c"), None)));
    }

    #[test]
    fn whisper_reaches_only_its_name() {
        assert!(interest(Some("alice"), &[]).wants(&notice(None, Some("alice"))));
        assert!(!interest(Some("bob"), &[]).wants(&notice(None, Some("alice"))));
        assert!(!interest(None, &[]).wants(&notice(None, Some("alice"))));
        // A whisper tagged with a topic stays private to its recipient.
        assert!(!interest(Some("bob"), &["room"]).wants(&notice(Some("room"), Some("alice"))));
        assert!(interest(Some("alice"), &[]).wants(&notice(Some("room"), Some("alice"))));
    }

    #[test]
    fn whispers_are_shown_to_their_addressee_and_to_readers_of_all() {
        let whisper = notice(Some("room"), Some("alice"));
        assert!(Whispers::All.admits(&whisper));
        assert!(Whispers::To(Some("alice".into())).admits(&whisper));
        assert!(!Whispers::To(Some("bob".into())).admits(&whisper));
        assert!(!Whispers::To(None).admits(&whisper));
        // Everything else is visible to every reader.
        for other in [notice(None, None), notice(Some("room"), None)] {
            assert!(Whispers::To(None).admits(&other));
            assert!(Whispers::To(Some("bob".into())).admits(&other));
        }
        // A subscriber reads whispers as its name, the same rule.
        assert_eq!(
            interest(Some("bob"), &[]).whispers(),
            Whispers::To(Some("bob".into()))
        );
    }

    #[test]
    fn bad_fields_are_rejected_with_a_reason() {
        assert_eq!(
            NewNotice::new(None, None, None).unwrap_err(),
            "message is required"
        );
        assert!(NewNotice::new(Some(String::new()), None, None).is_err());
        assert!(NewNotice::new(Some("x".repeat(MAX_MESSAGE_BYTES + 1)), None, None).is_err());
        assert!(NewNotice::new(Some("x".into()), Some("a,b".into()), None)
            .unwrap_err()
            .contains("commas"));
        assert!(NewNotice::new(Some("x".into()), None, Some(String::new())).is_err());
        assert!(NewNotice::new(Some("x".into()), Some("room".into()), Some("al".into())).is_ok());
    }

    #[test]
    fn notice_json_has_the_documented_fields() {
        let mut n = notice(Some("t"), None);
        n.created_at = from_millis(1_700_000_000_123);
        let expected = serde_json::json!({"id": 1, "message": "hi", "topic": "t", "to": null,
            "from": null, "created_at": "2023-11-14T22:13:20.123Z"});
        assert_eq!(serde_json::to_value(&n).unwrap(), expected);
        // Subscribers get the same JSON, written once per notice.
        let outgoing = OutgoingNotice::new(n.clone());
        assert_eq!(outgoing.json.to_value(), expected);
        n.from = Some("alice".into());
        assert_eq!(serde_json::to_value(&n).unwrap()["from"], "alice");
    }
}
