//! IP fragment reassembly before conntrack and policy.
//!
//! Owns holding the fragments of a datagram until all have arrived, then
//! handing the packet path a whole datagram (so conntrack and policy see its
//! L4 ports) and, once it is decided, the original fragments to deliver. It is
//! per packet thread (a port is served by one thread, so a datagram's fragments
//! meet in one place) and bounded: fragments held per source address and in
//! total, fragments per datagram, a timeout; non-final fragments smaller than
//! a minimum, overlapping fragments and datagrams longer than IP allows are
//! rejected (the whole datagram is dropped), as OVS's `ipf` and Linux's
//! defragmentation do. IPv4, and IPv6 with the fragment header right after
//! the fixed header.

use std::collections::HashMap;
use std::time::Duration;

use crate::key::PortNo;
use crate::time::Time;

/// Limits of the reassembler.
#[derive(Clone, Debug)]
pub struct IpfConfig {
    /// Bytes of fragments held at once, in total.
    pub max_bytes: usize,
    /// Bytes of fragments held at once from one source address.
    pub max_bytes_per_source: usize,
    /// Fragments one datagram may have.
    pub max_fragments: usize,
    /// How long an incomplete datagram is kept.
    pub timeout: Duration,
    /// Smallest payload a fragment that is not the last may carry (IPv4 / IPv6).
    pub min_fragment_v4: usize,
    pub min_fragment_v6: usize,
}

impl Default for IpfConfig {
    fn default() -> Self {
        IpfConfig {
            max_bytes: 8 << 20,
            max_bytes_per_source: 2 << 20,
            max_fragments: 128,
            timeout: Duration::from_secs(5),
            min_fragment_v4: 400,
            min_fragment_v6: 1232,
        }
    }
}

/// Why fragments were dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FragDrop {
    /// Overlapping, too small, too many, past 64 KiB, or not parseable.
    Invalid,
    /// Holding it would pass a memory limit.
    Limit,
    /// The datagram did not complete in time.
    Timeout,
}

/// What became of a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Held until the rest arrives.
    Held,
    /// Dropped (with the rest of its datagram when `Invalid`).
    Dropped(FragDrop),
    /// The datagram is complete: [`Ipf::datagram`] and [`Ipf::fragments`].
    Complete,
}

/// A datagram's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DgramKey {
    in_port: PortNo,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    id: u32,
}

#[derive(Debug)]
struct Pending {
    /// (offset, payload length, last fragment, frame index), sorted by offset.
    parts: Vec<(usize, usize, bool, usize)>,
    /// The original frames, in arrival order.
    frames: Vec<Vec<u8>>,
    bytes: usize,
    deadline: Time,
    v6: bool,
}

/// Counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IpfStats {
    pub held_bytes: usize,
    pub completed: u64,
    pub invalid: u64,
    pub limit: u64,
    pub timeout: u64,
}

/// The reassembler of one packet thread.
#[derive(Debug, Default)]
pub struct Ipf {
    config: IpfConfig,
    pending: HashMap<DgramKey, Pending>,
    /// (deadline, datagram) in the order datagrams started.
    deadlines: std::collections::VecDeque<(Time, DgramKey)>,
    by_source: HashMap<[u8; 16], usize>,
    held: usize,
    /// The last completed datagram, as one frame.
    datagram: Vec<u8>,
    /// Its original fragments.
    fragments: Vec<Vec<u8>>,
    pub stats: IpfStats,
}

