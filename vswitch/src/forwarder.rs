//! The forwarder: packet threads moving frames between ports.
//!
//! Owns the data plane around the datapath: waiting on the published ports
//! (epoll), reading a bounded batch from each ready one, running every frame
//! through a datapath [`Worker`], writing it to the ports of its verdict,
//! per-port counters and connection events. It only reads what the realiser
//! publishes ([`PortSet`] and the flow tables) and decides nothing itself; a
//! [`Lane`] can be stepped by hand over in-memory ports, so the whole packet
//! path is tested without root.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use datapath::{Datapath, FlowKey, PortNo, Time, Worker};
use smallvec::SmallVec;

pub use crate::endpoint::{Endpoint, EndpointState, PortMap, PortSet};
pub use crate::polling::Polling;
use crate::port::{BUFFER, HEADROOM, PortCounters, PortDrop, Sent, Tx};
use crate::sys;

/// Frames read from one port before moving to the next.
pub const BATCH: usize = 64;

/// The switch's clock: monotonic, nanoseconds since the switch started (what
/// conntrack and flow counters count in).
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> Time {
        Time(self.0.elapsed().as_nanos() as u64)
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

/// A new connection the pipeline allowed (committed) or a policy table denied:
/// what the audit log and the per-rule metrics are made of.
#[derive(Debug, Clone, Copy)]
pub struct ConnEvent {
    pub key: FlowKey,
    pub allowed: bool,
    pub at: SystemTime,
}

/// Where packet threads send connection events (bounded: when the consumer
/// falls behind, events are counted as lost, never waited for).
#[derive(Debug)]
struct EventSink {
    tx: std::sync::mpsc::SyncSender<ConnEvent>,
    lost: AtomicU64,
}

/// What the realiser publishes and the forwarder reads.
#[derive(Debug)]
pub struct Published {
    pub dp: Arc<Datapath>,
    pub ports: ArcSwap<PortSet>,
    pub clock: Clock,
    /// Packet threads' doorbells: rung when the ports change (and on stop),
    /// so an idle packet thread sleeps without a timer.
    pub doorbells: Mutex<Vec<Arc<sys::Doorbell>>>,
    /// Packet threads started (what endpoints are spread over).
    pub lanes: std::sync::atomic::AtomicUsize,
}

impl Published {
    pub fn new(dp: Arc<Datapath>) -> Published {
        Published {
            dp,
            ports: ArcSwap::from_pointee(PortSet::default()),
            clock: Clock::new(),
            doorbells: Mutex::new(Vec::new()),
            lanes: std::sync::atomic::AtomicUsize::new(1),
        }
    }

    /// Publishes `ports` and wakes every packet thread to poll them (when
    /// they differ from those published).
    pub fn set_ports(&self, ports: PortSet) {
        if self.ports.load().same(&ports) {
            return;
        }
        self.ports.store(Arc::new(ports));
        self.ring();
    }

    fn ring(&self) {
        for d in self
            .doorbells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            d.ring();
        }
    }
}

/// Packet threads as started: joined when they stop.
#[derive(Debug)]
pub struct PacketThreads(Vec<JoinHandle<()>>);

impl PacketThreads {
    /// How many threads move packets (the conntrack sweeper not counted).
    pub fn len(&self) -> usize {
        self.0.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for every one to stop (after [`Forwarder::stop`]).
    pub fn join(self) {
        for t in self.0 {
            let _ = t.join();
        }
    }
}

/// How long an idle packet thread waits before looking again on its own
/// (it is woken by its ports and its doorbell; this is a safety net).
const IDLE_WAIT_MS: i32 = 1000;

/// How often the load of the packet threads is weighed (see
/// [`Forwarder::rebalance`]).
pub const REBALANCE_INTERVAL: Duration = Duration::from_secs(1);

/// The epoll token of a lane's doorbell.
const DOORBELL: u64 = u64::MAX;

/// The data plane: spawns packet threads over what is published.
#[derive(Debug)]
pub struct Forwarder {
    published: Arc<Published>,
    events: OnceLock<EventSink>,
    /// Frames a flow sent to the control plane (`controller`): DNS answers.
    punts: OnceLock<PuntSink>,
    stop: AtomicBool,
    /// Wakes the sweeper on stop.
    stopping: Stopping,
    /// Bumped when the balancer moves endpoints: lanes register again.
    placement: AtomicU64,
    /// Endpoints the balancer moved, in all.
    moves: AtomicU64,
}

/// A sleep that [`Stopping::notify`] cuts short.
#[derive(Debug, Default)]
struct Stopping {
    stopped: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Stopping {
    fn wait(&self, pause: Duration) {
        let g = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        if !*g {
            let _ = self.cv.wait_timeout(g, pause);
        }
    }

    fn notify(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

#[derive(Debug)]
struct PuntSink {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    lost: AtomicU64,
}

impl Forwarder {
    pub fn new(published: Arc<Published>) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            published,
            events: OnceLock::new(),
            punts: OnceLock::new(),
            stop: AtomicBool::new(false),
            stopping: Stopping::default(),
            placement: AtomicU64::new(0),
            moves: AtomicU64::new(0),
        })
    }

    /// Endpoints moved between packet threads by load, since the start.
    pub fn moves(&self) -> u64 {
        self.moves.load(Relaxed)
    }

