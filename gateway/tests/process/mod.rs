//! The real gateway binary as a separate process, for the tests of what its flags do at the
//! HTTP edge, and the raw-socket clients that misbehave against it.

#![allow(dead_code)]

use std::{net::SocketAddr, process::Stdio, time::Duration};

use shared::testing::process::{clean_command, logged_addr, Serving};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    process::Command,
    time::timeout,
};

/// Upper bound for anything that should happen promptly; only reached when a test fails.
pub const PROMPTLY: Duration = Duration::from_secs(15);

/// A gateway process listening on a 127.0.0.1 port of its own; killed when dropped.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    serving: Serving,
}

impl GatewayProcess {
    /// Starts the binary with `args` after `--listen 127.0.0.1:0` and waits until it listens.
    pub async fn start(args: &[&str]) -> GatewayProcess {
        let mut command = clean_command(env!("CARGO_BIN_EXE_gateway"), &[]);
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            // No topology cache file left in the crate's directory.
            .env("GATEWAY_TOPOLOGY_CACHE", "");
        let (serving, addr) = Serving::start(command, |line| {
            line.contains("gateway listening")
                .then(|| logged_addr(line))
                .flatten()
        })
        .await;
        GatewayProcess { addr, serving }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.serving.pid() as i32
    }

    /// Waits for the process to exit; its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        self.serving.wait().await.code()
    }
}

/// Runs the gateway binary with `args` and returns its exit code and log, for flags that must
/// stop it from starting.
pub async fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    let output = timeout(
        PROMPTLY,
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("GATEWAY_TOPOLOGY_CACHE", "")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("the gateway gives up promptly")
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A connection to `addr` from the loopback address `from` (any of 127.0.0.0/8), so a test can
/// play clients at different addresses.
pub async fn connect_from(from: [u8; 4], addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("binding a loopback source address");
    socket
        .connect(addr)
        .await
        .expect("connecting to the gateway")
}

/// What came back for a raw request.
#[derive(Debug)]
pub struct Exchange {
    /// The status of the first answer, when one arrived.
    pub status: Option<u16>,
    /// Everything read before the gateway closed the connection (or reset it).
    pub text: String,
}

/// Writes `request` on a fresh connection (while reading, since the gateway may answer and
/// close before it has all of it) and reads until the gateway closes the connection.
pub async fn exchange(addr: SocketAddr, request: Vec<u8>) -> Exchange {
    let socket = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = socket.into_split();
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        // Kept open until the answer is read: a half-close could read as the end of a body.
        writer
    });
    let mut received = Vec::new();
    timeout(PROMPTLY, async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(read) => received.extend_from_slice(&buf[..read]),
            }
        }
    })
    .await
    .expect("the gateway ends the exchange instead of waiting for more");
    drop(writing.await);
    let text = String::from_utf8_lossy(&received).into_owned();
    Exchange {
        status: status_of(&text),
        text,
    }
}

/// The status code of the HTTP/1.1 answer that starts `text`.
pub fn status_of(text: &str) -> Option<u16> {
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Reads from `socket` until the gateway closes it (or resets it); what was read. Panics when
/// it stays open for [`PROMPTLY`].
pub async fn read_until_closed(socket: &mut TcpStream, what: &str) -> String {
    let mut received = Vec::new();
    timeout(PROMPTLY, async {
        let mut buf = [0u8; 4096];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(read) => received.extend_from_slice(&buf[..read]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the gateway closes {what}"));
    String::from_utf8_lossy(&received).into_owned()
}
