//! A Server-Sent-Events fan-out with nothing but the system calls it needs: each subscriber gets
//! one `write` per pass, holding every event published since its last one, from as many threads
//! as there are cores, with nothing in between (no runtime, no HTTP framing, no channel or task
//! per stream). A writer that wrote each event to each subscriber on its own would fall behind at
//! once on thousands of connections: the system call and the TCP segment, not the bytes, are
//! what a delivery costs.
//!
//! notice-bench starts it and paces it the way it paces the gateway, with the same subscribers
//! reading the same events, so that its report can say how far the gateway's fan-out is from
//! what the kernel's work alone takes for as many TCP connections. It listens on 127.0.0.1 (a
//! port of the system's choosing, printed on stdout), answers each of `--subscribers`
//! connections' request with a `text/event-stream` response head, then publishes each line of
//! stdin (a benchmark sequence number) as one notice event, the lines the gateway would write
//! for it (without HTTP/1.1's chunk framing). It exits when stdin closes.

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex},
};

use anyhow::{bail, Context};
use clap::Parser;
use socket2::{Domain, Socket, Type};

#[derive(Debug, Parser)]
#[command(about = "an SSE fan-out with nothing but its writes: one per subscriber per pass")]
struct Args {
    /// Connections to accept before writing events.
    #[arg(long)]
    subscribers: usize,
    /// Writing threads, each with its share of the connections (default: one per core).
    #[arg(long, env = "BENCH_FLOOR_THREADS")]
    threads: Option<usize>,
}

const RESPONSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n";

/// The events published so far, in order, and whether stdin has closed.
#[derive(Default)]
struct Published {
    events: Vec<Vec<u8>>,
    closed: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = listen(args.subscribers)?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    let mut streams = Vec::with_capacity(args.subscribers);
    while streams.len() < args.subscribers {
        let (mut stream, _) = listener.accept()?;
        skip_request_head(&mut stream)?;
        stream.write_all(RESPONSE_HEAD)?;
        streams.push(stream);
    }
    let threads = args.threads.unwrap_or_else(bench::cores).max(1);
    let published = Arc::new((Mutex::new(Published::default()), Condvar::new()));
    let share = streams.len().div_ceil(threads).max(1);
    let mut writers = Vec::with_capacity(threads);
    while !streams.is_empty() {
        let mine = streams.split_off(streams.len().saturating_sub(share));
        let published = published.clone();
        writers.push(std::thread::spawn(move || write_passes(mine, &published)));
    }
    let (state, changed) = &*published;
    for line in std::io::stdin().lock().lines() {
        let seq: usize = line?
            .trim()
            .parse()
            .context("stdin: a sequence number per line")?;
        let event = format!(
            "id: {seq}\nevent: notice\ndata: {{\"message\":\"bench {seq}\",\"topic\":\"bench\"}}\n\n"
        );
        state.lock().unwrap().events.push(event.into_bytes());
        changed.notify_all();
    }
    state.lock().unwrap().closed = true;
    changed.notify_all();
    for writer in writers {
        writer.join().expect("a writer thread panicked")?;
    }
    Ok(())
}

/// One thread's passes over its streams: each pass writes everything published since the last
/// one to every stream, in one write each.
fn write_passes(
    mut streams: Vec<TcpStream>,
    published: &(Mutex<Published>, Condvar),
) -> anyhow::Result<()> {
    let (state, changed) = published;
    let mut sent = 0;
    loop {
        let pass = {
            let mut state = state.lock().unwrap();
            while state.events.len() == sent && !state.closed {
                state = changed.wait(state).unwrap();
            }
            if state.events.len() == sent {
                return Ok(());
            }
            let pass = state.events[sent..].concat();
            sent = state.events.len();
            pass
        };
        for stream in &mut streams {
            stream.write_all(&pass)?;
        }
    }
}

/// A listener on 127.0.0.1 whose queue holds `subscribers` connections (within the system's
/// cap): they all connect at once, and a connection refused for a full queue would retry only
/// seconds later.
fn listen(subscribers: usize) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(i32::try_from(subscribers).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// Reads up to the blank line that ends an HTTP request head; the request itself is not used.
fn skip_request_head(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut head = Vec::with_capacity(256);
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buffer)?;
        if n == 0 || head.len() + n > 16 * 1024 {
            bail!("a subscriber sent no complete request head");
        }
        head.extend_from_slice(&buffer[..n]);
    }
    Ok(())
}