    /// Spreads the published endpoints over the lanes by the work they did
    /// since `last` (work per endpoint at the previous call, updated): when
    /// one lane carries clearly more than its share, endpoints are placed
    /// anew (see `balance::plan`) and every lane registers again. Returns
    /// how many endpoints moved.
    pub fn rebalance(&self, last: &mut HashMap<usize, u64>) -> usize {
        let lanes = self.published.lanes.load(Relaxed);
        let ports = self.published.ports.load();
        let key = |e: &Endpoint| Arc::as_ptr(&e.state) as usize;
        let loads: Vec<crate::balance::Load> = ports
            .endpoints
            .iter()
            .map(|e| {
                let work = e.state.work();
                let before = last.insert(key(e), work).unwrap_or(work);
                crate::balance::Load {
                    lane: e.lane(lanes),
                    work: work.saturating_sub(before),
                }
            })
            .collect();
        last.retain(|k, _| ports.endpoints.iter().any(|e| key(e) == *k));
        let Some(placed) = crate::balance::plan(&loads, lanes) else {
            return 0;
        };
        let mut moved = 0;
        for (e, lane) in ports.endpoints.iter().zip(placed) {
            if e.lane(lanes) != lane {
                moved += 1;
            }
            e.state.place(lane);
        }
        if moved > 0 {
            self.moves.fetch_add(moved as u64, Relaxed);
            self.placement.fetch_add(1, Relaxed);
            self.published.ring();
            tracing::debug!(moved, lanes, "packet threads rebalanced by load");
        }
        moved
    }

    /// Sends copies of the frames flows send to the control plane to the
    /// returned receiver (at most `capacity` waiting; beyond, they are
    /// counted lost and the frame is still forwarded). Once only.
    pub fn punted_frames(&self, capacity: usize) -> Option<std::sync::mpsc::Receiver<Vec<u8>>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        self.punts
            .set(PuntSink {
                tx,
                lost: AtomicU64::new(0),
            })
            .ok()
            .map(|()| rx)
    }

    /// Punted frames dropped because their consumer fell behind.
    pub fn punts_lost(&self) -> u64 {
        self.punts.get().map_or(0, |p| p.lost.load(Relaxed))
    }

    fn punt(&self, frame: &[u8]) {
        if let Some(sink) = self.punts.get()
            && sink.tx.try_send(frame.to_vec()).is_err()
        {
            sink.lost.fetch_add(1, Relaxed);
        }
    }

