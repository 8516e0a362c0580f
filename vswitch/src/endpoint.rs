//! Endpoints: what a packet thread reads (a TAP queue, a tunnel socket).
//!
//! Owns an endpoint's identity in a port set (its I/O, the switch port it
//! is, its queue) and the state kept across port sets: the lane that reads
//! it, the claim that keeps a second reader out, and the work read from it
//! that the balancer weighs; and the port set packet threads read.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use datapath::PortNo;

use crate::port::{Port, PortCounters};

/// One I/O endpoint of a port set (a TAP queue, the tunnel socket), and the
/// switch port it is with its counters (`None`: it serves several, and says
/// which on every frame).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub io: Arc<dyn Port>,
    pub own: Option<(PortNo, Arc<PortCounters>)>,
    /// Which queue of its port this is (0 for a single-queue port).
    pub queue: usize,
    /// Who reads it and how busy it is; kept from one port set to the next.
    pub state: Arc<EndpointState>,
}

impl Endpoint {
    /// An endpoint with a fresh state.
    pub fn new(io: Arc<dyn Port>, own: Option<(PortNo, Arc<PortCounters>)>) -> Endpoint {
        Endpoint {
            io,
            own,
            queue: 0,
            state: Arc::default(),
        }
    }

    /// The lane of `lanes` that reads it: the balancer's choice, else spread
    /// by port number and queue (the tunnel's from the last lane down).
    pub fn lane(&self, lanes: usize) -> usize {
        match self.state.lane.load(Relaxed) {
            UNASSIGNED => match &self.own {
                Some((p, _)) => (p.0 as usize + self.queue) % lanes,
                None => (lanes - 1 + self.queue) % lanes,
            },
            lane => lane % lanes,
        }
    }
}

/// [`EndpointState::lane`] before the balancer has moved the endpoint.
const UNASSIGNED: usize = usize::MAX;

/// An endpoint's reader and load, shared by the port sets it appears in.
#[derive(Debug)]
pub struct EndpointState {
    /// The lane the balancer put it on (`UNASSIGNED`: the default spread).
    lane: AtomicUsize,
    /// Held by the packet thread reading it: its own lane, or another
    /// reading it as a partner; never two at once, so frames stay in order.
    reading: AtomicBool,
    /// Work done reading it (frames, plus one per KiB), what the balancer
    /// weighs.
    work: AtomicU64,
}

impl Default for EndpointState {
    fn default() -> EndpointState {
        EndpointState {
            lane: AtomicUsize::new(UNASSIGNED),
            reading: AtomicBool::new(false),
            work: AtomicU64::new(0),
        }
    }
}

impl EndpointState {
    /// Takes the right to read the endpoint (false: another thread has it).
    pub(crate) fn claim(&self) -> bool {
        !self
            .reading
            .swap(true, std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn release(&self) {
        self.reading
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Counts `frames` frames of `bytes` bytes read from it.
    pub(crate) fn add_work(&self, frames: usize, bytes: usize) {
        self.work
            .fetch_add((frames + (bytes >> 10)) as u64, Relaxed);
    }

    /// Puts it on `lane` (the balancer's choice).
    pub(crate) fn place(&self, lane: usize) {
        self.lane.store(lane, Relaxed);
    }

    /// Work done reading it so far.
    pub fn work(&self) -> u64 {
        self.work.load(Relaxed)
    }

    /// The lane the balancer put it on, if it did.
    pub fn assigned(&self) -> Option<usize> {
        Some(self.lane.load(Relaxed)).filter(|&l| l != UNASSIGNED)
    }
}

/// Switch port -> (endpoint index, counters): looked up per output, so a fast
/// hash (port numbers are ours, not an attacker's).
pub type PortMap = HashMap<PortNo, (usize, Arc<PortCounters>), foldhash::fast::FixedState>;

/// The ports as published: what packet threads read and write. Immutable;
/// the realiser publishes a new one, before the flows that name its ports.
#[derive(Debug, Default)]
pub struct PortSet {
    pub endpoints: Vec<Endpoint>,
    pub ports: PortMap,
}

impl PortSet {
    /// The same endpoints, ports and counters (nothing for packet threads
    /// to register again).
    pub(crate) fn same(&self, other: &PortSet) -> bool {
        let same_endpoint = |a: &Endpoint, b: &Endpoint| {
            Arc::ptr_eq(&a.io, &b.io)
                && Arc::ptr_eq(&a.state, &b.state)
                && a.queue == b.queue
                && match (&a.own, &b.own) {
                    (Some((p, c)), Some((q, d))) => p == q && Arc::ptr_eq(c, d),
                    (None, None) => true,
                    _ => false,
                }
        };
        self.endpoints.len() == other.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&other.endpoints)
                .all(|(a, b)| same_endpoint(a, b))
            && self.ports.len() == other.ports.len()
            && self.ports.iter().all(|(p, (i, c))| {
                other
                    .ports
                    .get(p)
                    .is_some_and(|(j, d)| i == j && Arc::ptr_eq(c, d))
            })
    }

    /// The endpoints of a pod's or the gateway's port `p` (one per queue,
    /// next to each other); none for a tunnel peer or an unknown port.
    pub(crate) fn queues(&self, p: PortNo) -> impl Iterator<Item = usize> + '_ {
        let first = self.ports.get(&p).map_or(self.endpoints.len(), |(i, _)| *i);
        (first..self.endpoints.len())
            .take_while(move |&i| self.endpoints[i].own.as_ref().is_some_and(|(q, _)| *q == p))
    }

    pub(crate) fn get(&self, p: PortNo) -> Option<(&Endpoint, &PortCounters)> {
        let (i, c) = self.ports.get(&p)?;
        Some((&self.endpoints[*i], c))
    }
}
