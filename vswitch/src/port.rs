//! Ports: where frames come from and go to, behind one trait.
//!
//! Owns the [`Port`] trait the forwarder moves frames through, the buffer
//! layout a port reads into (an Ethernet frame with headroom in front, for a
//! virtio-net header and a VXLAN header to be put on or taken off without a
//! copy), per-port counters, and two ports: a TAP device ([`TapPort`]) and an
//! in-memory queue ([`MemoryPort`]) that lets the whole packet path run in
//! tests without root. The VXLAN tunnel is a third (`tunnel`).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use datapath::{DropReason, PortNo};

use crate::sys::VNET_HDR_LEN;
use crate::tap::Tap;

/// Largest frame a port hands over (a 64 KiB TSO segment), plus its
/// virtio-net header.
pub const MAX_FRAME: usize = 65_535 + VNET_HDR_LEN;
/// Bytes kept free in front of every frame in the packet buffer: room for a
/// virtio-net header and a VXLAN header.
pub const HEADROOM: usize = 32;
/// Size of a packet thread's buffer.
pub const BUFFER: usize = MAX_FRAME + HEADROOM;

/// A frame a port just read: where it sits in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rx {
    /// The port it entered on, when the port decides it (a tunnel: the sending
    /// node's port); `None`: the port's own number.
    pub in_port: Option<PortNo>,
    /// The Ethernet frame is `buf[start..end]`.
    pub start: usize,
    pub end: usize,
    /// Bytes of virtio-net header right before `start` (0: none).
    pub hdr: usize,
}

/// A frame on its way out: the buffer and what its header bytes hold.
#[derive(Debug)]
pub struct Tx<'a> {
    pub buf: &'a mut [u8],
    /// The Ethernet frame is `buf[start..end]`.
    pub start: usize,
    pub end: usize,
    /// The frame needs the virtio-net header it came with (a TSO segment, or a
    /// checksum left to the receiver): it cannot go to a port without one.
    pub offloaded: bool,
    /// `buf[start - VNET_HDR_LEN..start]` still holds the header the frame
    /// came with (an earlier output may have written over it).
    pub header_intact: bool,
}

impl Tx<'_> {
    /// The frame as a port with (`with_header`) or without a virtio-net header
    /// writes it; `None` when a segmentation-offload frame cannot go without.
    pub fn framed(&mut self, with_header: bool) -> Option<&[u8]> {
        match (with_header, self.offloaded) {
            (false, true) => None,
            (false, false) => Some(&self.buf[self.start..self.end]),
            (true, _) => {
                let from = self.start - VNET_HDR_LEN;
                if !self.header_intact {
                    self.buf[from..self.start].fill(0);
                    self.header_intact = true;
                }
                Some(&self.buf[from..self.end])
            }
        }
    }
}

/// Whether a virtio-net header (`hdr`, 10 or 12 bytes) is consistent with the
/// frame after it: a segmentation type the frame can have (TCP over the IP
/// version it carries), a segment size, checksum positions inside the frame.
/// The kernel writes consistent headers; one from the network (a tunnel
/// peer) may be anything, and a TAP write would reject it or worse.
pub fn vnet_header_consistent(hdr: &[u8], frame: &[u8]) -> bool {
    const NEEDS_CSUM: u8 = 1;
    const DATA_VALID: u8 = 2;
    const GSO_NONE: u8 = 0;
    const GSO_TCPV4: u8 = 1;
    const GSO_TCPV6: u8 = 4;
    const GSO_ECN: u8 = 0x80;
    if hdr.len() < 10 {
        return false;
    }
    let le = |i: usize| usize::from(u16::from_le_bytes([hdr[i], hdr[i + 1]]));
    let (flags, gso) = (hdr[0], hdr[1] & !GSO_ECN);
    let (gso_size, csum_start, csum_offset) = (le(4), le(6), le(8));
    if flags & !(NEEDS_CSUM | DATA_VALID) != 0 {
        return false;
    }
    if flags & NEEDS_CSUM != 0 && csum_start + csum_offset + 2 > frame.len() {
        return false;
    }
    let key = datapath::parse(PortNo(0), frame);
    match gso {
        GSO_NONE => true,
        GSO_TCPV4 | GSO_TCPV6 => {
            let v6 = gso == GSO_TCPV6;
            gso_size > 0
                && key.nw_proto == datapath::field::ip_proto::TCP
                && key.dl_type
                    == if v6 {
                        datapath::field::ether_type::IPV6
                    } else {
                        datapath::field::ether_type::IPV4
                    }
        }
        _ => false,
    }
}

/// What became of a frame sent to a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Ok,
    /// The port's queue was full (the pod is not reading): dropped, as a NIC would.
    Full,
    /// A segmentation-offload frame for a port without offloads.
    OffloadMismatch,
    /// No such destination behind this port (e.g. a tunnel peer that left).
    NoRoute,
}

/// One I/O endpoint of the switch.
///
/// Reads and writes never block. A port serving several switch ports (the
/// VXLAN tunnel: one per node) says on each frame which one it came in on.
pub trait Port: Send + Sync + std::fmt::Debug {
    /// The fd the packet thread waits on; `None`: polled on every wake.
    fn fd(&self) -> Option<BorrowedFd<'_>>;

    /// Reads one frame into `buf` (of [`BUFFER`] bytes) so that it starts at or
    /// after [`HEADROOM`] `- VNET_HDR_LEN - 8`; `Ok(None)` when none is waiting.
    ///
    /// Fails when the device is gone or broken.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Rx>>;

