//! Authentication and scopes on the text port, over real TCP against the service in process
//! (port 0): `auth<TOKEN>` before anything else, what each scope allows, three refused tokens
//! close the connection, pipelined auth, and the deadlines that close silent or anonymous
//! connections.

mod common;

use std::{sync::Arc, time::Duration};

use common::{kv_store, token_with, Backend, Service, TextClient, WAIT};
use kv_service::{
    config::{StoreSpec, TextConfig},
    text_protocol::{OwnedReply, MAX_TOKEN_BYTES},
    text_server::AUTH_REQUIRED,
    Config,
};
use shared::token::TokenVerifier;

const SECRET: &[u8] = b"text-port-test-secret";

fn token(subject: &str, scopes: &str) -> String {
    token_with(SECRET, subject, scopes)
}

fn ok(text: &str) -> OwnedReply {
    OwnedReply::Ok(text.into())
}
fn value(text: &str) -> OwnedReply {
    OwnedReply::Value(text.into())
}
fn none(text: &str) -> OwnedReply {
    OwnedReply::None(text.into())
}
fn err(text: &str) -> OwnedReply {
    OwnedReply::Err(text.into())
}

/// The error text of `reply`, which must be an error.
fn error_text(reply: OwnedReply) -> String {
    match reply {
        OwnedReply::Err(text) => text,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn text_config() -> TextConfig {
    TextConfig {
        tokens: Some(Arc::new(TokenVerifier::from_secret(SECRET))),
        ..TextConfig::default()
    }
}

async fn start(store: StoreSpec, text: TextConfig) -> Service {
    Service::start_with(Config {
        text,
        ..Config::standalone(store)
    })
    .await
}

/// Reads until the server closes the connection (bounded); returns the answers it sent first.
async fn replies_until_closed(client: &mut TextClient) -> Vec<OwnedReply> {
    let mut replies = Vec::new();
    while let Some(reply) = client.try_reply().await {
        replies.push(reply);
        assert!(replies.len() < 1000, "the connection is not closing");
    }
    replies
}

#[tokio::test]
async fn commands_before_auth_are_refused_and_a_good_token_lets_them_through() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut client = service.text().await;
    assert_eq!(client.call("get<a>").await, err(AUTH_REQUIRED));
    assert_eq!(client.call("put<a,1>").await, err(AUTH_REQUIRED));
    assert_eq!(client.call("del<a>").await, err(AUTH_REQUIRED));
    // A malformed request still gets its own error.
    assert_eq!(client.call("set<a,1>").await, err("unknown command set"),);

    let token = token("alice", "kv:read kv:write");
    assert_eq!(client.call(format!("auth<{token}>")).await, ok("alice"));
    // The put refused before auth did not happen.
    assert_eq!(client.call("get<a>").await, none("a"));
    assert_eq!(client.call("put<a,1>").await, ok("a"));
    assert_eq!(client.call("get<a>").await, value("1"));
    assert_eq!(client.call("del<a>").await, ok("a"));
    // The command word is case-insensitive, like the others.
    assert_eq!(client.call(format!("AUTH<{token}>")).await, ok("alice"));
}

#[tokio::test]
async fn each_connection_authenticates_for_itself() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut first = service.text().await;
    let token = token("alice", "kv:read kv:write");
    assert_eq!(first.call(format!("auth<{token}>")).await, ok("alice"));
    assert_eq!(first.call("put<a,1>").await, ok("a"));
    let mut second = service.text().await;
    assert_eq!(second.call("get<a>").await, err(AUTH_REQUIRED));
}

#[tokio::test]
async fn refused_tokens_are_errors_and_the_third_closes_the_connection() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut client = service.text().await;

    let garbage = error_text(client.call("auth<not-a-token>").await);
    assert!(garbage.starts_with("invalid token"), "{garbage}");
    assert!(
        !garbage.contains("not-a-token"),
        "the error repeats the token: {garbage}"
    );
    // Still connected, still unauthenticated.
    assert_eq!(client.call("get<a>").await, err(AUTH_REQUIRED));

    let forged = token_with(b"another secret", "mallory", "admin");
    let refused = error_text(client.call(format!("auth<{forged}>")).await);
    assert!(refused.starts_with("invalid token"), "{refused}");
    assert_eq!(client.call("get<a>").await, err(AUTH_REQUIRED));

    client.send(format!("auth<{forged}>")).await;
    let last = replies_until_closed(&mut client).await;
    assert_eq!(last.len(), 1, "{last:?}");
    let last = error_text(last.into_iter().next().unwrap());
    assert!(last.contains("too many failed attempts"), "{last}");

    // Another connection is not affected.
    let mut fresh = service.text().await;
    let good = token("alice", "kv:read");
    assert_eq!(fresh.call(format!("auth<{good}>")).await, ok("alice"));
    assert_eq!(fresh.call("get<a>").await, none("a"));
}

