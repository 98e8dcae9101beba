//! kv-service through the gateway (as curl uses it) and through its text protocol (as nc does).

use e2e::{read_text_answers, text_escape, Checks, Stack, StackOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

fn kv_only() -> StackOptions {
    StackOptions {
        notice: false,
        ..StackOptions::default()
    }
}

/// Percent-encodes a key for a URL path segment.
fn segment(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn crud_through_the_gateway() {
    let stack = Stack::start(kv_only()).await;
    let http = &stack.http;
    let mut checks = Checks::new("kv CRUD through the gateway");

    // curl -X PUT localhost:8000/kv/hello -d world
    let put = http
        .put(stack.url("/kv/hello"))
        .body("world")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let body: Value = put.json().await.unwrap();
    assert_eq!(
        body,
        json!({"key": "hello", "value": "world", "version": 1, "revision": 1, "expires_at": null})
    );
    checks.pass("PUT /kv/hello with a plain body → 200, version 1");

    let put = http
        .put(stack.url("/kv/hello"))
        .json(&json!({"value": "again"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.json::<Value>().await.unwrap()["version"], 2);
    checks.pass("PUT with a JSON body replaces the value, version 2");

    let get = http.get(stack.url("/kv/hello")).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(
        get.json::<Value>().await.unwrap(),
        json!({"key": "hello", "value": "again", "version": 2, "revision": 2, "expires_at": null})
    );
    checks.pass("GET /kv/hello → the latest value");

    let stale = http
        .put(stack.url("/kv/hello"))
        .json(&json!({"value": "late", "if_version": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::CONFLICT);
    checks.pass("PUT with a stale if_version → 409");

    let create = http
        .post(stack.url("/kv"))
        .json(&json!({"key": "fresh", "value": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), StatusCode::CREATED);
    let again = http
        .post(stack.url("/kv"))
        .json(&json!({"key": "fresh", "value": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    checks.pass("POST /kv creates (201), then refuses a duplicate key (409)");

    let list = http
        .get(stack.url("/kv?prefix=&limit=10"))
        .send()
        .await
        .unwrap();
    let list: Value = list.json().await.unwrap();
    let keys: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["fresh", "hello"]);
    checks.pass("GET /kv lists keys in order");

    let delete = http.delete(stack.url("/kv/hello")).send().await.unwrap();
    assert_eq!(delete.status(), StatusCode::OK);
    assert_eq!(
        delete.json::<Value>().await.unwrap(),
        json!({"key": "hello", "deleted": true, "revision": 4})
    );
    let gone = http.get(stack.url("/kv/hello")).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    assert!(gone.json::<Value>().await.unwrap()["error"].is_string());
    checks.pass("DELETE /kv/hello → 200, then GET → 404 with an error");

    let bad = http
        .put(stack.url("/kv/x"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    checks.pass("a malformed JSON body → 400");
}

#[tokio::test]
async fn text_protocol_over_a_raw_socket() {
    let stack = Stack::start(kv_only()).await;
    let mut checks = Checks::new("kv text protocol by raw socket");

    let mut socket = stack.text_connection(0).await;
    socket.write_all(b"get<1>put<1,hello>get<1>").await.unwrap();
    let answers = read_text_answers(&mut socket, 3).await.unwrap();
    assert_eq!(
        answers,
        [
            ("none".into(), "1".into()),
            ("ok".into(), "1".into()),
            ("value".into(), "hello".into())
        ]
    );
    checks.pass("glued requests get one answer each, in order");

    let request = b"put<split,value one>\nget<split>\n";
    for byte in request.iter() {
        socket.write_all(&[*byte]).await.unwrap();
        socket.flush().await.unwrap();
    }
    let answers = read_text_answers(&mut socket, 2).await.unwrap();
    assert_eq!(answers[1], ("value".into(), "value one".into()));
    checks.pass("requests split one byte per write are answered");

    socket
        .write_all(b"bogus<1>put<nocomma>get<split>")
        .await
        .unwrap();
    let answers = read_text_answers(&mut socket, 3).await.unwrap();
    assert_eq!(answers[0].0, "err");
    assert_eq!(answers[1].0, "err");
    assert_eq!(answers[2], ("value".into(), "value one".into()));
    checks.pass("malformed requests get err<...> and the connection keeps working");

    socket.write_all(b"del<split>del<split>").await.unwrap();
    let answers = read_text_answers(&mut socket, 2).await.unwrap();
    assert_eq!(
        answers,
        [
            ("ok".into(), "split".into()),
            ("none".into(), "split".into())
        ]
    );
    checks.pass("del answers ok, then none");
}

#[tokio::test]
async fn awkward_values_round_trip_through_both_doors() {
    let stack = Stack::start(kv_only()).await;
    let http = &stack.http;
    let mut checks = Checks::new("awkward keys and values by both doors");
    let samples = [
        ("pilcrow¶key", "a¶b¶"),
        ("<angle>", "<<>>"),
        ("a,b", "x,y,z"),
        ("ünïcødé ключ 鍵", "värde 値 🎉"),
        ("quote\"back\\slash", "line\nbreak \"quoted\" \\"),
    ];

    // REST in, text protocol out.
    let mut socket = stack.text_connection(0).await;
    for (key, value) in samples {
        let put = http
            .put(stack.url(&format!("/kv/{}", segment(key))))
            .json(&json!({ "value": value }))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK, "PUT {key:?}");
        socket
            .write_all(format!("get<{}>", text_escape(key)).as_bytes())
            .await
            .unwrap();
        let answer = read_text_answers(&mut socket, 1).await.unwrap();
        assert_eq!(answer, [("value".into(), value.to_owned())], "{key:?}");
    }
    checks.pass("values put through REST read back through the text protocol");

    // Text protocol in, REST out.
    for (key, value) in samples {
        let reversed: String = value.chars().rev().collect();
        socket
            .write_all(format!("put<{},{}>", text_escape(key), text_escape(&reversed)).as_bytes())
            .await
            .unwrap();
        let answer = read_text_answers(&mut socket, 1).await.unwrap();
        assert_eq!(answer, [("ok".into(), key.to_owned())]);
        let get: Value = http
            .get(stack.url(&format!("/kv/{}", segment(key))))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(get["key"], key);
        assert_eq!(get["value"], reversed.as_str());
    }
    checks.pass("values put through the text protocol read back through REST");
}
