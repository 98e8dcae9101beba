//! The text protocol over real TCP against the real service (in process, port 0).

mod common;

use std::time::Duration;

use common::{kv_store, Backend, Service, TextClient, WAIT};
use kv_service::{config::StoreSpec, text_protocol::OwnedReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn value(text: &str) -> OwnedReply {
    OwnedReply::Value(text.into())
}
fn ok(key: &str) -> OwnedReply {
    OwnedReply::Ok(key.into())
}
fn none(key: &str) -> OwnedReply {
    OwnedReply::None(key.into())
}
fn is_err(reply: &OwnedReply) -> bool {
    matches!(reply, OwnedReply::Err(_))
}

#[tokio::test]
async fn put_get_del_over_one_connection() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    assert_eq!(client.call("get<1>").await, none("1"));
    assert_eq!(client.call("put<1,hello>").await, ok("1"));
    assert_eq!(client.call("get<1>").await, value("hello"));
    assert_eq!(client.call("del<1>").await, ok("1"));
    assert_eq!(client.call("del<1>").await, none("1"));
    assert_eq!(client.call("get<1>").await, none("1"));
}

#[tokio::test]
async fn glued_requests_get_their_answers_in_order() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    client
        .send("get<1>put<1,hello>get<1>put<1,again>get<1>del<1>get<1>")
        .await;
    let mut answers = Vec::new();
    for _ in 0..7 {
        answers.push(client.reply().await);
    }
    assert_eq!(
        answers,
        [
            none("1"),
            ok("1"),
            value("hello"),
            ok("1"),
            value("again"),
            ok("1"),
            none("1")
        ]
    );
}

#[tokio::test]
async fn requests_written_one_byte_at_a_time() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    for byte in b"put<k\\,1,v\\>1>\nget<k\\,1>" {
        client.send([*byte]).await;
        // Give each byte its own segment, so the server really reads them one by one.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(client.reply().await, ok("k,1"));
    assert_eq!(client.reply().await, value("v>1"));
}

#[tokio::test]
async fn answers_are_escaped() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    client.send("put<a\\<b,\\<c\\,d\\>\\\\>get<a\\<b>").await;
    let mut raw = Vec::new();
    let stream = client.stream_mut();
    while !raw.ends_with(b"value<\\<c\\,d\\>\\\\>\n") {
        let mut chunk = [0u8; 256];
        let read = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(
            read > 0,
            "closed early; got {:?}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&chunk[..read]);
    }
    assert_eq!(raw, b"ok<a\\<b>\nvalue<\\<c\\,d\\>\\\\>\n");
}

#[tokio::test]
async fn malformed_requests_get_errors_and_the_connection_keeps_working() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    for bad in [
        "set<a,b>",
        "get 1\n",
        "get<>",
        "get<a\\qb>",
        "put<nocomma>",
        "get<a<b>",
        "%\n",
    ] {
        let reply = client.call(bad).await;
        assert!(is_err(&reply), "{bad:?} gave {reply:?}");
        assert_eq!(
            client.call("put<still,alive>").await,
            ok("still"),
            "after {bad:?}"
        );
    }
    assert_eq!(
        client.call("put<nocomma>").await,
        OwnedReply::Err("put needs a key and a value: put<key,value>".into())
    );
}

#[tokio::test]
async fn a_request_over_the_limit_is_answered_and_the_connection_closed() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    let mut request = b"get<".to_vec();
    request.extend(std::iter::repeat_n(b'k', 2000));
    request.extend_from_slice(b">get<after>");
    client.send(&request).await;
    assert_eq!(
        client.reply().await,
        OwnedReply::Err("key too long (max 1024 bytes)".into())
    );
    assert_eq!(client.try_reply().await, None, "the connection is closed");

    // A value over 1 MiB, sent while the server closes: the error still arrives.
    let mut client = service.text().await;
    let mut request = b"put<k,".to_vec();
    request.extend(std::iter::repeat_n(b'v', 1024 * 1024 + 1));
    request.push(b'>');
    client.send(&request).await;
    assert_eq!(
        client.reply().await,
        OwnedReply::Err("value too long (max 1048576 bytes)".into())
    );
    assert_eq!(client.try_reply().await, None);

    // Other connections are unaffected, and a value of exactly 1 MiB is fine.
    let mut client = service.text().await;
    let mut request = b"put<big,".to_vec();
    request.extend(std::iter::repeat_n(b'v', 1024 * 1024));
    request.push(b'>');
    assert_eq!(client.call(&request).await, ok("big"));
    match client.call("get<big>").await {
        OwnedReply::Value(v) => assert_eq!(v.len(), 1024 * 1024),
        other => panic!("got {other:?}"),
    }
}

