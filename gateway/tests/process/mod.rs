//! The real gateway binary as a separate process, for the tests of what its flags do at the
//! HTTP edge, and the raw-socket clients that misbehave against it.

#![allow(dead_code)]

use std::{net::SocketAddr, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
    process::{Child, Command},
    sync::oneshot,
    time::timeout,
};

/// Upper bound for anything that should happen promptly; only reached when a test fails.
pub const PROMPTLY: Duration = Duration::from_secs(15);

/// A gateway process listening on a 127.0.0.1 port of its own; killed when dropped.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    child: Child,
}

impl GatewayProcess {
    /// Starts the binary with `args` after `--listen 127.0.0.1:0` and waits until it listens.
    pub async fn start(args: &[&str]) -> GatewayProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            // No topology cache file left in the crate's directory.
            .env("GATEWAY_TOPOLOGY_CACHE", "")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the gateway binary starts");
        let stderr = child.stderr.take().unwrap();
        let (found, listening) = oneshot::channel();
        // Reads the log until the listening line, then keeps draining it so the process never
        // blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut found = Some(found);
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("gateway listening") {
                    if let (Some(sender), Some(addr)) = (found.take(), addr_in(&line)) {
                        let _ = sender.send(Ok(addr));
                    }
                } else if found.is_some() {
                    seen.push(line);
                }
            }
            if let Some(sender) = found {
                let _ = sender.send(Err(seen.join("\n")));
            }
        });
        let addr = timeout(PROMPTLY, listening)
            .await
            .expect("the gateway starts listening promptly")
            .expect("the log reader lives")
            .unwrap_or_else(|log| panic!("the gateway exited before listening:\n{log}"));
        GatewayProcess { addr, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("the process runs") as i32
    }

    /// Waits for the process to exit; its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        timeout(PROMPTLY, self.child.wait())
            .await
            .expect("the gateway exits promptly")
            .unwrap()
            .code()
    }
}

/// The `addr=` field of a log line.
fn addr_in(line: &str) -> Option<SocketAddr> {
    let start = line.find("addr=")? + "addr=".len();
    line[start..].split_whitespace().next()?.parse().ok()
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
