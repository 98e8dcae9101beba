//! The gateway over HTTP, as msctl uses it: JSON requests with the bearer token, JSON answers,
//! and event streams. Every failure becomes a [`CliError`] that says what to do about it.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use reqwest::{header, Method, RequestBuilder, Response, StatusCode, Url};
use serde_json::Value;

use crate::{sse::EventReader, CliError};

/// What a key keeps as it is in a path: `/` separates nothing in kv (a key may contain it), but
/// the gateway routes `/kv/a/b` to the key `a/b`, so it may stay. Everything a URL gives another
/// meaning is encoded.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

/// `text` as it goes into a URL path.
pub fn path_escape(text: &str) -> String {
    utf8_percent_encode(text, PATH_SEGMENT).to_string()
}

/// A connection to one gateway.
pub struct Gateway {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
    /// For the whole of a plain request; streams only for their answer's head.
    timeout: Duration,
}

impl Gateway {
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> Result<Gateway, CliError> {
        let base = Url::parse(url).map_err(|err| {
            CliError::Usage(format!(
                "--gateway {url:?} is not a URL ({err}); give one like http://localhost:8000"
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(CliError::Usage(format!(
                "--gateway {url:?} must be an http:// or https:// URL with a host"
            )));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|err| CliError::Usage(format!("cannot set up HTTP: {err}")))?;
        Ok(Gateway {
            base,
            token: token.filter(|token| !token.trim().is_empty()),
            http,
            timeout,
        })
    }

    fn url(&self, path: &str) -> Result<Url, CliError> {
        self.base
            .join(path)
            .map_err(|err| CliError::Usage(format!("{path:?} cannot be part of a URL: {err}")))
    }

    fn request(&self, method: Method, path: &str) -> Result<RequestBuilder, CliError> {
        let mut request = self.http.request(method, self.url(path)?);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        Ok(request)
    }

    /// Sends a request and reads its JSON answer; a status of 400 or more is an error carrying
    /// the gateway's `error` message.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let mut request = self
            .request(method.clone(), path)?
            .query(query)
            .timeout(self.timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|err| self.unreachable(err))?;
        let status = response.status();
        let text = response.text().await.map_err(|err| self.unreachable(err))?;
        if !status.is_success() {
            return Err(refused(&method, path, status, &text));
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|err| {
            CliError::BadAnswer(format!(
                "{method} {path} answered {status} with no JSON: {err}"
            ))
        })
    }

    /// `GET path?query` as an event stream. A plain answer (a service that does not stream
    /// this) is [`CliError::NotAStream`]; an error status is refused as in [`Gateway::json`].
    pub async fn stream(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<EventReader, CliError> {
        let request = self
            .request(Method::GET, path)?
            .query(query)
            .header(header::ACCEPT, "text/event-stream");
        let response = tokio::time::timeout(self.timeout, request.send())
            .await
            .map_err(|_| CliError::Unreachable {
                url: self.base.to_string(),
                reason: format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ),
            })?
            .map_err(|err| self.unreachable(err))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(refused(&Method::GET, path, status, &text));
        }
        if !is_event_stream(&response) {
            return Err(CliError::NotAStream {
                path: path.to_owned(),
            });
        }
        Ok(EventReader::new(response))
    }

    fn unreachable(&self, err: reqwest::Error) -> CliError {
        let reason = if err.is_timeout() {
            format!(
                "no answer within {}",
                humantime::format_duration(self.timeout)
            )
        } else {
            // The innermost cause says the most (connection refused, DNS); the outer ones only
            // repeat the URL.
            let mut cause: &dyn std::error::Error = &err;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            cause.to_string()
        };
        CliError::Unreachable {
            url: self.base.to_string(),
            reason,
        }
    }
}

fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"))
}

/// The error for an answer with `status`: the gateway's (or service's) `error` message when the
/// body has one.
fn refused(method: &Method, path: &str, status: StatusCode, body: &str) -> CliError {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|value| {
            value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| body.chars().take(200).collect());
    CliError::Refused {
        request: format!("{method} {path}"),
        status: status.as_u16(),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_slashes_and_lose_what_a_url_would_read() {
        assert_eq!(path_escape("a/b"), "a/b");
        assert_eq!(path_escape("a b?c#d%"), "a%20b%3Fc%23d%25");
        assert_eq!(path_escape("é"), "%C3%A9");
    }

    #[test]
    fn a_gateway_url_must_be_http() {
        let timeout = Duration::from_secs(1);
        assert!(Gateway::new("http://localhost:8000", None, timeout).is_ok());
        assert!(matches!(
            Gateway::new("localhost:8000", None, timeout),
            Err(CliError::Usage(_))
        ));
        assert!(matches!(
            Gateway::new("ftp://x", None, timeout),
            Err(CliError::Usage(_))
        ));
    }

    #[test]
    fn a_refusal_carries_the_services_message() {
        let error = refused(
            &Method::GET,
            "/kv/x",
            StatusCode::NOT_FOUND,
            r#"{"error":"no such key: x"}"#,
        );
        assert_eq!(error.to_string(), "GET /kv/x: 404 no such key: x");
    }
}
