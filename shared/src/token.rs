//! Bearer tokens: verifying the JWTs callers present, and minting them.
//!
//! The gateway verifies the token of every HTTP request, and kv-service the `auth<TOKEN>` of its
//! text port, with one [`TokenVerifier`] built from the same flags ([`TokenKeyArgs`]):
//! - `--jwt-secret-file`: HS256, the key is the file's bytes less a trailing newline, so a token
//!   made by any standard JWT library with the same bytes is accepted;
//! - `--jwt-public-key-file`: RS256 or ES256, a PEM public key or a JWKS file (keys picked by
//!   the token's `kid`).
//!
//! `exp` is required and checked, `nbf` is checked when present, `aud` and `iss` when the flags
//! ask for them. A token's scopes are its `scope` claim, space-separated as OAuth 2 writes it (an
//! array of strings is accepted too); `admin` implies every scope. The token itself is never
//! logged: errors say what is wrong with it, never what it is.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    jwk::{AlgorithmParameters, JwkSet},
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use crate::{packet::Identity, secrets::read_secret_file};

/// The key flags every binary that verifies tokens takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TokenKeyArgs {
    /// Verify HS256 bearer tokens with this key: the file's bytes, less a trailing newline.
    #[arg(long, env = "JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// Verify RS256/ES256 bearer tokens with this public key: a PEM file, or a JWKS file.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE", conflicts_with = "jwt_secret_file")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Accept only tokens whose `aud` claim names this audience.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Accept only tokens whose `iss` claim is this issuer.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
}

impl TokenKeyArgs {
    /// The verifier the flags describe, or `None` when no key is given.
    pub fn verifier(&self) -> Result<Option<TokenVerifier>, TokenError> {
        let verifier = match (&self.jwt_secret_file, &self.jwt_public_key_file) {
            (Some(path), _) => TokenVerifier::from_secret(&read_secret_file(path)?),
            (None, Some(path)) => TokenVerifier::from_public_key_file(path)?,
            (None, None) => return Ok(None),
        };
        Ok(Some(verifier.restricted_to(
            self.jwt_audience.as_deref(),
            self.jwt_issuer.as_deref(),
        )))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {path} is empty")]
    EmptyKey { path: PathBuf },
    #[error("the key file {path} holds no usable key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    /// The token is malformed, expired, not yet valid, for another audience or issuer, or its
    /// signature does not verify. Says which, never the token.
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("cannot sign the token: {0}")]
    Sign(String),
    /// A token asked for with flags that cannot make one (no subject, no lifetime).
    #[error("{0}")]
    Request(String),
}

/// One key a token may be signed with.
struct Key {
    /// The JWKS key id; `None` for a key from a PEM file or a secret.
    id: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// Checks bearer tokens against the configured key(s); see the module docs.
pub struct TokenVerifier {
    keys: Vec<Key>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("TokenVerifier")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// The claims we read. Others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scope: Option<ScopeClaim>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    Spaced(String),
    List(Vec<String>),
}

impl TokenVerifier {
    /// HS256 with `secret` as the key.
    pub fn from_secret(secret: &[u8]) -> TokenVerifier {
        TokenVerifier {
            keys: vec![Key {
                id: None,
                key: DecodingKey::from_secret(secret),
                validation: validation(Algorithm::HS256),
            }],
        }
    }

