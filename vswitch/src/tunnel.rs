//! The VXLAN tunnel to other nodes: one UDP socket, one switch port per node.
//!
//! Owns the wire format (the VXLAN header, and between vswitch nodes the
//! virtio-net header carried inside the payload, flagged by a reserved bit),
//! which datagrams are accepted (the I flag, our VNI, a known node as sender)
//! and the tunnel's [`Port`]: a datagram enters on the sending node's port, a
//! frame for a node's port leaves to that node's address. Which nodes exist is
//! the realiser's business; it publishes them with each port set.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use datapath::PortNo;

use crate::port::{HEADROOM, Port, Rx, Sent, Tx, vnet_header_consistent};
use crate::sys::VNET_HDR_LEN;

/// The VXLAN header.
const VXLAN_LEN: usize = 8;
/// VXLAN flags: the network identifier is valid.
const VXLAN_I: u8 = 0x08;
/// VXLAN flags, a reserved bit vswitch uses between its own nodes: a
/// virtio-net header (segmentation/checksum offload) follows.
const VXLAN_VNET: u8 = 0x01;

/// Datagrams one read may reject before it gives the thread back.
const MAX_REJECTS_PER_READ: usize = 16;

/// The socket other nodes' pods are reached through.
#[derive(Debug)]
pub struct TunnelIo {
    socket: UdpSocket,
    vni: u32,
    /// The UDP port peers listen on.
    port: u16,
    /// Datagrams dropped: not VXLAN, another VNI, or from an unknown node.
    pub rx_rejected: AtomicU64,
    /// Frames dropped because their virtio-net header did not fit them.
    pub rx_bad_offload: AtomicU64,
}

impl TunnelIo {
    /// Tunnels over `socket` (made non-blocking) with network identifier `vni`
    /// to peers listening on UDP `port`.
    ///
    /// Fails when the socket cannot be made non-blocking.
    pub fn new(socket: UdpSocket, vni: u32, port: u16) -> io::Result<TunnelIo> {
        socket.set_nonblocking(true)?;
        Ok(TunnelIo {
            socket,
            vni,
            port,
            rx_rejected: AtomicU64::new(0),
            rx_bad_offload: AtomicU64::new(0),
        })
    }

    /// The address family peers are reached with (that of the bound socket).
    pub fn is_ipv6(&self) -> bool {
        self.socket.local_addr().is_ok_and(|a| a.is_ipv6())
    }

    /// A peer's address: its node address and the tunnel's UDP port.
    pub fn peer_addr(&self, node: IpAddr) -> SocketAddr {
        SocketAddr::new(node, self.port)
    }
}

/// The tunnel as the packet threads see it for one published port set: the
/// socket and the nodes behind it.
#[derive(Debug)]
pub struct VxlanPort {
    io: Arc<TunnelIo>,
    by_ip: HashMap<IpAddr, PortNo>,
    by_no: HashMap<PortNo, SocketAddr>,
}

impl VxlanPort {
    /// `peers`: each node's switch port and address.
    pub fn new(io: Arc<TunnelIo>, peers: impl IntoIterator<Item = (PortNo, SocketAddr)>) -> Self {
        let mut by_ip = HashMap::new();
        let mut by_no = HashMap::new();
        for (no, addr) in peers {
            by_ip.insert(addr.ip(), no);
            by_no.insert(no, addr);
        }
        VxlanPort { io, by_ip, by_no }
    }
}

impl Port for VxlanPort {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.io.socket.as_fd())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Rx>> {
        // Rejected datagrams count against the read budget too: a flood of
        // junk to the tunnel must not keep the packet thread from the pods.
        for _ in 0..MAX_REJECTS_PER_READ {
            // VXLAN header [+ virtio-net header] + frame, read so that
            // without the optional header the frame starts at HEADROOM - 12.
            let at = HEADROOM - VNET_HDR_LEN - VXLAN_LEN;
            let (n, from) = match self.io.socket.recv_from(&mut buf[at..]) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            let h = &buf[at..at + n.min(VXLAN_LEN)];
            let vni = h
                .get(4..7)
                .map(|v| u32::from_be_bytes([0, v[0], v[1], v[2]]));
            let vnet = h.first().is_some_and(|f| f & VXLAN_VNET != 0);
            let hdr = if vnet { VNET_HDR_LEN } else { 0 };
            let valid =
                n >= VXLAN_LEN + hdr + 14 && h[0] & VXLAN_I != 0 && vni == Some(self.io.vni);
            match (valid, self.by_ip.get(&from.ip())) {
                (true, Some(&peer)) => {
                    let start = at + VXLAN_LEN + hdr;
                    if hdr > 0
                        && !vnet_header_consistent(&buf[start - hdr..start], &buf[start..at + n])
                    {
                        self.io.rx_bad_offload.fetch_add(1, Relaxed);
                        continue;
                    }
                    return Ok(Some(Rx {
                        in_port: Some(peer),
                        start,
                        end: at + n,
                        hdr,
                    }));
                }
                _ => {
                    self.io.rx_rejected.fetch_add(1, Relaxed);
                }
            }
        }
        Ok(None)
    }

    fn send(&self, to: PortNo, frame: &mut Tx<'_>) -> io::Result<Sent> {
        let Some(addr) = self.by_no.get(&to) else {
            return Ok(Sent::NoRoute);
        };
        // With offloads the virtio-net header travels inside the payload; else
        // the VXLAN header goes where the header was.
        let (at, flags) = if frame.offloaded {
            (frame.start - VNET_HDR_LEN - VXLAN_LEN, VXLAN_I | VXLAN_VNET)
        } else {
            frame.header_intact = false;
            (frame.start - VXLAN_LEN, VXLAN_I)
        };
        let vni = self.io.vni.to_be_bytes();
        frame.buf[at..at + VXLAN_LEN].copy_from_slice(&[flags, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
        match self.io.socket.send_to(&frame.buf[at..frame.end], addr) {
            Ok(_) => Ok(Sent::Ok),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Sent::Full),
            Err(e) => Err(e),
        }
    }
}
