//! Sequential TCP connection rate (netperf TCP_CRR style), for scripts/bench-net.sh.
//!
//!   crr server ADDR:PORT            accept forever: read 1 byte, answer 1 byte, close
//!   crr client ADDR:PORT SECONDS    connect, send 1 byte, read the answer, wait for
//!                                   the close, repeat; prints connections per second
//!
//!   crr echo ADDR:PORT              accept forever: echo every byte back
//!   crr rr ADDR:PORT COUNT          one connection, COUNT one-byte round trips;
//!                                   prints the p50 and p99 round trip in µs
//!                                   (a TCP ping, for paths ICMP does not take,
//!                                   such as a Service's ClusterIP)
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
        (Some("echo"), Some(addr)) => echo(addr),
        (Some("rr"), Some(addr)) => {
            let count = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1000);
            round_trips(addr, count)
        }
        _ => Err(
            "usage: crr server ADDR:PORT | crr client ADDR:PORT SECONDS | crr echo ADDR:PORT | crr rr ADDR:PORT COUNT"
                .into(),
        ),
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
    let to: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let start = Instant::now();
    let mut done = 0u64;
    let mut failed = 0u64;
    let mut first_error = None;
    while start.elapsed() < length {
        let one = || -> std::io::Result<()> {
            // A lost SYN fails this connection, not the whole run.
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"x")?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            // Wait for the server's close.
            let _ = s.read(&mut b)?;
            Ok(())
        };
        let t = Instant::now();
        match one() {
            Ok(()) => done += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!(
                    "connection {} after {:.1} s: {e} (took {:.1} s)",
                    done + failed,
                    start.elapsed().as_secs_f64(),
                    t.elapsed().as_secs_f64()
                ));
            }
        }
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    println!("{rate:.0}");
    if failed > 0 {
        eprintln!(
            "crr: {failed} connections failed; the first: {}",
            first_error.unwrap_or_default()
        );
    }
    if done == 0 {
        return Err(format!("no connection to {addr} succeeded"));
    }
    Ok(())
}

fn echo(addr: &str) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = conn.set_nodelay(true);
            let mut b = [0u8; 1];
            while conn.read_exact(&mut b).is_ok() && conn.write_all(&b).is_ok() {}
        });
    }
    Ok(())
}

fn round_trips(addr: &str, count: usize) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(count);
    let mut b = [0u8; 1];
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(b"x").map_err(|e| e.to_string())?;
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(2));
    }
    times.sort_by(f64::total_cmp);
    let q = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    println!("{:.0} {:.0}", q(0.5), q(0.99));
    Ok(())
}
