//! The VXLAN tunnel to other nodes: UDP sockets on the tunnel port (several,
//! `SO_REUSEPORT`, so several packet threads read it), one switch port per
//! node.
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

/// Source ports a tunnel of several sockets sends from: enough that a peer's
/// `SO_REUSEPORT` hash spreads them over its sockets.
pub const SENDERS: usize = 16;

/// Datagrams one read may reject before it gives the thread back.
const MAX_REJECTS_PER_READ: usize = 16;

/// The sockets other nodes' pods are reached through.
#[derive(Debug)]
pub struct TunnelIo {
    /// Bound to the tunnel port; with several (`SO_REUSEPORT`) the kernel
    /// spreads datagrams over them by their addresses and ports.
    sockets: Vec<UdpSocket>,
    /// With several sockets, what frames leave from: [`SENDERS`] sockets on
    /// ports of their own, picked by a hash of the inner flow, so a flow
    /// always leaves from one source port and the peer's sockets (however
    /// many it has) share the flows, as RFC 7348 suggests. With one socket,
    /// frames leave from it.
    senders: Vec<UdpSocket>,
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
            sockets: vec![socket],
            senders: Vec::new(),
            vni,
            port,
            rx_rejected: AtomicU64::new(0),
            rx_bad_offload: AtomicU64::new(0),
        })
    }

    /// Tunnels over `sockets` sockets bound to `local`:`port` (with more than
    /// one, `SO_REUSEPORT` sockets, and [`SENDERS`] senders on ports of their
    /// own).
    ///
    /// Fails when a socket cannot be bound (the port is taken by another
    /// program, the address is not the node's) or `sockets` is 0.
    pub fn open(local: IpAddr, port: u16, vni: u32, sockets: usize) -> io::Result<TunnelIo> {
        if sockets == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the tunnel needs at least one socket",
            ));
        }
        if sockets == 1 {
            return TunnelIo::new(UdpSocket::bind((local, port))?, vni, port);
        }
        let bind = |port: u16, reuse: bool| -> io::Result<UdpSocket> {
            let addr = SocketAddr::new(local, port);
            let s = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            s.set_reuse_port(reuse)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            Ok(s.into())
        };
        let first = bind(port, true)?;
        // Port 0 asks for a free port: every socket then shares the one bound.
        let port = first.local_addr()?.port();
        let mut all = vec![first];
        for _ in 1..sockets {
            all.push(bind(port, true)?);
        }
        let senders = (0..SENDERS)
            .map(|_| bind(0, false))
            .collect::<io::Result<_>>()?;
        Ok(TunnelIo {
            sockets: all,
            senders,
            vni,
            port,
            rx_rejected: AtomicU64::new(0),
            rx_bad_offload: AtomicU64::new(0),
        })
    }

    /// How many sockets read the tunnel port.
    pub fn sockets(&self) -> usize {
        self.sockets.len()
    }

    /// The address family peers are reached with (that of the bound socket).
    pub fn is_ipv6(&self) -> bool {
        self.sockets[0].local_addr().is_ok_and(|a| a.is_ipv6())
    }

    /// The socket a frame to a peer leaves from (see `senders`).
    fn sender(&self, frame: &[u8]) -> &UdpSocket {
        match self.senders.len() {
            0 => &self.sockets[0],
            n => &self.senders[flow_hash(frame) % n],
        }
    }

    /// A peer's address: its node address and the tunnel's UDP port.
    pub fn peer_addr(&self, node: IpAddr) -> SocketAddr {
        SocketAddr::new(node, self.port)
    }
}

/// A hash of what is constant over an Ethernet frame's flow: addresses,
/// protocol and ports (no ports for a fragment: the later fragments carry
/// none, and all must take one path), else the MAC addresses.
fn flow_hash(frame: &[u8]) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0x5d1c).build_hasher();
    let ethertype = frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
    let fields = match ethertype {
        Some(0x0800) if frame.len() >= 34 => {
            let ihl = usize::from(frame[14] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([frame[20], frame[21]]) & 0x3fff != 0;
            h.write(&frame[23..24]);
            h.write(&frame[26..34]);
            (!fragment)
                .then(|| frame.get(14 + ihl..14 + ihl + 4))
                .flatten()
        }
        Some(0x86dd) if frame.len() >= 54 => {
            h.write(&frame[20..21]);
            h.write(&frame[22..54]);
            // A next header of TCP, UDP or SCTP: ports follow.
            matches!(frame[20], 6 | 17 | 132)
                .then(|| frame.get(54..58))
                .flatten()
        }
        _ => frame.get(..12),
    };
    if let Some(f) = fields {
        h.write(f);
    }
    h.finish() as usize
}

/// The tunnel as the packet threads see it for one published port set: the
/// socket and the nodes behind it.
#[derive(Debug)]
pub struct VxlanPort {
    io: Arc<TunnelIo>,
    /// Which of the tunnel's sockets this port reads.
    socket: usize,
    by_ip: HashMap<IpAddr, PortNo>,
    by_no: HashMap<PortNo, SocketAddr>,
}