/// A fragment's place: where its IP header starts, its payload, offset, flags.
struct Frag {
    l3: usize,
    payload: std::ops::Range<usize>,
    offset: usize,
    more: bool,
    key: DgramKey,
    v6: bool,
    /// IPv6: where the fragment header starts.
    frag_hdr: usize,
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Reads a fragment's header fields; `None` when it is not a fragment we can
/// reassemble.
fn parse(in_port: PortNo, frame: &[u8]) -> Option<Frag> {
    if frame.len() < 14 {
        return None;
    }
    let l3 = 14;
    match be16(frame, 12) {
        0x0800 => {
            let ip = frame.get(l3..)?;
            if ip.len() < 20 || ip[0] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = be16(ip, 2);
            if ihl < 20 || total < ihl || total > ip.len() {
                return None;
            }
            let flags_off = be16(ip, 6);
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[10..12].copy_from_slice(&[0xff, 0xff]);
            dst[10..12].copy_from_slice(&[0xff, 0xff]);
            src[12..].copy_from_slice(&ip[12..16]);
            dst[12..].copy_from_slice(&ip[16..20]);
            Some(Frag {
                l3,
                payload: l3 + ihl..l3 + total,
                offset: (flags_off & 0x1fff) * 8,
                more: flags_off & 0x2000 != 0,
                key: DgramKey {
                    in_port,
                    src,
                    dst,
                    proto: ip[9],
                    id: be16(ip, 4) as u32,
                },
                v6: false,
                frag_hdr: 0,
            })
        }
        0x86dd => {
            let ip = frame.get(l3..)?;
            if ip.len() < 48 || ip[0] >> 4 != 6 || ip[6] != 44 {
                return None;
            }
            let end = 40 + be16(ip, 4);
            if end > ip.len() || end < 48 {
                return None;
            }
            let fh = &ip[40..48];
            let off_flags = be16(fh, 2);
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            Some(Frag {
                l3,
                payload: l3 + 48..l3 + end,
                offset: (off_flags >> 3) * 8,
                more: off_flags & 1 != 0,
                key: DgramKey {
                    in_port,
                    src,
                    dst,
                    proto: fh[0],
                    id: u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]),
                },
                v6: true,
                frag_hdr: l3 + 40,
            })
        }
        _ => None,
    }
}

impl Ipf {
    pub fn new(config: IpfConfig) -> Ipf {
        Ipf {
            config,
            ..Ipf::default()
        }
    }

    /// Holds a fragment received on `in_port` at `now`; completes its
    /// datagram when it is the missing piece. Incomplete datagrams past their
    /// timeout are dropped first.
    pub fn add(&mut self, now: Time, in_port: PortNo, frame: &[u8]) -> Added {
        self.expire(now);
        let Some(f) = parse(in_port, frame) else {
            self.stats.invalid += 1;
            return Added::Dropped(FragDrop::Invalid);
        };
        let len = f.payload.len();
        let min = if f.v6 {
            self.config.min_fragment_v6
        } else {
            self.config.min_fragment_v4
        };
        let too_small = f.more && len < min;
        let misaligned = f.more && len % 8 != 0;
        if too_small || misaligned || f.offset + len > 65_535 || len == 0 {
            self.reject(&f.key);
            return Added::Dropped(FragDrop::Invalid);
        }
        let source = self.by_source.get(&f.key.src).copied().unwrap_or(0);
        if self.held + frame.len() > self.config.max_bytes
            || source + frame.len() > self.config.max_bytes_per_source
        {
            self.stats.limit += 1;
            return Added::Dropped(FragDrop::Limit);
        }
        let deadline = now + self.config.timeout;
        if !self.pending.contains_key(&f.key) {
            self.deadlines.push_back((deadline, f.key));
            // Datagrams completed or rejected early leave their deadline
            // behind; drop those now and then so the queue stays the size of
            // what is pending (amortised: it at least halves each time).
            if self.deadlines.len() > 2 * self.pending.len() + 1024 {
                let pending = &self.pending;
                self.deadlines
                    .retain(|(d, k)| pending.get(k).is_some_and(|p| p.deadline == *d));
                self.deadlines.push_back((deadline, f.key));
            }
        }
        let p = self.pending.entry(f.key).or_insert_with(|| Pending {
            parts: Vec::new(),
            frames: Vec::new(),
            bytes: 0,
            deadline,
            v6: f.v6,
        });
        let at = p.parts.partition_point(|part| part.0 < f.offset);
        let overlaps_prev = at > 0 && {
            let (o, l, _, _) = p.parts[at - 1];
            o + l > f.offset
        };
        let overlaps_next = p
            .parts
            .get(at)
            .is_some_and(|(o, _, _, _)| f.offset + len > *o);
        let after_last = p
            .parts
            .iter()
            .any(|(o, l, last, _)| *last && f.offset + len > o + l)
            || (!f.more && p.parts.iter().any(|(o, l, _, _)| o + l > f.offset + len));
        if overlaps_prev
            || overlaps_next
            || after_last
            || p.parts.len() >= self.config.max_fragments
            || p.v6 != f.v6
        {
            self.reject(&f.key);
            return Added::Dropped(FragDrop::Invalid);
        }
        p.parts.insert(at, (f.offset, len, !f.more, p.frames.len()));
        p.frames.push(frame.to_vec());
        p.bytes += frame.len();
        self.held += frame.len();
        *self.by_source.entry(f.key.src).or_insert(0) += frame.len();
        // Complete: contiguous from 0 to a last fragment.
        let mut next = 0;
        let mut complete = false;
        for (o, l, last, _) in &p.parts {
            if *o != next {
                break;
            }
            next += l;
            if *last {
                complete = true;
            }
        }
        if !complete {
            return Added::Held;
        }
        let p = self.take(&f.key).expect("pending");
        self.assemble(p, &f);
        self.stats.completed += 1;
        Added::Complete
    }

