//! The UDP door over real UDP sockets on loopback: register, receive, deregister, expiry,
//! garbage, the subscriber cap, tokens, and the binary's protected mode.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::WAIT;
use notice_service::{
    hub::Hub,
    notice::NewNotice,
    service::{NoticeService, Published},
    store::{NoticeBackend, Retention},
    udp::{UdpConfig, UdpDoor, MAX_DATAGRAM},
};
use serde_json::Value;
use shared::{
    testing::{
        hs256_token,
        process::{clean_command, run_to_exit, Serving},
    },
    token::TokenVerifier,
};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// A memory-backed service with its UDP door open on loopback; stops when dropped.
struct Door {
    service: NoticeService,
    door: UdpDoor,
    addr: SocketAddr,
    _stop: tokio_util::sync::DropGuard,
}

impl Door {
    async fn open(configure: impl FnOnce(UdpConfig) -> UdpConfig) -> Door {
        let service = NoticeService::new(
            Arc::new(NoticeBackend::Memory(Default::default())),
            Hub::new(64, 100_000, None),
            None,
            Retention::default(),
        );
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let door = UdpDoor::new(
            socket,
            service.clone(),
            configure(UdpConfig::new(addr, None)),
        );
        let stop = CancellationToken::new();
        tokio::spawn(door.clone().run(stop.clone()));
        Door {
            service,
            door,
            addr,
            _stop: stop.drop_guard(),
        }
    }

    async fn publish(&self, message: &str, topic: Option<&str>, to: Option<&str>) -> i64 {
        let notice = NewNotice::new(
            Some(message.into()),
            topic.map(Into::into),
            to.map(Into::into),
        )
        .unwrap();
        match self.service.publish(notice, None).await.unwrap() {
            Published::Stored(notice) => notice.id,
            other => panic!("{other:?}"),
        }
    }

    async fn client(&self) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket.connect(self.addr).await.unwrap();
        Client { socket }
    }
}

/// A UDP subscriber.
struct Client {
    socket: UdpSocket,
}

impl Client {
    async fn send(&self, datagram: &str) {
        self.socket.send(datagram.as_bytes()).await.unwrap();
    }

    async fn receive(&self) -> String {
        let mut buffer = vec![0; 65536];
        let len = tokio::time::timeout(WAIT, self.socket.recv(&mut buffer))
            .await
            .expect("a datagram in time")
            .unwrap();
        String::from_utf8(buffer[..len].to_vec()).unwrap()
    }

    /// Sends `datagram` and returns the answer.
    async fn ask(&self, datagram: &str) -> String {
        self.send(datagram).await;
        self.receive().await
    }

    async fn receive_notice(&self) -> Value {
        serde_json::from_str(&self.receive().await).unwrap()
    }

    /// Asserts that no datagram arrives for a moment.
    async fn assert_silent(&self) {
        let mut buffer = vec![0; 65536];
        let quiet = tokio::time::timeout(Duration::from_millis(400), self.socket.recv(&mut buffer));
        if let Ok(received) = quiet.await {
            let len = received.unwrap();
            panic!(
                "unexpected datagram {:?}",
                String::from_utf8_lossy(&buffer[..len])
            );
        }
    }
}

#[tokio::test]
async fn a_registered_address_receives_its_notices_until_it_deregisters() {
    let door = Door::open(|config| config).await;
    let earlier = door.publish("before anyone", None, None).await;
    let alice = door.client().await;
    assert_eq!(
        alice.ask("#REG alice room\n").await,
        format!("#OK {earlier}")
    );
    assert_eq!(door.door.registered(), 1);

    let room = door.publish("in the room", Some("room"), None).await;
    door.publish("elsewhere", Some("hall"), None).await;
    door.publish("for bob", None, Some("bob")).await;
    let whisper = door.publish("for alice", None, Some("alice")).await;
    let broadcast = door.publish("everyone", None, None).await;
    for (id, message) in [
        (room, "in the room"),
        (whisper, "for alice"),
        (broadcast, "everyone"),
    ] {
        let notice = alice.receive_notice().await;
        assert_eq!(
            (notice["id"].as_i64(), notice["message"].as_str()),
            (Some(id), Some(message))
        );
    }

    // Too large for one datagram: the id, to fetch it over HTTP.
    let long = door.publish(&"x".repeat(MAX_DATAGRAM), None, None).await;
    let truncated = alice.receive_notice().await;
    assert_eq!(
        truncated,
        serde_json::json!({"id": long, "truncated": true})
    );
    let counters = door.door.counters();
    assert_eq!(counters.sent.load(std::sync::atomic::Ordering::Relaxed), 4);
    assert_eq!(
        counters
            .truncated
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    assert_eq!(alice.ask("#DEREG").await, "#BYE");
    assert_eq!(door.door.registered(), 0);
    door.publish("after", None, None).await;
    alice.assert_silent().await;
    // Deregistering twice is harmless.
    assert_eq!(alice.ask("#DEREG").await, "#BYE");
    assert_eq!(door.service.presence(None).await.unwrap().len(), 0);
}

#[tokio::test]
async fn a_registration_not_renewed_expires_and_a_renewed_one_does_not() {
    let door = Door::open(|config| UdpConfig {
        registration_lifetime: Duration::from_millis(1500),
        ..config
    })
    .await;
    let renewing = door.client().await;
    let forgetful = door.client().await;
    assert!(renewing.ask("#REG ren").await.starts_with("#OK"));
    assert!(forgetful.ask("#REG forg").await.starts_with("#OK"));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(renewing.ask("#REG ren").await.starts_with("#OK"));
    }
    assert_eq!(door.door.registered(), 1, "the forgetful one expired");
    let id = door.publish("still here?", None, None).await;
    assert_eq!(renewing.receive_notice().await["id"].as_i64(), Some(id));
    forgetful.assert_silent().await;
    let present = door.service.presence(None).await.unwrap();
    let names: Vec<_> = present.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, [Some("ren".to_string())]);
}