    /// RS256/ES256 with the public key(s) in `path`: a PEM public key, or a JWKS document.
    pub fn from_public_key_file(path: &Path) -> Result<TokenVerifier, TokenError> {
        let text = std::fs::read(path).map_err(|source| TokenError::KeyFile {
            path: path.to_owned(),
            source,
        })?;
        let bad = |reason: String| TokenError::BadKey {
            path: path.to_owned(),
            reason,
        };
        let keys = if text.trim_ascii_start().starts_with(b"{") {
            let set: JwkSet = serde_json::from_slice(&text).map_err(|err| bad(err.to_string()))?;
            set.keys
                .iter()
                .map(|jwk| {
                    let algorithm = match &jwk.algorithm {
                        AlgorithmParameters::RSA(_) => Algorithm::RS256,
                        AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                        _ => return Err(bad("only RSA and EC keys are supported".into())),
                    };
                    Ok(Key {
                        id: jwk.common.key_id.clone(),
                        key: DecodingKey::from_jwk(jwk).map_err(|err| bad(err.to_string()))?,
                        validation: validation(algorithm),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        } else if let Ok(key) = DecodingKey::from_rsa_pem(&text) {
            vec![Key {
                id: None,
                key,
                validation: validation(Algorithm::RS256),
            }]
        } else {
            let key = DecodingKey::from_ec_pem(&text)
                .map_err(|err| bad(format!("neither an RSA nor an EC public key in PEM: {err}")))?;
            vec![Key {
                id: None,
                key,
                validation: validation(Algorithm::ES256),
            }]
        };
        if keys.is_empty() {
            return Err(bad("the key set is empty".into()));
        }
        Ok(TokenVerifier { keys })
    }

    /// Also requires the `aud` and `iss` claims, when given.
    pub fn restricted_to(mut self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        for key in &mut self.keys {
            let mut required = vec!["exp"];
            if let Some(audience) = audience {
                key.validation.set_audience(&[audience]);
                key.validation.validate_aud = true;
                required.push("aud");
            }
            if let Some(issuer) = issuer {
                key.validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            key.validation.set_required_spec_claims(&required);
        }
        self
    }

    /// The caller a token names, if the token is valid.
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|err| TokenError::Invalid(err.to_string()))?;
        let key = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|key| key.id.as_deref() == Some(kid.as_str()))
                .or_else(|| self.keys.iter().find(|key| key.id.is_none())),
            None => self.keys.first(),
        }
        .ok_or_else(|| TokenError::Invalid("signed with an unknown key id".into()))?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|err| TokenError::Invalid(err.to_string()))?
            .claims;
        let scopes = match claims.scope {
            None => Vec::new(),
            Some(ScopeClaim::Spaced(scopes)) => {
                scopes.split_whitespace().map(str::to_owned).collect()
            }
            Some(ScopeClaim::List(scopes)) => scopes,
        };
        Ok(Identity {
            sub: claims.sub,
            scopes,
        })
    }
}

fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp"]);
    // Audience checks only when a `--jwt-audience` asks for them.
    validation.validate_aud = false;
    validation
}

/// What a minted token says.
#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    scope: String,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// In a scope list (`--anonymous-scopes`, `--scope` of a minted token): every scope, the same
/// as `admin`.
pub const ALL_SCOPES: &str = "*";

/// The scopes of a scope list (`--anonymous-scopes`, a minted token's `--scope`): separated by
/// spaces or commas, `*` for all, duplicates dropped.
pub fn parse_scopes(text: &str) -> Vec<String> {
    let mut scopes: Vec<String> = Vec::new();
    for scope in text.split(|c: char| c.is_whitespace() || c == ',') {
        let scope = match scope {
            "" => continue,
            ALL_SCOPES => crate::packet::ADMIN_SCOPE,
            scope => scope,
        };
        if !scopes.iter().any(|known| known == scope) {
            scopes.push(scope.to_owned());
        }
    }
    scopes
}

/// The flags of the commands that mint a token: `gateway mint-token` and `msctl token`.
#[derive(Debug, Clone, clap::Args)]
pub struct MintArgs {
    /// The key: the file's bytes, less a trailing newline (the gateway's --jwt-secret-file).
    #[arg(long, env = "JWT_SECRET_FILE")]
    pub jwt_secret_file: PathBuf,
    /// The caller the token names (its `sub` claim).
    #[arg(long, env = "TOKEN_SUB")]
    pub sub: String,
    /// The scopes it grants, separated by spaces ("kv:read kv:write"; "admin" for every scope).
    #[arg(long, env = "TOKEN_SCOPE")]
    pub scope: String,
    /// How long it is valid.
    #[arg(long, env = "TOKEN_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Its `aud` claim, for gateways started with --jwt-audience.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub audience: Option<String>,
    /// Its `iss` claim, for gateways started with --jwt-issuer.
    #[arg(long, env = "JWT_ISSUER")]
    pub issuer: Option<String>,
}