    /// Sends connection events to the returned receiver from now on (at most
    /// `capacity` waiting). Call before starting packet threads; once only.
    pub fn connection_events(
        &self,
        capacity: usize,
    ) -> Option<std::sync::mpsc::Receiver<ConnEvent>> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        self.events
            .set(EventSink {
                tx,
                lost: AtomicU64::new(0),
            })
            .ok()
            .map(|()| rx)
    }

    /// Connection events dropped because their consumer fell behind.
    pub fn events_lost(&self) -> u64 {
        self.events.get().map_or(0, |e| e.lost.load(Relaxed))
    }

    /// A lane: one packet thread's state (its datapath worker and buffer),
    /// serving every port.
    pub fn lane(self: &Arc<Self>) -> Lane {
        self.lane_of(0, 1)
    }

    /// Lane `index` of `lanes`: it serves the ports [`Lane::serves`] says.
    fn lane_of(self: &Arc<Self>, index: usize, lanes: usize) -> Lane {
        Lane {
            fwd: self.clone(),
            worker: self.published.dp.worker(),
            buf: vec![0u8; BUFFER].into_boxed_slice(),
            index,
            lanes: lanes.max(1),
            partners: SmallVec::new(),
        }
    }

    /// Starts `threads` packet threads (`name`, `name-1`, ...), the ports
    /// spread over them, and the conntrack sweeper. After forwarding, a packet
    /// thread keeps polling its ports without sleeping for a while (see
    /// [`Polling`]: lower latency for CPU that was idle anyway); idle, it
    /// sleeps until a port or its doorbell wakes it. Packet threads run at
    /// nice value `nice` (see [`set_nice`]); the sweeper keeps the process's.
    ///
    /// Fails when a thread cannot be started (those started are stopped).
    pub fn spawn(
        self: &Arc<Self>,
        name: &str,
        threads: usize,
        busy_poll: Polling,
        nice: i32,
    ) -> std::io::Result<PacketThreads> {
        let threads = threads.max(1);
        self.published.lanes.store(threads, Relaxed);
        let mut started = Vec::with_capacity(threads + 1);
        let result = (|| {
            for i in 0..threads {
                let doorbell = Arc::new(sys::Doorbell::new()?);
                self.published
                    .doorbells
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(doorbell.clone());
                let mut lane = self.lane_of(i, threads);
                let thread = if i == 0 {
                    name.to_string()
                } else {
                    format!("{name}-{i}")
                };
                started.push(std::thread::Builder::new().name(thread).spawn(move || {
                    set_nice(nice);
                    lane.run(busy_poll, &doorbell)
                })?);
            }
            let fwd = self.clone();
            started.push(
                std::thread::Builder::new()
                    .name("conntrack".into())
                    .spawn(move || fwd.sweep_until_stopped())?,
            );
            Ok(())
        })();
        match result {
            Ok(()) => Ok(PacketThreads(started)),
            Err(e) => {
                self.stop();
                PacketThreads(started).join();
                Err(e)
            }
        }
    }

    /// Reclaims expired connections every `SWEEP_INTERVAL` (every second
    /// while none are tracked), off the packet threads; rebalances the
    /// packet threads every [`REBALANCE_INTERVAL`].
    fn sweep_until_stopped(&self) {
        let ct = &self.published.dp.conntrack;
        let mut balanced = Instant::now();
        let mut work = HashMap::new();
        while !self.stop.load(Relaxed) {
            if self.published.lanes.load(Relaxed) > 1 && balanced.elapsed() >= REBALANCE_INTERVAL {
                balanced = Instant::now();
                self.rebalance(&mut work);
            }
            let pause = if ct.is_empty() {
                Duration::from_secs(1)
            } else {
                datapath::conntrack::SWEEP_INTERVAL
            };
            self.stopping.wait(pause);
            ct.sweep(
                self.published.clock.now(),
                datapath::conntrack::SWEEP_BUDGET,
            );
        }
    }

    /// Asks packet threads to stop: they are woken and notice at once.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        self.stopping.notify();
        self.published.ring();
    }

    fn emit(&self, key: &FlowKey, allowed: bool) {
        if let Some(sink) = self.events.get() {
            let event = ConnEvent {
                key: *key,
                allowed,
                at: SystemTime::now(),
            };
            if sink.tx.try_send(event).is_err() {
                sink.lost.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Gives the calling packet thread nice value `nice`. Below the pods' own
/// (0), a pod woken by the frame just written to it waits for the thread to
/// finish its burst instead of preempting it at every frame (two task
/// switches per frame on a small node). Without the privilege to lower it,
/// the thread keeps the process's value.
fn set_nice(nice: i32) {
    if let Err(e) = sys::set_thread_nice(nice) {
        tracing::warn!("packet thread: cannot set nice value {nice} ({e}); keeping the process's");
    }
}

/// Writes `tx` to every port of `outputs`, counting what each port did with it.
fn send_all(ports: &PortSet, outputs: &[PortNo], tx: &mut Tx<'_>) {
    let len = tx.end - tx.start;
    for &out in outputs {
        let Some((endpoint, to)) = ports.get(out) else {
            continue;
        };
        match endpoint.io.send(out, tx) {
            Ok(Sent::Ok) => to.sent(len),
            Ok(Sent::Full) => to.port_drop(PortDrop::TxFull),
            Ok(Sent::OffloadMismatch) => to.port_drop(PortDrop::OffloadMismatch),
            Ok(Sent::NoRoute) | Err(_) => to.port_drop(PortDrop::TxError),
        }
    }
}

/// Writes `frame` (not the one received: a reject's answer, a fragment of a
/// reassembled datagram) to every port of `outputs`, through `buf` at the
/// headroom, with a blank offload header. Too long for the buffer: dropped.
fn send_copy(buf: &mut [u8], frame: &[u8], ports: &PortSet, outputs: &[PortNo]) {
    let end = HEADROOM + frame.len();
    if end > buf.len() {
        return;
    }
    buf[HEADROOM..end].copy_from_slice(frame);
    let mut tx = Tx {
        buf,
        start: HEADROOM,
        end,
        offloaded: false,
        header_intact: false,
    };
    send_all(ports, outputs, &mut tx);
}

/// One packet thread: a datapath worker and a frame buffer.
#[derive(Debug)]
pub struct Lane {
    fwd: Arc<Forwarder>,
    worker: Worker,
    /// Every frame sits at `buf[start..end]` with headroom in front (see
    /// `port`); a virtio-net header, when the frame came with one, sits right
    /// before it.
    buf: Box<[u8]>,
    /// This lane's number among `lanes`: which ports it serves.
    index: usize,
    lanes: usize,
    /// Ports of other lanes written to lately (see `note_partners`).
    partners: SmallVec<[PortNo; 4]>,
}

impl Lane {
    /// Reads up to [`BATCH`] frames from every published port that is up and
    /// forwards them; returns how many frames were read. (What the packet
    /// thread does on a wake-up, for every port rather than the ready ones.)
    pub fn step(&mut self) -> usize {
        let ports = self.fwd.published.ports.load_full();
        self.worker.begin_batch();
        let now = self.fwd.published.clock.now();
        let mine: Vec<usize> = (0..ports.endpoints.len())
            .filter(|&i| self.serves(&ports.endpoints[i]))
            .collect();
        mine.into_iter()
            .map(|i| self.service(&ports, i, &ports, now))
            .sum()
    }

    /// Reads up to [`BATCH`] frames from endpoint `i` of `ports` and forwards
    /// them to the ports of `out` (the newest set: it covers every port the
    /// flows the worker runs can name).
    fn service(&mut self, ports: &PortSet, i: usize, out: &PortSet, now: Time) -> usize {
        let endpoint = &ports.endpoints[i];
        if endpoint.own.as_ref().is_some_and(|(_, c)| !c.is_up()) || !endpoint.state.claim() {
            return 0;
        }
        let (n, bytes) = self.drain(ports, i, out, now);
        endpoint.state.release();
        endpoint.state.add_work(n, bytes);
        n
    }

    /// [`Lane::service`] once the endpoint is claimed: frames and bytes read.
    fn drain(&mut self, ports: &PortSet, i: usize, out: &PortSet, now: Time) -> (usize, usize) {
        let endpoint = &ports.endpoints[i];
        let own = endpoint.own.as_ref();
        let (mut n, mut bytes) = (0, 0);
        while n < BATCH {
            match endpoint.io.recv(&mut self.buf) {
                Ok(Some(rx)) => {
                    n += 1;
                    bytes += rx.end - rx.start;
                    let (in_port, counters) = match (rx.in_port, own) {
                        (None, Some((p, c))) => (*p, &**c),
                        (Some(p), _) => match ports.get(p) {
                            Some((_, c)) => (p, c),
                            None => continue,
                        },
                        (None, None) => continue,
                    };
                    counters.received(rx.end - rx.start);
                    self.forward(out, now, in_port, counters, rx);
                }
                Ok(None) => break,
                Err(e) => {
                    if let Some((_, c)) = own {
                        c.port_drop(PortDrop::RxError);
                        // A device that is gone (EBADFD, EIO: a pod deleted its
                        // interface) stays readable forever: stop polling it.
                        if matches!(e.raw_os_error(), Some(libc::EBADFD | libc::EIO)) {
                            c.set_down();
                        }
                    }
                    break;
                }
            }
        }
        (n, bytes)
    }

    /// Runs one received frame through the pipeline and writes it out.
    fn forward(
        &mut self,
        ports: &PortSet,
        now: Time,
        in_port: PortNo,
        counters: &PortCounters,
        rx: crate::port::Rx,
    ) {
        let crate::port::Rx {
            start, end, hdr, ..
        } = rx;
        // Whether the frame needs the header it came with (a TSO segment, or a
        // checksum left to the receiver).
        let offloaded = hdr > 0 && (self.buf[start - hdr] != 0 || self.buf[start - hdr + 1] != 0);
        // VIRTIO_NET_HDR_F_NEEDS_CSUM: the transport checksum holds only the
        // pseudo-header sum (translation must keep that one right).
        let partial = hdr > 0 && self.buf[start - hdr] & 1 != 0;
        // Tables published while this batch ran apply to this frame already.
        self.worker.refresh();
        let verdict =
            self.worker
                .process_offloaded(now, in_port, &mut self.buf[start..end], partial);
        if let Some(reason) = verdict.drop {
            counters.pipeline_drop(reason);
            if verdict.policy {
                self.fwd.emit(verdict.key, false);
            }
            return;
        }
        if verdict.committed {
            self.fwd.emit(verdict.key, true);
        }
        if verdict.held {
            return;
        }
        let punt = verdict.punt;
        let outputs: SmallVec<[PortNo; 4]> = verdict.outputs.iter().copied().collect();
        if punt {
            self.fwd.punt(&self.buf[start..end]);
        }
        if !verdict.reply.is_empty() {
            // `reject` answered it: the answer goes back instead.
            send_copy(&mut self.buf, verdict.reply, ports, &outputs);
            return;
        }
        if !verdict.fragments.is_empty() {
            // A reassembled datagram was decided: its fragments go out, each
            // on its own (they need no offload header, and get a blank one).
            for fragment in verdict.fragments {
                send_copy(&mut self.buf, fragment, ports, &outputs);
            }
            return;
        }
        let mut tx = Tx {
            buf: &mut self.buf,
            start,
            end,
            offloaded,
            header_intact: hdr > 0,
        };
        send_all(ports, &outputs, &mut tx);
        self.note_partners(ports, &outputs);
    }

    /// Remembers ports of other lanes this lane just wrote to: while it spins
    /// it reads them too, so an answer written back at once is forwarded
    /// without waking their lane (a round trip costs no wake-up). A port
    /// with a queue another lane serves is a partner: the answer may come
    /// on any of its queues.
    fn note_partners(&mut self, ports: &PortSet, outputs: &[PortNo]) {
        if self.lanes == 1 {
            return;
        }
        for out in outputs {
            // Only a pod's or the gateway's own port: the tunnel's socket
            // carries many ports and is read by its lane alone.
            if !self.partners.contains(out)
                && ports
                    .queues(*out)
                    .any(|i| !self.serves(&ports.endpoints[i]))
            {
                if self.partners.len() == self.partners.inline_size() {
                    self.partners.remove(0);
                }
                self.partners.push(*out);
            }
        }
    }

    /// Reads the partner ports (when no other thread is reading them);
    /// returns how many frames were read.
    fn serve_partners(&mut self, polled: &PortSet) -> usize {
        if self.partners.is_empty() {
            return 0;
        }
        let out = self.fwd.published.ports.load();
        self.worker.begin_batch();
        let now = self.fwd.published.clock.now();
        let partners = self.partners.clone();
        let mut read = 0;
        for p in partners {
            for i in polled.queues(p) {
                if !self.serves(&polled.endpoints[i]) {
                    read += self.service(polled, i, &out, now);
                }
            }
        }
        read
    }

    /// Whether this lane serves endpoint `e` of a port set (see
    /// [`Endpoint::lane`]): stable while other ports come and go, moved only
    /// by the balancer; a claim keeps two lanes from reading it at once.
    pub fn serves(&self, e: &Endpoint) -> bool {
        e.lane(self.lanes) == self.index
    }

    /// The packet thread: waits on its ports and its doorbell, services the
    /// ready ones, until the forwarder stops.
    fn run(&mut self, polling: Polling, doorbell: &sys::Doorbell) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut ready = Vec::new();
        let mut polled: Option<(Arc<PortSet>, sys::Epoll, u64)> = None;
        let clock = self.fwd.published.clock;
        let mut last_work = Instant::now();
        // The smoothed gap between bursts of work.
        let mut gap = Duration::from_secs(1);
        let mut window = polling.window(gap);
        while !self.fwd.stop.load(Relaxed) {
            // (Re)register the ports when the set changed.
            // (Re)register the ports when the set changed, or the balancer
            // moved endpoints between lanes.
            let current = self.fwd.published.ports.load_full();
            let placement = self.fwd.placement.load(Relaxed);
            if polled
                .as_ref()
                .is_none_or(|(p, _, g)| !Arc::ptr_eq(p, &current) || *g != placement)
            {
                let Ok(epoll) = sys::Epoll::new() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = epoll.add(doorbell.fd(), DOORBELL);
                for (i, e) in current.endpoints.iter().enumerate() {
                    // A port that is down is not polled: its dead fd would be
                    // ready (an error) on every wait.
                    let up = e.own.as_ref().is_none_or(|(_, c)| c.is_up());
                    if let (Some(fd), true, true) = (e.io.fd(), up, self.serves(e)) {
                        let _ = epoll.add(fd, i as u64);
                    }
                }
                polled = Some((current, epoll, placement));
            }
            let Some((ports, epoll, _)) = &polled else {
                continue;
            };
            // Right after traffic, spin briefly instead of sleeping: the answer to
            // what was just forwarded usually comes within microseconds, and a
            // sleeping thread takes tens of them to wake.
            let spinning = last_work.elapsed() < window;
            let timeout = if spinning { 0 } else { IDLE_WAIT_MS };
            if epoll.wait(&mut events, &mut ready, timeout).is_err() || ready.is_empty() {
                if spinning {
                    if self.serve_partners(ports) > 0 {
                        last_work = Instant::now();
                        continue;
                    }
                    // Give the CPU to anything else runnable (the pods' own
                    // threads, on a small node): spinning costs only idle time.
                    std::thread::yield_now();
                } else {
                    self.partners.clear();
                }
                continue;
            }
            if ready.contains(&DOORBELL) {
                // The ports changed (or the switch stops): look again.
                doorbell.clear();
                continue;
            }
            // Ports and flows may have changed while we waited: take both
            // fresh (ports are published before flows, so these ports cover
            // the flows).
            let (polled_ports, out) = (&**ports, self.fwd.published.ports.load());
            self.worker.begin_batch();
            let now = clock.now();
            let mut went_down = false;
            for &token in &ready {
                let i = token as usize;
                if i < polled_ports.endpoints.len() {
                    self.service(polled_ports, i, &out, now);
                    went_down |= polled_ports.endpoints[i]
                        .own
                        .as_ref()
                        .is_some_and(|(_, c)| !c.is_up());
                }
            }
            if went_down {
                // Register the ports again, without the dead one.
                polled = None;
            }
            let worked = Instant::now();
            // The gap between bursts: an answer right behind its request
            // (within the shortest poll) is the same burst.
            let since = worked.duration_since(last_work).min(Duration::from_secs(1));
            if since > polling.min {
                gap = (gap * 3 + since) / 4;
            }
            window = polling.window(gap);
            last_work = worked;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::MemoryPort;
    use crate::realiser::Realiser;
    use datapath::DatapathConfig;
    use etherparse::PacketBuilder;
    use policy::compile::Change;
    use policy::model::{ObjectKey, Pod, Policy};

    const A_MAC: [u8; 6] = [0x0a, 0x58, 10, 0, 0, 1];
    const B_MAC: [u8; 6] = [0x0a, 0x58, 10, 0, 0, 2];

    /// Two pods on in-memory ports: a (10.0.0.1) and b (10.0.0.2, app=db).
    fn two_pods(
        vnet_b: bool,
    ) -> (
        Arc<Realiser>,
        Arc<Forwarder>,
        Arc<MemoryPort>,
        Arc<MemoryPort>,
    ) {
        let r = Realiser::new(DatapathConfig::default());
        let a = one_queue_pod(&r, "a", A_MAC, "10.0.0.1", false);
        let b = one_queue_pod(&r, "b", B_MAC, "10.0.0.2", vnet_b);
        r.apply(Change::Pod(Pod {
            key: ObjectKey::new("t", "b"),
            labels: [("app".to_string(), "db".to_string())].into(),
            ips: vec![],
            node: None,
            ports: vec![],
        }))
        .unwrap();
        let f = Forwarder::new(r.published().clone());
        (r, f, a, b)
    }

    /// A default deny of t/b's (app=db) ingress.
    fn deny_ingress_to_db(r: &Realiser) {
        let np = serde_json::json!({
            "metadata": {"name": "db", "namespace": "t"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]},
        });
        let np: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_json::from_value(np).unwrap();
        r.apply(Change::Policy(Policy::from_api(&np).unwrap()))
            .unwrap();
    }

    fn syn(port: u16) -> Vec<u8> {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(A_MAC, B_MAC)
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, port, 1, 1000)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        f
    }

    fn counters(r: &Realiser, pod: &str) -> Arc<PortCounters> {
        r.ports()
            .into_iter()
            .find(|p| matches!(&p.role, crate::realiser::PortRole::Pod(k) if k.to_string() == pod))
            .unwrap()
            .counters
    }

    #[test]
    fn frames_cross_with_counters_and_connection_events() {
        let (r, f, a, b) = two_pods(false);
        let events = f.connection_events(16).unwrap();
        let mut lane = f.lane();
        // ARP for b is answered to a by the switch; nothing reaches b.
        let mut arp = Vec::new();
        PacketBuilder::ethernet2(A_MAC, [0xff; 6])
            .arp(
                etherparse::ArpPacket::new(
                    etherparse::ArpHardwareId::ETHERNET,
                    etherparse::EtherType::IPV4,
                    etherparse::ArpOperation::REQUEST,
                    &A_MAC,
                    &[10, 0, 0, 1],
                    &[0; 6],
                    &[10, 0, 0, 2],
                )
                .unwrap(),
            )
            .write(&mut arp)
            .unwrap();
        a.push(arp);
        assert_eq!(lane.step(), 1);
        let replies = a.take();
        assert_eq!(replies.len(), 1, "the switch answers ARP");
        assert_eq!(&replies[0][6..12], &B_MAC, "from b's MAC");
        assert!(b.take().is_empty(), "no broadcast reaches b");
        // A new TCP connection reaches b, counted, and is reported allowed.
        let frame = syn(80);
        a.push(frame.clone());
        lane.step();
        assert_eq!(b.take(), vec![frame.clone()]);
        let (ca, cb) = (counters(&r, "t/a"), counters(&r, "t/b"));
        assert_eq!(ca.rx_packets.load(Relaxed), 2);
        assert_eq!(cb.tx_packets.load(Relaxed), 1);
        assert_eq!(cb.tx_bytes.load(Relaxed), frame.len() as u64);
        let e = events.try_recv().expect("a connection event");
        assert!(e.allowed);
        assert_eq!((e.key.tp_dst, e.key.in_port), (80, PortNo(1)));
    }

    #[test]
    fn a_policy_drop_is_counted_on_the_input_port_and_reported_denied() {
        let (r, f, a, b) = two_pods(false);
        deny_ingress_to_db(&r);
        let events = f.connection_events(16).unwrap();
        let mut lane = f.lane();
        a.push(syn(80));
        lane.step();
        assert!(b.take().is_empty(), "denied by default deny of t/b");
        assert_eq!(counters(&r, "t/a").drop_count("flow"), 1);
        let e = events.try_recv().expect("a policy drop is an event");
        assert!(!e.allowed);
        // Spoofguard drops are not policy decisions: no event.
        let mut spoofed = syn(80);
        spoofed[26..30].copy_from_slice(&[10, 0, 0, 9]);
        a.push(spoofed);
        lane.step();
        assert_eq!(counters(&r, "t/a").drop_count("flow"), 2);
        assert!(events.try_recv().is_err(), "not a policy verdict");
    }

    #[test]
    fn lanes_split_the_ports_and_forward_across_them() {
        let (_, f, a, b) = two_pods(false);
        let (mut first, mut second) = (f.lane_of(0, 2), f.lane_of(1, 2));
        let ports = f.published.ports.load_full();
        let serving = |lane: &Lane| {
            (0..ports.endpoints.len())
                .filter(|&i| lane.serves(&ports.endpoints[i]))
                .count()
        };
        assert_eq!(serving(&first) + serving(&second), ports.endpoints.len());
        assert!(
            serving(&first) > 0 && serving(&second) > 0,
            "both lanes serve"
        );
        // a's frame is read by whichever lane serves a, and written to b.
        a.push(syn(80));
        let read = first.step() + second.step();
        assert_eq!(read, 1, "exactly one lane reads it");
        assert_eq!(b.take().len(), 1);
    }

    /// Pod t/`name` on one in-memory port (with the virtio-net header when
    /// `vnet`).
    fn one_queue_pod(
        r: &Realiser,
        name: &str,
        mac: [u8; 6],
        ip: &str,
        vnet: bool,
    ) -> Arc<MemoryPort> {
        let port = Arc::new(MemoryPort::new(vnet));
        r.attach(
            port.clone(),
            ObjectKey::new("t", name),
            mac,
            vec![ip.parse().unwrap()],
        )
        .unwrap();
        port
    }

    /// Pod t/`name` on a two-queue in-memory port: its switch port and queues.
    fn two_queue_pod(
        r: &Realiser,
        name: &str,
        mac: [u8; 6],
        ip: &str,
    ) -> (PortNo, Vec<Arc<MemoryPort>>) {
        let queues: Vec<Arc<MemoryPort>> =
            (0..2).map(|_| Arc::new(MemoryPort::new(false))).collect();
        let port = r
            .attach_queues(
                queues
                    .iter()
                    .map(|q| q.clone() as Arc<dyn crate::port::Port>)
                    .collect(),
                ObjectKey::new("t", name),
                mac,
                vec![ip.parse().unwrap()],
            )
            .unwrap();
        (port, queues)
    }

    /// The nice values of this process's threads named `name`.
    fn nice_of_threads(name: &str) -> Vec<i32> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            // Fields after the name: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 1..];
            found.push(rest.split_whitespace().nth(16).unwrap().parse().unwrap());
        }
        found
    }

    /// Packet threads run at the configured nice value (below the pods' own
    /// when privileged, as vswitchd is); the sweeper keeps the process's.
    #[test]
    fn packet_threads_run_at_their_nice_value() {
        use std::os::unix::fs::MetadataExt;
        let privileged = std::fs::metadata("/proc/self").unwrap().uid() == 0;
        let nice = if privileged { -5 } else { 7 };
        let (_, f, _, _) = two_pods(false);
        let threads = f.spawn("nicelane", 2, Polling::default(), nice).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        // A thread names itself (and sets its nice value) once it runs.
        let look = || {
            let lanes = (nice_of_threads("nicelane"), nice_of_threads("nicelane-1"));
            (lanes, nice_of_threads("conntrack"))
        };
        let (mut seen, mut sweeper) = look();
        while (seen != (vec![nice], vec![nice]) || sweeper.is_empty()) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
            (seen, sweeper) = look();
        }
        f.stop();
        threads.join();
        assert_eq!(seen, (vec![nice], vec![nice]), "both packet threads");
        assert!(
            !sweeper.is_empty() && !sweeper.contains(&nice),
            "the sweeper: {sweeper:?}"
        );
    }

    /// The answer to a request may come on any queue of a multiqueue pod:
    /// the lane that forwarded the request reads every queue of the answering
    /// port another lane serves, not only its first.
    #[test]
    fn a_lane_reads_the_answer_on_any_queue_of_its_partner() {
        let r = Realiser::new(DatapathConfig::default());
        let a = one_queue_pod(&r, "a", A_MAC, "10.0.0.1", false);
        let (b, queues) = two_queue_pod(&r, "b", B_MAC, "10.0.0.2");
        let f = Forwarder::new(r.published().clone());
        f.published.lanes.store(2, Relaxed);
        let ports = f.published.ports.load_full();
        // a and b's first queue on lane 0, b's second on lane 1.
        for e in &ports.endpoints {
            let lane = match e.own.as_ref() {
                Some((p, _)) if *p == b => e.queue,
                _ => 0,
            };
            e.state.place(lane);
        }
        let (mut first, mut second) = (f.lane_of(0, 2), f.lane_of(1, 2));
        a.push(syn(80));
        assert_eq!(first.step(), 1, "lane 0 forwards a's request");
        assert_eq!(queues[0].take().len() + queues[1].take().len(), 1);
        // The answer comes on b's second queue, which lane 1 serves.
        let mut answer = Vec::new();
        PacketBuilder::ethernet2(B_MAC, A_MAC)
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(80, 40000, 1, 1000)
            .syn()
            .ack(2)
            .write(&mut answer, &[])
            .unwrap();
        queues[1].push(answer);
        assert_eq!(first.serve_partners(&ports), 1, "lane 0 reads it itself");
        assert_eq!(a.take().len(), 1, "and a has it");
        assert_eq!(second.step(), 0, "nothing left for lane 1");
    }

    /// A pod with two queues (a multiqueue TAP device): by default its queues
    /// go to different lanes, frames of either are forwarded and counted on
    /// the pod's port; when both queues are busy on one lane, the balancer
    /// moves one to the other lane, and an idle switch is left alone.
    #[test]
    fn the_queues_of_a_pod_are_read_by_several_lanes_and_rebalanced_by_load() {
        let r = Realiser::new(DatapathConfig::default());
        let (a, queues) = two_queue_pod(&r, "a", A_MAC, "10.0.0.1");
        let b = one_queue_pod(&r, "b", B_MAC, "10.0.0.2", false);
        let f = Forwarder::new(r.published().clone());
        f.published.lanes.store(2, Relaxed);
        let mut lanes = [f.lane_of(0, 2), f.lane_of(1, 2)];
        let ports = f.published.ports.load_full();
        let of_a: Vec<&Endpoint> = ports
            .endpoints
            .iter()
            .filter(|e| e.own.as_ref().is_some_and(|(p, _)| *p == a))
            .collect();
        assert_eq!(of_a.len(), 2);
        assert_ne!(
            of_a[0].lane(2),
            of_a[1].lane(2),
            "queues start on different lanes"
        );
        let run = |lanes: &mut [Lane; 2]| {
            while lanes.iter_mut().map(Lane::step).sum::<usize>() > 0 {}
            b.take().len()
        };
        queues[1].push(syn(80));
        assert_eq!(run(&mut lanes), 1, "a frame of the second queue crosses");
        let port_a = r.port_of(&ObjectKey::new("t", "a")).unwrap();
        assert_eq!(port_a.counters.rx_packets.load(Relaxed), 1);
        assert_eq!(port_a.queues.len(), 2);

        // Both queues on lane 0, both busy.
        for e in &of_a {
            e.state.place(0);
        }
        let mut last = HashMap::new();
        assert_eq!(f.rebalance(&mut last), 0, "nothing measured yet");
        let placement = f.placement.load(Relaxed);
        for q in &queues {
            for i in 0..3_000 {
                q.push(syn(1000 + i));
            }
        }
        assert_eq!(run(&mut lanes), 6_000);
        assert_eq!(f.rebalance(&mut last), 1, "one queue moves");
        assert_ne!(of_a[0].lane(2), of_a[1].lane(2));
        assert_eq!(f.moves(), 1);
        assert!(
            f.placement.load(Relaxed) > placement,
            "lanes register again"
        );
        // Read after the move, every frame still crosses once.
        for q in &queues {
            q.push(syn(80));
        }
        assert_eq!(run(&mut lanes), 2);
        // No traffic since: nothing moves.
        assert_eq!(f.rebalance(&mut last), 0);
    }

    /// A policy published while a lane is in the middle of a batch applies
    /// to the frames it reads after the publish (no window in which a new
    /// connection slips through under the old tables).
    #[test]
    fn a_frame_read_after_a_publish_is_processed_under_it() {
        let (r, f, a, b) = two_pods(false);
        let mut lane = f.lane();
        let ports = f.published.ports.load_full();
        lane.worker.begin_batch(); // the batch begins under the old tables
        deny_ingress_to_db(&r);
        a.push(syn(80));
        let now = f.published.clock.now();
        let read: usize = (0..ports.endpoints.len())
            .map(|i| lane.service(&ports, i, &ports, now))
            .sum();
        assert_eq!(read, 1);
        assert!(
            b.take().is_empty(),
            "denied by the policy published mid-batch"
        );
    }

    /// A policy change on this node that cannot touch a cached translation
    /// (another rule for the same pods, on another port) keeps it: the next
    /// connection's packets are revalidated hits, not misses.
    #[test]
    fn a_rule_for_another_port_keeps_cached_translations() {
        let (r, f, a, b) = two_pods(false);
        let allow = |name: &str, port: u16| {
            let np = serde_json::json!({
                "metadata": {"name": name, "namespace": "t"},
                "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                         "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": port}]}]},
            });
            let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                serde_json::from_value(np).unwrap();
            r.apply(Change::Policy(Policy::from_api(&np).unwrap()))
                .unwrap();
        };
        let syn_from = |sport: u16| {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(A_MAC, B_MAC)
                .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
                .tcp(sport, 80, 1, 1000)
                .syn()
                .write(&mut f, &[])
                .unwrap();
            f
        };
        allow("web", 80);
        let mut lane = f.lane();
        a.push(syn_from(40000));
        lane.step();
        assert_eq!(b.take().len(), 1);
        let before = lane.worker.cache_stats();
        allow("other", 9000);
        a.push(syn_from(40001));
        lane.step();
        assert_eq!(b.take().len(), 1, "still allowed");
        let after = lane.worker.cache_stats();
        assert_eq!(after.misses, before.misses, "no translation ran again");
        assert!(after.revalidated > before.revalidated, "{after:?}");
        // The same policy rewritten with another port, again and again (a
        // churning manifest): still no miss.
        for (i, port) in [9001u16, 9002, 9003].into_iter().enumerate() {
            allow("other", port);
            a.push(syn_from(40010 + i as u16));
            lane.step();
            assert_eq!(b.take().len(), 1);
            let now = lane.worker.cache_stats();
            assert_eq!(now.misses, before.misses, "rewrite {port}: {now:?}");
        }
        // A deny of port 80 (the rule allowing it gone) reaches the cache.
        r.apply(Change::PolicyDeleted(ObjectKey::new("t", "web")))
            .unwrap();
        a.push(syn_from(40002));
        lane.step();
        assert!(b.take().is_empty(), "denied once its rule is gone");
    }

    #[test]
    fn virtio_net_headers_are_added_for_ports_that_want_them() {
        let (_, f, a, b) = two_pods(true);
        let mut lane = f.lane();
        let frame = syn(80);
        a.push(frame.clone());
        lane.step();
        let out = b.take();
        assert_eq!(out.len(), 1);
        assert_eq!(
            &out[0][..crate::sys::VNET_HDR_LEN],
            &[0; crate::sys::VNET_HDR_LEN]
        );
        assert_eq!(&out[0][crate::sys::VNET_HDR_LEN..], &frame[..]);
    }

    #[test]
    fn a_segmentation_offload_frame_cannot_go_to_a_port_without_offloads() {
        let (r, f, a, b) = two_pods(true);
        let mut lane = f.lane();
        // b (with headers) sends a TSO segment to a (without).
        let mut frame = vec![0u8; crate::sys::VNET_HDR_LEN];
        frame[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        frame[1] = 1; // GSO TCPv4
        let mut tcp = Vec::new();
        PacketBuilder::ethernet2(B_MAC, A_MAC)
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .udp(5000, 53)
            .write(&mut tcp, &[0; 32])
            .unwrap();
        frame.extend(tcp);
        b.push(frame);
        lane.step();
        assert!(a.take().is_empty());
        assert_eq!(counters(&r, "t/a").drop_count("offload_mismatch"), 1);
    }
}