#[tokio::test]
async fn requests_pipelined_after_the_third_refused_token_are_not_answered() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut client = service.text().await;
    client.send("auth<x>auth<y>auth<z>put<a,1>get<a>").await;
    let replies = replies_until_closed(&mut client).await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(replies
        .iter()
        .all(|reply| matches!(reply, OwnedReply::Err(_))));
}

#[tokio::test]
async fn a_refused_token_ends_an_earlier_authentication() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut client = service.text().await;
    let good = token("alice", "kv:read kv:write");
    assert_eq!(client.call(format!("auth<{good}>")).await, ok("alice"));
    assert_eq!(client.call("put<a,1>").await, ok("a"));
    assert!(matches!(client.call("auth<bad>").await, OwnedReply::Err(_)));
    assert_eq!(client.call("get<a>").await, err(AUTH_REQUIRED));
}

#[tokio::test]
async fn scopes_decide_what_each_command_may_do() {
    let service = start(StoreSpec::Memory, text_config()).await;

    let mut writer = service.text().await;
    let write_only = token("writer", "kv:write");
    assert_eq!(
        writer.call(format!("auth<{write_only}>")).await,
        ok("writer")
    );
    assert_eq!(writer.call("put<a,1>").await, ok("a"));
    assert_eq!(writer.call("put<b,2>").await, ok("b"));
    assert_eq!(writer.call("get<a>").await, err("get needs scope kv:read"));
    assert_eq!(writer.call("del<b>").await, ok("b"));

    let mut reader = service.text().await;
    let read_only = token("reader", "kv:read notice:subscribe");
    assert_eq!(
        reader.call(format!("auth<{read_only}>")).await,
        ok("reader")
    );
    assert_eq!(reader.call("get<a>").await, value("1"));
    assert_eq!(
        reader.call("put<a,2>").await,
        err("put needs scope kv:write")
    );
    assert_eq!(reader.call("del<a>").await, err("del needs scope kv:write"));
    // Nothing the reader was refused happened.
    assert_eq!(reader.call("get<a>").await, value("1"));

    let mut nobody = service.text().await;
    let no_scopes = token("nobody", "notice:publish");
    assert_eq!(
        nobody.call(format!("auth<{no_scopes}>")).await,
        ok("nobody")
    );
    assert_eq!(nobody.call("get<a>").await, err("get needs scope kv:read"));
    assert_eq!(
        nobody.call("put<a,3>").await,
        err("put needs scope kv:write")
    );

    let mut admin = service.text().await;
    let admin_token = token("root", "admin");
    assert_eq!(admin.call(format!("auth<{admin_token}>")).await, ok("root"));
    assert_eq!(admin.call("put<a,4>").await, ok("a"));
    assert_eq!(admin.call("get<a>").await, value("4"));
    assert_eq!(admin.call("del<a>").await, ok("a"));
}