#[tokio::test]
async fn garbage_is_ignored_counted_and_never_answered() {
    let door = Door::open(|config| config).await;
    let attacker = door.client().await;
    let huge = "#REG ".to_string() + &"a".repeat(7_000);
    let garbage: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"hello".to_vec(),
        b"#REG".to_vec(),
        b"#REG a b c".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x01],
        huge.into_bytes(),
    ];
    for datagram in &garbage {
        attacker.socket.send(datagram).await.unwrap();
    }
    attacker.assert_silent().await;
    let ignored = door
        .door
        .counters()
        .ignored
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(ignored, garbage.len() as u64);
    // Still serving.
    assert!(attacker.ask("#REG fine").await.starts_with("#OK"));
    // A bad name is an error, not garbage: the client learns why.
    let refused = attacker.ask("#REG a\tb").await;
    assert!(
        refused.starts_with("#ERR name must not contain"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_flood_of_registrations_is_capped() {
    let door = Door::open(|config| UdpConfig {
        max_subscribers: 3,
        ..config
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = door.client().await;
        assert!(client.ask(&format!("#REG n{i}")).await.starts_with("#OK"));
        clients.push(client);
    }
    let late = door.client().await;
    assert_eq!(
        late.ask("#REG n3").await,
        "#ERR too many UDP subscribers, try again later"
    );
    // A registered address still renews, and a freed place is taken again.
    assert!(clients[0].ask("#REG n0").await.starts_with("#OK"));
    assert_eq!(clients[1].ask("#DEREG").await, "#BYE");
    assert!(late.ask("#REG n3").await.starts_with("#OK"));
}

#[tokio::test]
async fn a_name_is_held_by_one_address() {
    let door = Door::open(|config| config).await;
    let ann = door.client().await;
    let thief = door.client().await;
    assert!(ann.ask("#REG ann").await.starts_with("#OK"));
    let refused = thief.ask("#REG ann").await;
    assert!(
        refused.starts_with("#ERR the name \"ann\" is in use"),
        "{refused}"
    );
    // The same address may change its topics.
    assert!(ann.ask("#REG ann news").await.starts_with("#OK"));
    let id = door.publish("to ann", None, Some("ann")).await;
    assert_eq!(ann.receive_notice().await["id"].as_i64(), Some(id));
    thief.assert_silent().await;
}

#[tokio::test]
async fn with_a_key_a_registration_needs_a_token_for_its_name() {
    const SECRET: &[u8] = b"a udp test secret of decent length";
    let verifier = Arc::new(TokenVerifier::from_secret(SECRET));
    let door = Door::open(|config| UdpConfig {
        tokens: Some(verifier),
        ..config
    })
    .await;
    let hour = Duration::from_secs(3600);
    let alice_token = hs256_token(SECRET, "alice", &["notice:subscribe"], hour);
    let client = door.client().await;
    for (datagram, refusal) in [
        ("#REG alice".to_string(), "#ERR a token is required"),
        ("#REG alice not.a.token".to_string(), "#ERR invalid token"),
        (
            format!("#REG bob {alice_token}"),
            "#ERR name \"bob\" is not yours",
        ),
        (
            format!(
                "#REG alice {}",
                hs256_token(SECRET, "alice", &["kv:read"], hour)
            ),
            "#ERR this needs the scope \"notice:subscribe\"",
        ),
    ] {
        let answer = client.ask(&datagram).await;
        assert!(
            answer.starts_with(refusal),
            "{answer} should start with {refusal}"
        );
    }
    assert_eq!(door.door.registered(), 0);
    assert!(client
        .ask(&format!("#REG alice room {alice_token}"))
        .await
        .starts_with("#OK"));
    let id = door.publish("hi alice", None, Some("alice")).await;
    assert_eq!(client.receive_notice().await["id"].as_i64(), Some(id));
}

fn notice_service() -> tokio::process::Command {
    let mut command = clean_command(
        env!("CARGO_BIN_EXE_notice-service"),
        &[
            "NOTICE_STORE",
            "NOTICE_LISTEN",
            "NOTICE_UDP_LISTEN",
            "JWT_SECRET_FILE",
        ],
    );
    command.args([
        "--distributor",
        "",
        "--store",
        "mem",
        "--listen",
        "127.0.0.1:0",
    ]);
    command
}

#[tokio::test]
async fn the_binary_opens_the_door_on_loopback_and_refuses_the_network_without_a_key() {
    let mut refused = notice_service();
    refused.args(["--udp-listen", "0.0.0.0:0"]);
    let exit = run_to_exit(refused).await;
    assert!(!exit.success);
    assert!(
        exit.output
            .contains("refusing to serve UDP subscribers on 0.0.0.0:0"),
        "{}",
        exit.output
    );

    let port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut serving = notice_service();
    serving.args(["--udp-listen", &format!("127.0.0.1:{port}")]);
    let (_process, ()) = Serving::start(serving, |line| {
        line.contains("serving UDP subscribers").then_some(())
    })
    .await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", port)).await.unwrap();
    let client = Client { socket };
    assert_eq!(client.ask("#REG alice").await, "#OK 0");
    assert_eq!(client.ask("#DEREG").await, "#BYE");
}
