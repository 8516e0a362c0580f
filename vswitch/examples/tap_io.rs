//! The batched-I/O experiment of issue 15: what a TAP frame costs to read
//! and to write with one system call per frame (what the packet threads do)
//! against io_uring, many frames per submission, with plain and with
//! registered buffers. Run as root; everything lives in a network namespace
//! it creates (and deletes):
//!
//!     cargo run --release -p vswitch --example tap_io [ROUNDS]
//!
//! Each round fills the device's queue with 512 frames of 64-byte UDP
//! datagrams (sent by a socket inside the namespace, so the kernel transmits
//! them on the TAP device) and times draining them only; writes inject 512
//! frames addressed to another MAC (dropped on arrival, so the time is the
//! write path's, not a socket's). Prints the median ns per frame.
#![allow(unsafe_code)] // io_uring submissions name buffers by pointer

use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd};
use std::process::Command;
use std::time::Instant;

use io_uring::{IoUring, opcode, types};

const FRAMES: usize = 512;
const BATCH: usize = 64;
const SLOT: usize = 2048;

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {}", args.join(" "));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let ns = format!("vstapio{}", std::process::id());
    ip(&["netns", "add", &ns]);
    let result = std::thread::spawn({
        let ns = ns.clone();
        move || run(&ns, rounds)
    })
    .join();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if result.is_err() {
        std::process::exit(1);
    }
}

fn run(ns: &str, rounds: usize) {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns");
    vswitch::sys::setns_net(file.as_fd()).expect("setns");
    let tap = vswitch::Tap::open("tapio0", false).expect("TAP device");
    ip(&["link", "set", "tapio0", "txqueuelen", "4096", "up"]);
    ip(&["addr", "add", "10.99.0.1/24", "dev", "tapio0"]);
    ip(&[
        "neigh",
        "add",
        "10.99.0.2",
        "lladdr",
        "02:00:00:00:00:02",
        "dev",
        "tapio0",
    ]);
    let sender = UdpSocket::bind("10.99.0.1:0").expect("sender");
    let fill = || {
        for _ in 0..FRAMES {
            sender.send_to(&[0u8; 64], "10.99.0.2:9").expect("sent");
        }
    };
    let fd = tap.as_fd().as_raw_fd();
    let mut slots = vec![0u8; SLOT * BATCH];
    let mut ring = IoUring::new(BATCH as u32 * 2).expect("io_uring");
    let iovecs: Vec<libc::iovec> = slots
        .chunks_mut(SLOT)
        .map(|s| libc::iovec {
            iov_base: s.as_mut_ptr().cast(),
            iov_len: SLOT,
        })
        .collect();
    // SAFETY: the buffers stay alive and unmoved until the ring is dropped.
    unsafe { ring.submitter().register_buffers(&iovecs) }.expect("registered buffers");

    // A frame to write: UDP to another MAC (dropped on arrival).
    let mut frame = vec![0u8; 106];
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    frame[14] = 0x45;

    let mut times: [Vec<f64>; 6] = Default::default();
    for _ in 0..rounds {
        // read(2), one frame per call.
        fill();
        let t = Instant::now();
        let mut n = 0;
        while tap.recv(&mut slots[..SLOT]).expect("read").is_some() {
            n += 1;
        }
        times[0].push(t.elapsed().as_nanos() as f64 / n.max(1) as f64);

        // io_uring reads, BATCH per submission, plain and registered buffers.
        for (m, fixed) in [(1, false), (2, true)] {
            fill();
            let t = Instant::now();
            let n = drain_uring(&mut ring, fd, &mut slots, fixed);
            times[m].push(t.elapsed().as_nanos() as f64 / n.max(1) as f64);
        }

        // write(2), one frame per call.
        let t = Instant::now();
        for _ in 0..FRAMES {
            tap.send(&frame).expect("write");
        }
        times[3].push(t.elapsed().as_nanos() as f64 / FRAMES as f64);

        // io_uring writes, BATCH per submission, plain and registered.
        for (m, fixed) in [(4, false), (5, true)] {
            for s in slots.chunks_mut(SLOT) {
                s[..frame.len()].copy_from_slice(&frame);
            }
            let t = Instant::now();
            write_uring(&mut ring, fd, &slots, frame.len(), fixed);
            times[m].push(t.elapsed().as_nanos() as f64 / FRAMES as f64);
        }
    }
    let names = [
        "read(2) per frame",
        "io_uring read, 64 per submit",
        "io_uring read_fixed (registered), 64 per submit",
        "write(2) per frame",
        "io_uring write, 64 per submit",
        "io_uring write_fixed (registered), 64 per submit",
    ];
    println!("TAP I/O, 64-byte UDP frames, {rounds} rounds of {FRAMES}: median ns per frame");
    for (name, t) in names.iter().zip(times) {
        println!("{:>8.0}  {name}", median(t));
    }
}

/// Reads the `FRAMES` frames `fill` queued, BATCH per submission; returns
/// how many were read. Exactly that many reads are submitted: io_uring arms
/// a poll for a read the device cannot answer yet (even on a non-blocking
/// descriptor), so one read too many would wait for a frame that never
/// comes. A frame the kernel dropped ends the run with an error instead.
fn drain_uring(ring: &mut IoUring, fd: i32, slots: &mut [u8], fixed: bool) -> usize {
    let mut total = 0;
    let wait = types::Timespec::new().sec(2);
    let args = types::SubmitArgs::new().timespec(&wait);
    for _ in 0..FRAMES / BATCH {
        for (i, s) in slots.chunks_mut(SLOT).enumerate() {
            let entry = if fixed {
                opcode::ReadFixed::new(types::Fd(fd), s.as_mut_ptr(), SLOT as u32, i as u16).build()
            } else {
                opcode::Read::new(types::Fd(fd), s.as_mut_ptr(), SLOT as u32).build()
            };
            // SAFETY: `slots` outlives the submission: it is reaped below
            // before this function returns.
            unsafe { ring.submission().push(&entry) }.expect("queue has room");
        }
        // A panic ends the run; `main` still deletes the namespace.
        if let Err(e) = ring.submitter().submit_with_args(BATCH, &args) {
            panic!(
                "io_uring reads not answered within 2 s ({e}): the device queue held fewer than {FRAMES} frames"
            );
        }
        total += ring.completion().filter(|c| c.result() > 0).count();
    }
    total
}

/// Writes `FRAMES` frames of `len` bytes from the slots, BATCH per submit.
fn write_uring(ring: &mut IoUring, fd: i32, slots: &[u8], len: usize, fixed: bool) {
    for _ in 0..FRAMES / BATCH {
        for (i, s) in slots.chunks(SLOT).enumerate() {
            let entry = if fixed {
                opcode::WriteFixed::new(types::Fd(fd), s.as_ptr(), len as u32, i as u16).build()
            } else {
                opcode::Write::new(types::Fd(fd), s.as_ptr(), len as u32).build()
            };
            // SAFETY: `slots` outlives the submission (reaped below).
            unsafe { ring.submission().push(&entry) }.expect("queue has room");
        }
        ring.submit_and_wait(BATCH).expect("submit");
        assert!(
            ring.completion().all(|c| c.result() == len as i32),
            "every write done"
        );
    }
}