    /// Writes the frame out to switch port `to` (this port, or one of the
    /// nodes behind a tunnel).
    ///
    /// Fails when the device cannot be written to.
    fn send(&self, to: PortNo, frame: &mut Tx<'_>) -> io::Result<Sent>;
}

/// Why the switch itself (not the pipeline) dropped a frame on a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortDrop {
    /// The output port's queue was full (the pod is not reading).
    TxFull,
    /// Writing to the output port failed.
    TxError,
    /// Reading from the port failed.
    RxError,
    /// A segmentation-offload frame was bound for a port without offloads.
    OffloadMismatch,
}

impl PortDrop {
    pub const ALL: [PortDrop; 4] = [
        PortDrop::TxFull,
        PortDrop::TxError,
        PortDrop::RxError,
        PortDrop::OffloadMismatch,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PortDrop::TxFull => "tx_full",
            PortDrop::TxError => "tx_error",
            PortDrop::RxError => "rx_error",
            PortDrop::OffloadMismatch => "offload_mismatch",
        }
    }
}

/// Counters of one switch port; they live as long as the port is attached.
/// Several packet threads may write them: increments are read-modify-writes.
#[derive(Debug)]
pub struct PortCounters {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames received on this port that the pipeline dropped, by reason.
    pipeline_drops: [AtomicU64; DropReason::ALL.len()],
    /// Frames the switch dropped on this port, by reason.
    port_drops: [AtomicU64; PortDrop::ALL.len()],
    /// False once reading the port failed: its device is gone (a pod that
    /// deleted its interface); it is no longer polled.
    up: AtomicBool,
}

impl Default for PortCounters {
    fn default() -> PortCounters {
        PortCounters {
            rx_packets: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_packets: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            pipeline_drops: Default::default(),
            port_drops: Default::default(),
            up: AtomicBool::new(true),
        }
    }
}

impl PortCounters {
    /// Drops by reason name (pipeline reasons and port reasons), zeros included.
    pub fn drops(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .zip(&self.pipeline_drops)
            .map(|(r, c)| (r.name(), c.load(Relaxed)))
            .chain(
                PortDrop::ALL
                    .iter()
                    .zip(&self.port_drops)
                    .map(|(r, c)| (r.name(), c.load(Relaxed))),
            )
            .collect()
    }

    /// Drops of one reason (`PortDrop` or pipeline) by name.
    pub fn drop_count(&self, reason: &str) -> u64 {
        self.drops()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n)
    }

    pub fn received(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn pipeline_drop(&self, reason: DropReason) {
        self.pipeline_drops[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn port_drop(&self, reason: PortDrop) {
        self.port_drops[reason as usize].fetch_add(1, Relaxed);
    }

    /// Whether the port can still be read.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub(crate) fn set_down(&self) {
        self.up.store(false, Relaxed);
    }
}

/// A TAP device as a port: a pod's interface, or the gateway.
#[derive(Debug)]
pub struct TapPort(pub Tap);

impl Port for TapPort {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.0.as_fd())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Rx>> {
        let hdr = self.0.header_len();
        let start = HEADROOM;
        match self.0.recv(&mut buf[start - hdr..])? {
            Some(n) if n >= hdr => Ok(Some(Rx {
                in_port: None,
                start,
                end: start - hdr + n,
                hdr,
            })),
            Some(_) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame shorter than its virtio-net header",
            )),
            None => Ok(None),
        }
    }

    fn send(&self, _: PortNo, frame: &mut Tx<'_>) -> io::Result<Sent> {
        let Some(bytes) = frame.framed(self.0.header_len() > 0) else {
            return Ok(Sent::OffloadMismatch);
        };
        Ok(if self.0.send(bytes)? {
            Sent::Ok
        } else {
            Sent::Full
        })
    }
}

/// An in-memory port: frames pushed in are read by the switch, frames the
/// switch writes are kept. For tests of the packet path without root.
#[derive(Debug, Default)]
pub struct MemoryPort {
    /// Frames carry a virtio-net header (as TAP devices with offloads do).
    vnet_hdr: bool,
    inbox: Mutex<VecDeque<Vec<u8>>>,
    outbox: Mutex<Vec<Vec<u8>>>,
}

impl MemoryPort {
    /// A port whose frames carry a virtio-net header when `vnet_hdr`.
    pub fn new(vnet_hdr: bool) -> MemoryPort {
        MemoryPort {
            vnet_hdr,
            ..MemoryPort::default()
        }
    }

    /// Queues a frame for the switch to read (with its virtio-net header when
    /// the port has them).
    pub fn push(&self, frame: Vec<u8>) {
        self.inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(frame);
    }

    /// The frames the switch wrote to this port since the last call.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Port for MemoryPort {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Rx>> {
        let Some(frame) = self
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        else {
            return Ok(None);
        };
        let hdr = if self.vnet_hdr { VNET_HDR_LEN } else { 0 };
        if frame.len() < hdr {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame shorter than its virtio-net header",
            ));
        }
        let at = HEADROOM - hdr;
        let n = frame.len().min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&frame[..n]);
        Ok(Some(Rx {
            in_port: None,
            start: HEADROOM,
            end: at + n,
            hdr,
        }))
    }

    fn send(&self, _: PortNo, frame: &mut Tx<'_>) -> io::Result<Sent> {
        let Some(bytes) = frame.framed(self.vnet_hdr) else {
            return Ok(Sent::OffloadMismatch);
        };
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(bytes.to_vec());
        Ok(Sent::Ok)
    }
}
