//! Who a request comes from, and whether it may do what it asks: bearer tokens and scopes.
//!
//! Every route may need a scope, declared by the nodes that register it (`kv:read`, ...); the
//! gateway's own `/metrics` and `/_/topology` need `admin`, which implies every scope. A request
//! proves its scopes with a JWT, in `Authorization: Bearer <token>` or, for a browser's
//! `EventSource` (which cannot set headers), in an `access_token` query parameter. The token is
//! checked here and never goes further: it is left out of the params sent to the node and out of
//! every log line; the node receives the verified caller (`Packet.auth`) instead.
//!
//! With a token key (`--jwt-secret-file`, `--jwt-public-key-file`):
//! - a bad token is a 401 (`WWW-Authenticate: Bearer error="invalid_token"`);
//! - no token is an anonymous caller with the `--anonymous-scopes`, and a 401
//!   (`WWW-Authenticate: Bearer`) where those do not reach;
//! - a valid token without the route's scope is a 403 naming the scope;
//! - a route that declares no scope needs a valid token (or an anonymous `*` grant).
//!
//! Without a key the gateway is in protected mode, as Redis is without a password: callers on
//! loopback addresses may do everything, callers from other hosts only what `--anonymous-scopes`
//! grants (403 beyond it). Protected mode ([`HTTP_LISTENER`]) refuses to start such a gateway on a non-loopback
//! address unless `--anonymous-scopes` says what other hosts may do.

use std::{
    net::SocketAddr,
    sync::{Arc, LazyLock},
};

use axum::{
    extract::connect_info::ConnectInfo,
    http::{header, Extensions, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use shared::{
    packet::{Identity, ADMIN_SCOPE},
    server::ListenerAdvice,
    token::{TokenError, TokenVerifier},
};

use crate::{error::json_error, rate_limit::RateKey};

/// The query parameter that may carry the token, for clients that cannot set headers.
pub const ACCESS_TOKEN_PARAM: &str = "access_token";

// The scope list's syntax lives in shared, where `msctl token` reads it too.
pub use shared::token::{parse_scopes, ALL_SCOPES};

/// True for a loopback address, IPv4-mapped IPv6 ones included.
fn is_loopback(addr: SocketAddr) -> bool {
    shared::server::is_loopback(addr.ip())
}

/// The client's address, as the HTTP server records it in every request ([`crate::http`]).
/// `None` when it did not, which counts as a client on another host.
pub fn peer_of(extensions: &Extensions) -> Option<SocketAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer)
}

/// The caller of one request, once its token (if any) is checked.
#[derive(Debug, Clone)]
pub struct Caller {
    /// What the node receives as `Packet.auth`.
    pub identity: Identity,
    /// True when the identity comes from a verified token, false for an anonymous caller.
    pub verified: bool,
    /// The client's address, when the server recorded it.
    pub peer: Option<SocketAddr>,
}

impl Caller {
    /// Whose rate-limit bucket the request takes from: the token's subject, else the address.
    pub fn rate_key(&self) -> RateKey {
        match (&self.identity.sub, self.peer) {
            (Some(sub), _) if self.verified => RateKey::Subject(sub.as_str().into()),
            (_, Some(peer)) => RateKey::address(peer.ip()),
            (_, None) => RateKey::Unknown,
        }
    }
}

/// Why a request is refused before it is routed or forwarded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// 401: no token, and what anonymous callers may do does not cover the request.
    #[error("{}", needs_token(.scope.as_deref()))]
    TokenRequired { scope: Option<String> },
    /// 401: the token is malformed, expired, not yet valid, for another audience or issuer, or
    /// badly signed. The reason never contains the token.
    #[error("the bearer token was refused: {0}")]
    InvalidToken(String),
    /// 403: a valid token without the scope the route needs.
    #[error("this request needs the scope {0:?}, which the token does not grant")]
    MissingScope(String),
    /// 403: protected mode (no token key) and a client on another host, beyond what
    /// `--anonymous-scopes` grants.
    #[error("{}", protected_mode(.scope.as_deref()))]
    ProtectedMode { scope: Option<String> },
}

