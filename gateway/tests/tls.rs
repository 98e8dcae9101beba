//! TLS at the gateway, against the real binary with a certificate made for the test: HTTP/2 and
//! HTTP/1.1 over ALPN, the handshake and idle bounds, and graceful shutdown.

mod common;
mod process;

use std::{path::PathBuf, sync::Arc, time::Duration};

use common::{Distributor, Service};
use nix::{sys::signal::Signal, unistd::Pid};
use process::{GatewayProcess, PROMPTLY};
use reqwest::{StatusCode, Version};
use serde_json::{json, Value};
use shared::service::{Response, Router};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
    time::timeout,
};
use tokio_rustls::{
    rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore},
    TlsConnector,
};

/// A self-signed certificate for `localhost` and its key, written as PEM files.
struct Certificate {
    pem: String,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Certificate {
    fn new() -> Certificate {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("a certificate");
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let pem = certified.cert.pem();
        std::fs::write(&cert, &pem).unwrap();
        std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
        Certificate {
            pem,
            cert,
            key,
            _dir: dir,
        }
    }

    /// The flags serving it.
    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }

    /// An HTTPS client trusting it, reaching `localhost` at the gateway's address.
    fn client(&self, gateway: &GatewayProcess) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap())
            .resolve("localhost", gateway.addr)
            .timeout(PROMPTLY)
    }

    /// A raw TLS client trusting it, offering `alpn`.
    fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut self.pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|name| name.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

fn https(gateway: &GatewayProcess, path: &str) -> String {
    format!("https://localhost:{}{path}", gateway.addr.port())
}

async fn start(
    distributor: &Distributor,
    certificate: &Certificate,
    extra: &[&str],
) -> GatewayProcess {
    let mut args: Vec<String> = vec!["--distributor".into(), distributor.addr.to_string()];
    args.extend(certificate.args());
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    GatewayProcess::start(&args).await
}

#[tokio::test]
async fn https_serves_http2_over_alpn_and_http1_too() {
    let distributor = Distributor::start().await;
    let certificate = Certificate::new();
    let gateway = start(&distributor, &certificate, &[]).await;

    let h2 = certificate.client(&gateway).build().unwrap();
    let response = h2.get(https(&gateway, "/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2, "ALPN chose h2");

    let h1 = certificate.client(&gateway).http1_only().build().unwrap();
    let response = h1.get(https(&gateway, "/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);

    // Plain HTTP on the TLS port is not served.
    let plain = reqwest::Client::builder()
        .timeout(PROMPTLY)
        .build()
        .unwrap();
    assert!(plain.get(gateway.url("/healthz")).send().await.is_err());
}

#[tokio::test]
async fn http2_requests_with_too_many_or_too_large_headers_are_431() {
    let distributor = Distributor::start().await;
    let certificate = Certificate::new();
    let gateway = start(&distributor, &certificate, &["--max-headers", "20"]).await;
    let h2 = certificate.client(&gateway).build().unwrap();
    let mut request = h2.get(https(&gateway, "/healthz"));
    for i in 0..30 {
        request = request.header(format!("x-many-{i}"), "y");
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );

    // A head over --max-header-bytes (64 KiB): refused, never served.
    let huge = h2
        .get(https(&gateway, "/healthz"))
        .header("x-huge", "h".repeat(100 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // The connection, and the gateway, still serve.
    let response = h2.get(https(&gateway, "/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_closed_after_the_header_timeout() {
    let distributor = Distributor::start().await;
    let certificate = Certificate::new();
    // The idle timeout is left at its minute: only the handshake bound can close it in time.
    let gateway = start(&distributor, &certificate, &["--header-timeout", "2s"]).await;
    let mut socket = TcpStream::connect(gateway.addr).await.unwrap();
    // The start of a ClientHello record, and then nothing.
    socket
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = timeout(PROMPTLY, socket.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the gateway closes an unfinished handshake");
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let distributor = Distributor::start().await;
    let certificate = Certificate::new();
    let gateway = start(
        &distributor,
        &certificate,
        &[
            "--idle-timeout",
            "2s",
            "--request-timeout",
            "1s",
            "--sse-keep-alive",
            "1s",
        ],
    )
    .await;
    let tcp = TcpStream::connect(gateway.addr).await.unwrap();
    let mut tls = certificate
        .connector(&[b"h2"])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the handshake succeeds");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The server's HTTP/2 settings arrive; the client never sends its preface or anything else.
    let mut received = Vec::new();
    let closed = timeout(PROMPTLY, async {
        let mut buf = [0u8; 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(read) => received.extend_from_slice(&buf[..read]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the gateway closes an idle HTTP/2 connection"
    );
}

#[tokio::test]
async fn sigterm_finishes_an_http2_request_in_flight_then_exits() {
    let distributor = Distributor::start().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let router = Router::new().route("GET", "/hold", move |_| {
        let started = started_tx.clone();
        async move {
            let _ = started.send(());
            tokio::time::sleep(Duration::from_millis(500)).await;
            Response::ok(json!("done"))
        }
    });
    let _service = Service::start("hold", router, distributor.addr).await;
    let certificate = Certificate::new();
    let mut gateway = start(&distributor, &certificate, &[]).await;
    let h2 = certificate.client(&gateway).build().unwrap();
    let routed = timeout(PROMPTLY, async {
        loop {
            let response = h2.get(https(&gateway, "/_/topology")).send().await.unwrap();
            let topology: Value = response.json().await.unwrap();
            if topology.to_string().contains("GET/hold") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(routed.is_ok(), "the gateway routes GET/hold");

    let request = tokio::spawn(h2.get(https(&gateway, "/hold")).send());
    timeout(PROMPTLY, started.recv())
        .await
        .expect("the request reaches the node");
    nix::sys::signal::kill(Pid::from_raw(gateway.pid()), Signal::SIGTERM).unwrap();

    let response = timeout(PROMPTLY, request).await.unwrap().unwrap().unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!("done"));
    assert_eq!(gateway.exit_code().await, Some(0), "a clean exit");
}