#[tokio::test]
async fn an_incomplete_request_at_end_of_input_gets_an_error() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    client.send("put<a,1>get<a").await;
    client.stream_mut().shutdown().await.unwrap();
    assert_eq!(client.reply().await, ok("a"));
    assert_eq!(
        client.reply().await,
        OwnedReply::Err("incomplete request at end of input".into())
    );
    assert_eq!(client.try_reply().await, None);
}

#[tokio::test]
async fn a_connection_idle_for_less_than_the_idle_timeout_stays_open() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    assert_eq!(client.call("put<a,1>").await, ok("a"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(client.call("get<a>").await, value("1"));
}

#[tokio::test]
async fn clients_that_vanish_or_misbehave_do_not_disturb_others() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut steady = service.text().await;
    assert_eq!(steady.call("put<a,1>").await, ok("a"));

    for _ in 0..20 {
        // Connect, send half a request and reset the connection.
        let stream = tokio::net::TcpStream::connect(service.text_addr)
            .await
            .unwrap();
        let socket = socket2::SockRef::from(&stream);
        socket.set_linger(Some(Duration::ZERO)).unwrap();
        let mut stream = stream;
        stream.write_all(b"put<x,half").await.unwrap();
        drop(stream);
        // Send requests and leave without reading the answers.
        let mut stream = tokio::net::TcpStream::connect(service.text_addr)
            .await
            .unwrap();
        stream.write_all(&b"get<a>".repeat(1000)).await.unwrap();
        drop(stream);
    }
    assert_eq!(steady.call("get<a>").await, value("1"));
    let mut fresh = service.text().await;
    assert_eq!(fresh.call("get<a>").await, value("1"));
    assert_eq!(fresh.call("get<x>").await, none("x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelining_connections_each_get_their_own_answers() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut tasks = Vec::new();
    for connection in 0..50 {
        let addr = service.text_addr;
        tasks.push(tokio::spawn(async move {
            let mut client = TextClient::connect(addr).await;
            let mut batch = String::new();
            for i in 0..200 {
                batch.push_str(&format!(
                    "put<c{connection}-{i},v{i}>get<c{connection}-{i}>"
                ));
            }
            client.send(batch).await;
            for i in 0..200 {
                assert_eq!(client.reply().await, ok(&format!("c{connection}-{i}")));
                assert_eq!(client.reply().await, value(&format!("v{i}")));
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_run_returns() {
    let service = Service::start(StoreSpec::Memory).await;
    let mut client = service.text().await;
    assert_eq!(client.call("put<a,1>").await, ok("a"));
    service.stop().await;
    assert_eq!(
        client.try_reply().await,
        None,
        "the idle connection was closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_serve_the_text_protocol_too() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(fixture) = kv_store(backend).await else {
            continue;
        };
        let service = Service::start(fixture.spec.clone()).await;
        let mut client = service.text().await;
        client.send("put<k,v1>put<k,v2>get<k>del<k>get<k>").await;
        assert_eq!(client.reply().await, ok("k"), "{backend:?}");
        assert_eq!(client.reply().await, ok("k"));
        assert_eq!(client.reply().await, value("v2"));
        assert_eq!(client.reply().await, ok("k"));
        assert_eq!(client.reply().await, none("k"));

        // A pipelined run of writes (which SQLite commits together) applies in order, and a
        // read after it sees all of it.
        let mut pipeline = String::new();
        for i in 0..100 {
            pipeline.push_str(&format!("put<run,{i}>"));
        }
        pipeline.push_str("del<run>put<run,last>del<absent>put<,x>put<other,o>get<run>get<other>");
        client.send(pipeline).await;
        for _ in 0..100 {
            assert_eq!(client.reply().await, ok("run"), "{backend:?}");
        }
        assert_eq!(client.reply().await, ok("run"));
        assert_eq!(client.reply().await, ok("run"));
        assert_eq!(client.reply().await, none("absent"));
        assert_eq!(client.reply().await, OwnedReply::Err("empty key".into()));
        assert_eq!(client.reply().await, ok("other"));
        assert_eq!(client.reply().await, value("last"));
        assert_eq!(client.reply().await, value("o"));
        let rest = service.rest().await;
        let (_, body, _) = common::call(&rest, "GET", serde_json::json!({"params": "run"}))
            .await
            .unwrap();
        assert_eq!(
            body["version"], 1,
            "recreated after the delete: {backend:?}"
        );
        drop(rest);
        service.stop().await;
    }
}