impl MintArgs {
    /// The token these flags ask for, signed with the key file's HS256 key.
    pub fn mint(&self) -> Result<String, TokenError> {
        if self.sub.trim().is_empty() {
            return Err(TokenError::Request("--sub must name the caller".into()));
        }
        if self.ttl.is_zero() {
            return Err(TokenError::Request("--ttl must be longer than 0".into()));
        }
        let secret = read_secret_file(&self.jwt_secret_file)?;
        mint(
            &secret,
            &TokenRequest {
                subject: &self.sub,
                scopes: &parse_scopes(&self.scope),
                ttl: self.ttl,
                audience: self.audience.as_deref(),
                issuer: self.issuer.as_deref(),
            },
        )
    }
}

/// What to put in a minted token.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    pub subject: &'a str,
    pub scopes: &'a [String],
    pub ttl: Duration,
    pub audience: Option<&'a str>,
    pub issuer: Option<&'a str>,
}

/// An HS256 token for `request`, signed with `secret`: what `gateway mint-token` prints.
pub fn mint(secret: &[u8], request: &TokenRequest<'_>) -> Result<String, TokenError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = MintedClaims {
        sub: request.subject,
        scope: request.scopes.join(" "),
        iat: now,
        exp: now.saturating_add(request.ttl.as_secs().max(1)),
        aud: request.audience,
        iss: request.issuer,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|err| TokenError::Sign(err.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minted(secret: &[u8], ttl: Duration) -> String {
        let scopes = ["kv:read".to_owned(), "kv:write".to_owned()];
        mint(
            secret,
            &TokenRequest {
                subject: "alice",
                scopes: &scopes,
                ttl,
                audience: None,
                issuer: None,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_minted_token_verifies_with_its_secret() {
        let identity = TokenVerifier::from_secret(b"s3cret")
            .verify(&minted(b"s3cret", Duration::from_secs(60)))
            .unwrap();
        assert_eq!(identity.sub.as_deref(), Some("alice"));
        assert_eq!(identity.scopes, ["kv:read", "kv:write"]);
        assert!(identity.has_scope("kv:write"));
        assert!(!identity.has_scope("notice:admin"));
    }

    #[test]
    fn another_secret_is_refused() {
        let token = minted(b"s3cret", Duration::from_secs(60));
        assert!(matches!(
            TokenVerifier::from_secret(b"other").verify(&token),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn audience_and_issuer_are_checked_when_asked_for() {
        let token = minted(b"k", Duration::from_secs(60));
        let strict = TokenVerifier::from_secret(b"k").restricted_to(Some("api"), None);
        assert!(strict.verify(&token).is_err());
        let scopes = ["a".to_owned()];
        let token = mint(
            b"k",
            &TokenRequest {
                subject: "bob",
                scopes: &scopes,
                ttl: Duration::from_secs(60),
                audience: Some("api"),
                issuer: Some("us"),
            },
        )
        .unwrap();
        let strict = TokenVerifier::from_secret(b"k").restricted_to(Some("api"), Some("us"));
        assert_eq!(strict.verify(&token).unwrap().sub.as_deref(), Some("bob"));
        let other_issuer = TokenVerifier::from_secret(b"k").restricted_to(None, Some("them"));
        assert!(other_issuer.verify(&token).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let verifier = TokenVerifier::from_secret(b"k");
        for token in [
            "",
            ".",
            "..",
            "a.b.c",
            "eyJhbGciOiJub25lIn0.e30.",
            "Bearer x",
        ] {
            assert!(verifier.verify(token).is_err(), "{token:?}");
        }
    }
}