    /// Builds the whole datagram from `p` (whose first fragment gives the
    /// headers).
    fn assemble(&mut self, p: Pending, f: &Frag) {
        self.datagram.clear();
        let first = &p.frames[p.parts[0].3];
        let Some(head) = parse(f.key.in_port, first) else {
            return;
        };
        let header_end = if p.v6 {
            head.frag_hdr
        } else {
            head.payload.start
        };
        self.datagram.extend_from_slice(&first[..header_end]);
        for (_, _, _, i) in &p.parts {
            let frame = &p.frames[*i];
            if let Some(part) = parse(f.key.in_port, frame) {
                self.datagram.extend_from_slice(&frame[part.payload]);
            }
        }
        let l3 = head.l3;
        let d = &mut self.datagram;
        if p.v6 {
            // Drop the fragment header: the fixed header's next header is the
            // fragment header's, and the payload length shrinks by 8.
            d[l3 + 6] = f.key.proto;
            let payload = (d.len() - l3 - 40) as u16;
            d[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
        } else {
            let total = (d.len() - l3) as u16;
            d[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            d[l3 + 6..l3 + 8].copy_from_slice(&[0, 0]);
        }
        self.fragments = p.frames;
        // Deliver in offset order.
        let order: Vec<usize> = p.parts.iter().map(|part| part.3).collect();
        let mut ordered = Vec::with_capacity(order.len());
        for i in order {
            ordered.push(std::mem::take(&mut self.fragments[i]));
        }
        self.fragments = ordered;
    }

    /// The last completed datagram, as one frame (for the pipeline).
    pub fn datagram(&mut self) -> &mut [u8] {
        &mut self.datagram
    }

    /// The last completed datagram's original fragments, in order (to deliver).
    pub fn fragments(&self) -> &[Vec<u8>] {
        &self.fragments
    }

    /// The datagram and its fragments at once.
    pub fn completed(&mut self) -> (&mut [u8], &mut [Vec<u8>]) {
        (&mut self.datagram, &mut self.fragments)
    }

    fn take(&mut self, key: &DgramKey) -> Option<Pending> {
        let p = self.pending.remove(key)?;
        self.held -= p.bytes;
        if let Some(s) = self.by_source.get_mut(&key.src) {
            *s -= p.bytes;
            if *s == 0 {
                self.by_source.remove(&key.src);
            }
        }
        Some(p)
    }

    fn reject(&mut self, key: &DgramKey) {
        self.stats.invalid += 1;
        self.take(key);
    }

    /// Drops datagrams past their deadline. Deadlines are in the order
    /// datagrams started (the timeout is one constant), so only the oldest
    /// are looked at: a fragment flood costs no scan per fragment.
    pub fn expire(&mut self, now: Time) {
        while let Some(&(deadline, key)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            // Completed or rejected since, or the same key started again later.
            if self
                .pending
                .get(&key)
                .is_some_and(|p| p.deadline == deadline)
            {
                self.take(&key);
                self.stats.timeout += 1;
            }
        }
    }

    /// Bytes of fragments held now.
    pub fn held_bytes(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;

    /// A UDP datagram with `payload` bytes, cut into IPv4 fragments of at most
    /// `mtu` bytes of IP packet.
    fn fragments_v4(id: u16, payload: usize, mtu: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut whole = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(4000, 53)
            .write(&mut whole, &vec![7u8; payload])
            .unwrap();
        let body = whole[34..].to_vec(); // UDP header + data
        let chunk = (mtu - 20) / 8 * 8;
        let mut out = Vec::new();
        let mut off = 0;
        while off < body.len() {
            let end = (off + chunk).min(body.len());
            let mut f = whole[..34].to_vec();
            f.truncate(14 + 20);
            let total = (20 + end - off) as u16;
            f[16..18].copy_from_slice(&total.to_be_bytes());
            f[18..20].copy_from_slice(&id.to_be_bytes());
            let more = if end < body.len() { 0x2000 } else { 0 };
            let fo = (more | (off / 8)) as u16;
            f[20..22].copy_from_slice(&fo.to_be_bytes());
            f.extend_from_slice(&body[off..end]);
            out.push(f);
            off = end;
        }
        (whole, out)
    }

    #[test]
    fn reassembles_in_any_order_and_keeps_the_fragments() {
        let (whole, frags) = fragments_v4(7, 4000, 1500);
        assert_eq!(frags.len(), 3);
        let mut ipf = Ipf::default();
        assert_eq!(ipf.add(Time::ZERO, PortNo(1), &frags[2]), Added::Held);
        assert_eq!(ipf.add(Time::ZERO, PortNo(1), &frags[0]), Added::Held);
        assert_eq!(ipf.add(Time::ZERO, PortNo(1), &frags[1]), Added::Complete);
        let d = ipf.datagram().to_vec();
        assert_eq!(d[34..], whole[34..], "payload");
        let k = crate::key::parse(PortNo(1), &d);
        assert!(k.flags.is_clean() && k.nw_frag == 0);
        assert_eq!((k.tp_src, k.tp_dst), (4000, 53));
        assert_eq!(ipf.fragments(), &frags[..], "delivered in order");
        assert_eq!(ipf.held_bytes(), 0);
    }

    #[test]
    fn reassembles_ipv6_with_its_fragment_header_taken_out() {
        let mut whole = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(4000, 53)
            .write(&mut whole, &vec![9u8; 3000])
            .unwrap();
        let body = whole[54..].to_vec(); // UDP header + data
        let mut frags = Vec::new();
        for (i, chunk) in body.chunks(1448).enumerate() {
            let more = (i + 1) * 1448 < body.len();
            let mut f = whole[..54].to_vec();
            f[14 + 6] = 44; // next header: fragment
            let plen = (8 + chunk.len()) as u16;
            f[14 + 4..14 + 6].copy_from_slice(&plen.to_be_bytes());
            let off = ((i * 1448 / 8) << 3) as u16 | u16::from(more);
            f.extend_from_slice(&[17, 0]);
            f.extend_from_slice(&off.to_be_bytes());
            f.extend_from_slice(&0x1234_5678u32.to_be_bytes());
            f.extend_from_slice(chunk);
            frags.push(f);
        }
        assert_eq!(frags.len(), 3);
        let mut ipf = Ipf::default();
        assert_eq!(ipf.add(Time::ZERO, PortNo(1), &frags[1]), Added::Held);
        assert_eq!(ipf.add(Time::ZERO, PortNo(1), &frags[2]), Added::Held);
        assert_eq!(ipf.add(Time::ZERO, PortNo(1), &frags[0]), Added::Complete);
        let d = ipf.datagram().to_vec();
        assert_eq!(d, whole, "the original datagram, byte for byte");
        let k = crate::key::parse(PortNo(1), &d);
        assert_eq!((k.nw_frag, k.tp_dst), (0, 53));
    }

    #[test]
    fn overlaps_tiny_fragments_and_floods_are_refused() {
        let (_, frags) = fragments_v4(8, 4000, 1500);
        let mut ipf = Ipf::default();
        ipf.add(Time::ZERO, PortNo(1), &frags[0]);
        // The same fragment again overlaps itself: the datagram is dropped.
        assert_eq!(
            ipf.add(Time::ZERO, PortNo(1), &frags[0]),
            Added::Dropped(FragDrop::Invalid)
        );
        assert_eq!(ipf.held_bytes(), 0);
        // Tiny non-final fragments (the L4 header split across them).
        let (_, tiny) = fragments_v4(9, 200, 60);
        assert_eq!(
            ipf.add(Time::ZERO, PortNo(1), &tiny[0]),
            Added::Dropped(FragDrop::Invalid)
        );
        // A flood of first fragments that never complete: bounded per source.
        let mut held = 0;
        for id in 0..10_000u16 {
            let (_, f) = fragments_v4(id, 4000, 1500);
            if ipf.add(Time::ZERO, PortNo(1), &f[0]) == Added::Held {
                held += 1;
            }
        }
        assert!(ipf.held_bytes() <= IpfConfig::default().max_bytes_per_source);
        assert!(held > 0 && ipf.stats.limit > 0);
        // And they time out.
        ipf.expire(Time::from_secs(6));
        assert_eq!(ipf.held_bytes(), 0);
        // Datagrams started and rejected at once leave no bookkeeping behind.
        let t = Time::from_secs(10);
        for id in 0..20_000u16 {
            let (_, f) = fragments_v4(id, 4000, 1500);
            ipf.add(t, PortNo(2), &f[0]);
            ipf.add(t, PortNo(2), &f[0]); // overlaps itself: rejected
        }
        assert_eq!(ipf.held_bytes(), 0);
        assert!(ipf.deadlines.len() <= 1025, "{}", ipf.deadlines.len());
    }
}