impl VxlanPort {
    /// Socket `socket` of `io` (less than `io.sockets()`); `peers`: each
    /// node's switch port and address.
    pub fn new(
        io: Arc<TunnelIo>,
        socket: usize,
        peers: impl IntoIterator<Item = (PortNo, SocketAddr)>,
    ) -> Self {
        let mut by_ip = HashMap::new();
        let mut by_no = HashMap::new();
        for (no, addr) in peers {
            by_ip.insert(addr.ip(), no);
            by_no.insert(no, addr);
        }
        let socket = socket.min(io.sockets() - 1);
        VxlanPort {
            io,
            socket,
            by_ip,
            by_no,
        }
    }

    fn socket(&self) -> &UdpSocket {
        &self.io.sockets[self.socket]
    }
}

impl Port for VxlanPort {
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.socket().as_fd())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Rx>> {
        // Rejected datagrams count against the read budget too: a flood of
        // junk to the tunnel must not keep the packet thread from the pods.
        for _ in 0..MAX_REJECTS_PER_READ {
            // VXLAN header [+ virtio-net header] + frame, read so that
            // without the optional header the frame starts at HEADROOM - 12.
            let at = HEADROOM - VNET_HDR_LEN - VXLAN_LEN;
            let (n, from) = match self.socket().recv_from(&mut buf[at..]) {
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
        let sender = self.io.sender(&frame.buf[frame.start..frame.end]);
        match sender.send_to(&frame.buf[at..frame.end], addr) {
            Ok(_) => Ok(Sent::Ok),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Sent::Full),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::BUFFER;
    use etherparse::PacketBuilder;

    /// A UDP frame of flow `sport` -> 9, inner addresses 10.0.0.1 -> 10.0.1.1.
    fn frame(sport: u16) -> Vec<u8> {
        let mut f = vec![0u8; HEADROOM];
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 1, 1], 64)
            .udp(sport, 9)
            .write(&mut f, &[7; 8])
            .unwrap();
        f
    }

    /// Two nodes on loopback, each with a tunnel of two sockets: frames of
    /// many flows from one node reach both sockets of the other, every flow
    /// on one socket only (its frames stay in order), all from a known node.
    #[test]
    fn a_peers_flows_spread_over_the_tunnel_sockets() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let a = Arc::new(TunnelIo::open(local, 0, 42, 2).unwrap());
        let b = Arc::new(TunnelIo::open(local, 0, 42, 2).unwrap());
        assert_eq!(b.sockets(), 2);
        let to_b = SocketAddr::new(local, b.port);
        let from_a = SocketAddr::new(local, a.port);
        let sender = VxlanPort::new(a.clone(), 0, [(PortNo(0xf001), to_b)]);
        let readers: Vec<VxlanPort> = (0..2)
            .map(|q| VxlanPort::new(b.clone(), q, [(PortNo(0xf002), from_a)]))
            .collect();
        for sport in 0..64u16 {
            for _ in 0..3 {
                let mut f = frame(1000 + sport);
                let end = f.len();
                let mut tx = Tx {
                    buf: &mut f,
                    start: HEADROOM,
                    end,
                    offloaded: false,
                    header_intact: false,
                };
                assert_eq!(sender.send(PortNo(0xf001), &mut tx).unwrap(), Sent::Ok);
            }
        }
        let mut on = [std::collections::BTreeSet::new(), Default::default()];
        let mut read = 0;
        let mut buf = vec![0u8; BUFFER];
        for (q, reader) in readers.iter().enumerate() {
            while let Some(rx) = reader.recv(&mut buf).unwrap() {
                assert_eq!(rx.in_port, Some(PortNo(0xf002)));
                let key = datapath::parse(PortNo(0), &buf[rx.start..rx.end]);
                on[q].insert(key.tp_src);
                read += 1;
            }
        }
        assert_eq!(read, 64 * 3, "every frame arrives");
        assert!(on.iter().all(|s| !s.is_empty()), "both sockets carry flows");
        assert!(on[0].is_disjoint(&on[1]), "a flow keeps to one socket");
        assert_eq!(b.rx_rejected.load(Relaxed), 0);
    }

    /// The hash of a flow ignores what changes from packet to packet (TTL,
    /// identification, checksum, payload) and a fragment's missing ports.
    #[test]
    fn the_flow_hash_is_constant_over_a_flow() {
        let f = frame(5000);
        let mut g = f.clone();
        g[HEADROOM + 18] ^= 0xff; // IPv4 identification
        g[HEADROOM + 22] ^= 0x0f; // TTL
        *g.last_mut().unwrap() ^= 1; // payload
        assert_eq!(flow_hash(&f[HEADROOM..]), flow_hash(&g[HEADROOM..]));
        assert_ne!(
            flow_hash(&f[HEADROOM..]),
            flow_hash(&frame(5001)[HEADROOM..])
        );
        // Fragments of one datagram: the first has ports, the later none.
        let mut first = f.clone();
        first[HEADROOM + 20] = 0x20; // more fragments
        let mut later = f.clone();
        later[HEADROOM + 21] = 0x10; // fragment offset
        later[HEADROOM + 34..HEADROOM + 38].fill(0xee);
        assert_eq!(flow_hash(&first[HEADROOM..]), flow_hash(&later[HEADROOM..]));
    }
}