#[tokio::test]
async fn auth_pipelined_with_requests_in_one_write_applies_to_those_after_it() {
    for backend in [Backend::Memory, Backend::Sqlite] {
        let fixture = kv_store(backend).await.unwrap();
        let service = start(fixture.spec.clone(), text_config()).await;

        let mut client = service.text().await;
        let writer = token("alice", "kv:read kv:write");
        // Runs of writes go to the SQLite store together; the ones before auth must not.
        client
            .send(format!(
                "put<a,0>put<z,0>auth<{writer}>put<a,1>put<b,2>del<b>get<a>get<z>"
            ))
            .await;
        let mut replies = Vec::new();
        for _ in 0..8 {
            replies.push(client.reply().await);
        }
        assert_eq!(
            replies,
            [
                err(AUTH_REQUIRED),
                err(AUTH_REQUIRED),
                ok("alice"),
                ok("a"),
                ok("b"),
                ok("b"),
                value("1"),
                none("z"),
            ],
            "{backend:?}"
        );

        // A read-only token's pipelined writes are refused one by one, in order.
        let mut reader = service.text().await;
        let read_only = token("reader", "kv:read");
        reader
            .send(format!(
                "auth<{read_only}>put<a,9>put<c,9>del<a>get<a>get<c>"
            ))
            .await;
        let mut replies = Vec::new();
        for _ in 0..6 {
            replies.push(reader.reply().await);
        }
        assert_eq!(
            replies,
            [
                ok("reader"),
                err("put needs scope kv:write"),
                err("put needs scope kv:write"),
                err("del needs scope kv:write"),
                value("1"),
                none("c"),
            ],
            "{backend:?}"
        );
        service.stop().await;
    }
}

#[tokio::test]
async fn auth_sent_one_byte_at_a_time_is_accepted() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut client = service.text().await;
    let token = token("alice", "kv:read");
    for byte in format!("auth<{token}>\nget<k>").bytes() {
        client.send([byte]).await;
    }
    assert_eq!(client.reply().await, ok("alice"));
    assert_eq!(client.reply().await, none("k"));
}

#[tokio::test]
async fn a_token_over_the_limit_is_refused_and_the_connection_closed() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut client = service.text().await;
    client
        .send(format!("auth<{}>", "a".repeat(MAX_TOKEN_BYTES + 1)))
        .await;
    let replies = replies_until_closed(&mut client).await;
    assert_eq!(
        replies,
        [err(&format!(
            "token too long (max {MAX_TOKEN_BYTES} bytes)"
        ))]
    );
}

#[tokio::test]
async fn an_empty_auth_is_malformed_and_not_a_failed_attempt() {
    let service = start(StoreSpec::Memory, text_config()).await;
    let mut client = service.text().await;
    for _ in 0..5 {
        assert_eq!(
            client.call("auth<>").await,
            err("auth needs a token: auth<TOKEN>")
        );
    }
    let token = token("alice", "kv:read");
    assert_eq!(client.call(format!("auth<{token}>")).await, ok("alice"));
}

#[tokio::test]
async fn without_a_key_auth_is_an_error_and_commands_need_none() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    assert_eq!(client.call("put<a,1>").await, ok("a"));
    let token = token("alice", "kv:read");
    assert_eq!(
        client.call(format!("auth<{token}>")).await,
        err("authentication is not enabled on this server")
    );
    assert_eq!(client.call("get<a>").await, value("1"));
}

#[tokio::test]
async fn a_connection_that_does_not_authenticate_in_time_is_closed() {
    let text = TextConfig {
        auth_timeout: Duration::from_secs(1),
        ..text_config()
    };
    let service = start(StoreSpec::Memory, text).await;

    // Silent.
    let mut silent = service.text().await;
    assert_eq!(
        replies_until_closed(&mut silent).await,
        [err("closing: not authenticated within 1s")]
    );

    // Busy but never authenticated: the deadline counts from the connection's start, not from
    // its last request.
    let mut busy = service.text().await;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            busy.send("get<a>").await;
            match busy.try_reply().await {
                Some(reply) if reply == err(AUTH_REQUIRED) => {}
                Some(reply) => {
                    assert_eq!(reply, err("closing: not authenticated within 1s"));
                    return;
                }
                None => return,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "an unauthenticated busy connection stayed open"
    );

    // An authenticated one outlives the deadline.
    let mut client = service.text().await;
    let token = token("alice", "kv:read");
    assert_eq!(client.call(format!("auth<{token}>")).await, ok("alice"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.call("get<a>").await, none("a"));
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let text = TextConfig {
        idle_timeout: Duration::from_secs(1),
        ..TextConfig::default()
    };
    let service = start(StoreSpec::Memory, text).await;
    let mut client = service.text().await;
    assert_eq!(client.call("put<a,1>").await, ok("a"));
    assert_eq!(
        replies_until_closed(&mut client).await,
        [err("closing: idle for 1s")]
    );
    // A connection that keeps talking is not idle, however long it lives.
    let mut talker = service.text().await;
    for _ in 0..6 {
        assert_eq!(talker.call("get<a>").await, value("1"));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}
