//! Sequential TCP connection rate (netperf TCP_CRR style), for scripts/bench-net.sh.
//!
//!   crr server ADDR:PORT            accept forever: read 1 byte, answer 1 byte, close
//!   crr client ADDR:PORT SECONDS    connect, send 1 byte, read the answer, wait for
//!                                   the close, repeat; prints connections per second
//!
//! The server closes first, so TIME_WAIT stays on the server and the client's
//! ephemeral ports are not exhausted.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("server"), Some(addr)) => server(addr),
        (Some("client"), Some(addr)) => {
            let secs = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5.0);
            client(addr, Duration::from_secs_f64(secs))
        }
        _ => Err("usage: crr server ADDR:PORT | crr client ADDR:PORT SECONDS".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crr: {e}");
            ExitCode::FAILURE
        }
    }
}

fn server(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let mut b = [0u8; 1];
        if conn.read_exact(&mut b).is_ok() {
            let _ = conn.write_all(&b);
        }
    }
    Ok(())
}

fn client(addr: &str, length: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut done = 0u64;
    let mut failed = 0u64;
    while start.elapsed() < length {
        let one = || -> std::io::Result<()> {
            let mut s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            // Wait for the server's close.
            let _ = s.read(&mut b)?;
            Ok(())
        };
        match one() {
            Ok(()) => done += 1,
            Err(_) => failed += 1,
        }
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    println!("{rate:.0}");
    if failed > 0 {
        eprintln!("crr: {failed} connections failed");
    }
    if done == 0 {
        return Err(format!("no connection to {addr} succeeded"));
    }
    Ok(())
}