fn needs_token(scope: Option<&str>) -> String {
    match scope {
        Some(scope) => format!("this request needs a bearer token with the scope {scope:?}"),
        None => "this request needs a bearer token".to_owned(),
    }
}

fn protected_mode(scope: Option<&str>) -> String {
    let what = match scope {
        Some(scope) => format!("the scope {scope:?}"),
        None => "a token".to_owned(),
    };
    format!(
        "this request needs {what}: the gateway has no token key configured and serves clients \
         on other hosts only what --anonymous-scopes grants"
    )
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::TokenRequired { .. } | AuthError::InvalidToken(_) => {
                StatusCode::UNAUTHORIZED
            }
            AuthError::MissingScope(_) | AuthError::ProtectedMode { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750), when a token would help.
    fn challenge(&self) -> Option<HeaderValue> {
        match self {
            AuthError::TokenRequired { .. } => Some(HeaderValue::from_static("Bearer")),
            AuthError::InvalidToken(_) => {
                Some(HeaderValue::from_static(r#"Bearer error="invalid_token""#))
            }
            AuthError::MissingScope(scope) => {
                // A scope is quoted only when it is a valid OAuth scope token, so a scope a node
                // registered can never break the header.
                let valid = !scope.is_empty()
                    && scope.bytes().all(|b| {
                        b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b)
                    });
                let value = if valid {
                    format!(r#"Bearer error="insufficient_scope", scope="{scope}""#)
                } else {
                    r#"Bearer error="insufficient_scope""#.to_owned()
                };
                HeaderValue::from_str(&value).ok()
            }
            AuthError::ProtectedMode { .. } => None,
        }
    }

    /// Logs the refusal (never the token) with the request's id, at debug level like every
    /// other refusal that is the caller's business.
    pub fn log(&self, request_id: &str) {
        tracing::debug!(status = self.status().as_u16(), request_id, error = %self,
            "request refused");
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let mut response = json_error(self.status(), &self.to_string());
        if let Some(challenge) = self.challenge() {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// Decides who requests come from and what they may do; built once from the configuration.
#[derive(Debug, Clone)]
pub struct Authenticator {
    verifier: Option<Arc<TokenVerifier>>,
    anonymous: Vec<String>,
}

/// Every scope, as loopback callers in protected mode hold it.
static EVERY_SCOPE: LazyLock<Vec<String>> = LazyLock::new(|| vec![ADMIN_SCOPE.to_owned()]);

impl Authenticator {
    /// `verifier` checks tokens (`None`: protected mode); `anonymous` are the scopes granted to
    /// requests without a token.
    pub fn new(verifier: Option<Arc<TokenVerifier>>, anonymous: Vec<String>) -> Authenticator {
        Authenticator {
            verifier,
            anonymous,
        }
    }

    /// Who the request comes from: the verified token's identity, or an anonymous caller with
    /// the scopes it is granted. Refused at once: a bad token, and an anonymous caller that is
    /// granted nothing at all (so that it learns nothing of the routes either).
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        peer: Option<SocketAddr>,
    ) -> Result<Caller, AuthError> {
        let Some(verifier) = &self.verifier else {
            // Protected mode: with no key a token proves nothing, so it is not looked at.
            let scopes = if peer.is_some_and(is_loopback) {
                EVERY_SCOPE.clone()
            } else if self.anonymous.is_empty() {
                return Err(AuthError::ProtectedMode { scope: None });
            } else {
                self.anonymous.clone()
            };
            return Ok(anonymous(scopes, peer));
        };
        match presented_token(headers, query)? {
            Some(token) => {
                let identity = verifier.verify(&token).map_err(|err| match err {
                    TokenError::Invalid(reason) => AuthError::InvalidToken(reason),
                    other => AuthError::InvalidToken(other.to_string()),
                })?;
                Ok(Caller {
                    identity,
                    verified: true,
                    peer,
                })
            }
            None if self.anonymous.is_empty() => Err(AuthError::TokenRequired { scope: None }),
            None => Ok(anonymous(self.anonymous.clone(), peer)),
        }
    }

    /// Whether `caller` may use a route needing `scopes` (all of them). A route that declares
    /// none needs a verified token, or an anonymous caller holding every scope.
    pub fn authorize(&self, caller: &Caller, scopes: &[Arc<str>]) -> Result<(), AuthError> {
        let missing = if scopes.is_empty() {
            if caller.verified || caller.identity.has_scope(ADMIN_SCOPE) {
                return Ok(());
            }
            None
        } else {
            match scopes
                .iter()
                .find(|scope| !caller.identity.has_scope(scope))
            {
                None => return Ok(()),
                Some(scope) => Some(scope.to_string()),
            }
        };
        // A verified caller is refused only for a scope it lacks (routes without one are open
        // to it), so `missing` is set whenever `verified` is.
        Err(match (missing, caller.verified, self.verifier.is_some()) {
            (Some(scope), true, _) => AuthError::MissingScope(scope),
            (scope, _, true) => AuthError::TokenRequired { scope },
            (scope, _, false) => AuthError::ProtectedMode { scope },
        })
    }

    /// [`Authenticator::authenticate`] then [`Authenticator::authorize`] for one scope: for
    /// the gateway's own endpoints.
    pub fn require(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        peer: Option<SocketAddr>,
        scope: &str,
    ) -> Result<Caller, AuthError> {
        let caller = self.authenticate(headers, query, peer)?;
        self.authorize(&caller, &[scope.into()])?;
        Ok(caller)
    }
}

fn anonymous(scopes: Vec<String>, peer: Option<SocketAddr>) -> Caller {
    Caller {
        identity: Identity { sub: None, scopes },
        verified: false,
        peer,
    }
}

/// The token the request presents: the `Authorization: Bearer` header, else the
/// `access_token` query parameter (an empty one counts as absent).
fn presented_token(headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, AuthError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let malformed =
            || AuthError::InvalidToken("the Authorization header is not `Bearer <token>`".into());
        let value = value.to_str().map_err(|_| malformed())?.trim();
        let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(malformed());
        }
        return Ok(Some(token.to_owned()));
    }
    let Some(query) = query else {
        return Ok(None);
    };
    Ok(form_urlencoded::parse(query.as_bytes())
        .find(|(name, value)| name == ACCESS_TOKEN_PARAM && !value.is_empty())
        .map(|(_, token)| token.into_owned()))
}

/// What protected mode says about the HTTP listener. Without a token key, a gateway on a
/// non-loopback address needs `--anonymous-scopes` (its opt-out, what `--insecure` is for the
/// other listeners), checked at start with [`shared::server::check_protected_mode`].
pub const HTTP_LISTENER: ListenerAdvice = ListenerAdvice {
    serves: "HTTP",
    lacking: "a token key",
    risk: "anyone who can reach it could do everything",
    authenticate: "Give --jwt-secret-file FILE (or --jwt-public-key-file) to require tokens",
    loopback: "a loopback address such as 127.0.0.1:8000",
    opt_out: "say what callers without a token may do with --anonymous-scopes (e.g. \"kv:read\", \
        or '*' for a throwaway development stack)",
    opt_out_warning: "no token key: clients on other hosts get the --anonymous-scopes without \
        any authentication",
};

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use shared::{
        server::check_protected_mode,
        token::{mint, TokenRequest},
    };

    use super::*;

    const SECRET: &[u8] = b"test secret";

    fn token(scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        mint(
            SECRET,
            &TokenRequest {
                subject: "alice",
                scopes: &scopes,
                ttl: Duration::from_secs(60),
                audience: None,
                issuer: None,
            },
        )
        .unwrap()
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    fn with_key(anonymous: &str) -> Authenticator {
        Authenticator::new(
            Some(Arc::new(TokenVerifier::from_secret(SECRET))),
            parse_scopes(anonymous),
        )
    }

    fn without_key(anonymous: &str) -> Authenticator {
        Authenticator::new(None, parse_scopes(anonymous))
    }

    fn loopback() -> Option<SocketAddr> {
        Some("127.0.0.1:5000".parse().unwrap())
    }

    fn remote() -> Option<SocketAddr> {
        Some("192.0.2.7:5000".parse().unwrap())
    }

    fn scopes(names: &[&str]) -> Vec<Arc<str>> {
        names.iter().map(|&name| name.into()).collect()
    }

    #[test]
    fn anonymous_scopes_parse_with_spaces_commas_and_star() {
        assert_eq!(
            parse_scopes("kv:read  notice:subscribe"),
            ["kv:read", "notice:subscribe"]
        );
        assert_eq!(parse_scopes("kv:read,kv:read, x"), ["kv:read", "x"]);
        assert_eq!(parse_scopes("*"), [ADMIN_SCOPE]);
        assert!(parse_scopes("  ").is_empty());
    }

    #[test]
    fn a_token_in_the_header_or_the_query_is_verified() {
        let auth = with_key("");
        let caller = auth
            .authenticate(&bearer(&token(&["kv:read"])), None, remote())
            .unwrap();
        assert!(caller.verified);
        assert_eq!(caller.identity.sub.as_deref(), Some("alice"));
        assert_eq!(caller.identity.scopes, ["kv:read"]);
        let query = format!("a=1&access_token={}", token(&["x"]));
        let caller = auth
            .authenticate(&HeaderMap::new(), Some(&query), remote())
            .unwrap();
        assert_eq!(caller.identity.scopes, ["x"]);
    }

    #[test]
    fn bad_tokens_and_headers_are_401_invalid_token() {
        let auth = with_key("kv:read");
        for header in ["Bearer nope", "Basic dXNlcjpwdw==", "Bearer", "Bearer  "] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, header.parse().unwrap());
            let err = auth.authenticate(&headers, None, loopback()).unwrap_err();
            assert!(matches!(err, AuthError::InvalidToken(_)), "{header}: {err}");
            assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(
                err.challenge().unwrap(),
                HeaderValue::from_static(r#"Bearer error="invalid_token""#)
            );
        }
    }

    #[test]
    fn scopes_decide_with_a_key() {
        let auth = with_key("kv:read");
        let reader = auth
            .authenticate(&bearer(&token(&["kv:read"])), None, remote())
            .unwrap();
        assert!(auth.authorize(&reader, &scopes(&["kv:read"])).is_ok());
        let err = auth.authorize(&reader, &scopes(&["kv:write"])).unwrap_err();
        assert!(matches!(&err, AuthError::MissingScope(s) if s == "kv:write"));
        assert!(err.to_string().contains("kv:write"));
        // A route without a scope needs any valid token.
        assert!(auth.authorize(&reader, &[]).is_ok());

        let admin = auth
            .authenticate(&bearer(&token(&["admin"])), None, remote())
            .unwrap();
        assert!(auth
            .authorize(&admin, &scopes(&["kv:write", "notice:admin"]))
            .is_ok());

        let anonymous = auth
            .authenticate(&HeaderMap::new(), None, loopback())
            .unwrap();
        assert!(!anonymous.verified);
        assert!(auth.authorize(&anonymous, &scopes(&["kv:read"])).is_ok());
        let err = auth
            .authorize(&anonymous, &scopes(&["kv:write"]))
            .unwrap_err();
        assert!(matches!(err, AuthError::TokenRequired { .. }));
        assert_eq!(err.challenge().unwrap(), "Bearer");
        assert!(matches!(
            auth.authorize(&anonymous, &[]),
            Err(AuthError::TokenRequired { scope: None })
        ));
    }

    #[test]
    fn with_a_key_and_no_anonymous_scopes_a_request_without_token_is_401() {
        let auth = with_key("");
        let err = auth
            .authenticate(&HeaderMap::new(), None, loopback())
            .unwrap_err();
        assert!(matches!(err, AuthError::TokenRequired { scope: None }));
        // An anonymous `*` grant reaches routes without a scope too.
        let open = with_key("*");
        let caller = open
            .authenticate(&HeaderMap::new(), None, remote())
            .unwrap();
        assert!(open.authorize(&caller, &[]).is_ok());
        assert!(open.authorize(&caller, &scopes(&["kv:write"])).is_ok());
    }

    #[test]
    fn protected_mode_trusts_loopback_only() {
        let auth = without_key("");
        let local = auth
            .authenticate(&HeaderMap::new(), None, loopback())
            .unwrap();
        assert!(auth.authorize(&local, &scopes(&["notice:admin"])).is_ok());
        assert!(auth.authorize(&local, &[]).is_ok());
        let mapped = Some("[::ffff:127.0.0.1]:80".parse().unwrap());
        assert!(auth.authenticate(&HeaderMap::new(), None, mapped).is_ok());
        for peer in [remote(), None] {
            let err = auth
                .authenticate(&HeaderMap::new(), None, peer)
                .unwrap_err();
            assert!(matches!(err, AuthError::ProtectedMode { .. }));
            assert_eq!(err.status(), StatusCode::FORBIDDEN);
        }
        // A token proves nothing without a key.
        let err = auth
            .authenticate(&bearer(&token(&["admin"])), None, remote())
            .unwrap_err();
        assert!(matches!(err, AuthError::ProtectedMode { .. }));

        let granted = without_key("kv:read");
        let caller = granted
            .authenticate(&HeaderMap::new(), None, remote())
            .unwrap();
        assert!(granted.authorize(&caller, &scopes(&["kv:read"])).is_ok());
        let err = granted
            .authorize(&caller, &scopes(&["kv:write"]))
            .unwrap_err();
        assert!(matches!(&err, AuthError::ProtectedMode { scope: Some(s) } if s == "kv:write"));
    }

    #[test]
    fn the_rate_key_is_the_subject_else_the_address() {
        let auth = with_key("kv:read");
        let alice = auth
            .authenticate(&bearer(&token(&[])), None, remote())
            .unwrap();
        assert_eq!(alice.rate_key(), RateKey::Subject("alice".into()));
        let anonymous = auth
            .authenticate(&HeaderMap::new(), None, remote())
            .unwrap();
        assert_eq!(
            anonymous.rate_key(),
            RateKey::address(remote().unwrap().ip())
        );
    }

    #[test]
    fn a_scope_that_is_not_a_scope_token_stays_out_of_the_challenge() {
        let err = AuthError::MissingScope("bad\"scope".into());
        assert_eq!(
            err.challenge().unwrap(),
            r#"Bearer error="insufficient_scope""#
        );
        let err = AuthError::MissingScope("kv:write".into());
        assert_eq!(
            err.challenge().unwrap(),
            r#"Bearer error="insufficient_scope", scope="kv:write""#
        );
    }

    #[test]
    fn the_listen_rule_of_protected_mode() {
        let check = |addr: &str, has_key, anonymous_scopes| {
            check_protected_mode(
                addr.parse().unwrap(),
                has_key,
                anonymous_scopes,
                &HTTP_LISTENER,
            )
        };
        assert!(check("0.0.0.0:8000", false, false).is_err());
        assert!(check("0.0.0.0:8000", false, true).is_ok());
        assert!(check("0.0.0.0:8000", true, false).is_ok());
        assert!(check("127.0.0.1:8000", false, false).is_ok());
        assert!(check("[::1]:8000", false, false).is_ok());
        let message = check("0.0.0.0:8000", false, false).unwrap_err().to_string();
        assert_eq!(
            message,
            "refusing to serve HTTP on 0.0.0.0:8000 without a token key: anyone who can reach it \
             could do everything. Give --jwt-secret-file FILE (or --jwt-public-key-file) to \
             require tokens, listen on a loopback address such as 127.0.0.1:8000, or say what \
             callers without a token may do with --anonymous-scopes (e.g. \"kv:read\", or '*' \
             for a throwaway development stack)"
        );
    }
}
