//! The switch: ports, policy and the packet thread, around one datapath.
//!
//! Owns what vswitchd runs: the set of attached TAP ports, the policy compiler
//! with the cluster model, and the pipeline built from both (base tables for the
//! ports + compiled policy), republished atomically after every change. Packet
//! threads poll the ports, run frames through a datapath `Worker` and write them
//! to the ports the verdict names. Until a port is attached and its flows
//! published, its frames are dropped (fail closed).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use arc_swap::ArcSwap;
use datapath::{Datapath, DatapathConfig, FlowEntry, PortNo, Time};
use policy::compile::{Change, Compiler};
use policy::model::{ObjectKey, Pod};
use policy::pipeline::{Gateway, PodPort, Topology, base_flows};

use crate::sys;
use crate::tap::Tap;

/// Frames read from one port before moving to the next.
const BATCH: usize = 64;
/// Largest frame a TAP device hands us (a 64 KiB TSO segment), plus its
/// virtio-net header.
const MAX_FRAME: usize = 65_535 + crate::sys::VNET_HDR_LEN;

/// Switch errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {0} is already attached")]
    AlreadyAttached(ObjectKey),
    #[error("pod {0} is not attached")]
    NotAttached(ObjectKey),
    #[error("failed to install flows")]
    Flows(#[source] datapath::flow::FlowError),
    #[error("failed to start the packet thread")]
    Thread(#[source] std::io::Error),
}

/// The ports packet threads read and write.
#[derive(Debug, Default)]
struct PortSet {
    ports: Vec<(PortNo, Arc<Tap>)>,
    by_no: HashMap<PortNo, usize>,
}

impl PortSet {
    fn new(ports: Vec<(PortNo, Arc<Tap>)>) -> PortSet {
        let by_no = ports
            .iter()
            .enumerate()
            .map(|(i, (p, _))| (*p, i))
            .collect();
        PortSet { ports, by_no }
    }

    fn get(&self, p: PortNo) -> Option<&Tap> {
        self.by_no.get(&p).map(|&i| &*self.ports[i].1)
    }
}

#[derive(Debug)]
struct Control {
    compiler: Compiler,
    topology: Topology,
    taps: Vec<(PortNo, Arc<Tap>)>,
    next_port: u32,
}

/// A running switch.
#[derive(Debug)]
pub struct Switch {
    dp: Arc<Datapath>,
    ports: ArcSwap<PortSet>,
    control: Mutex<Control>,
    stop: AtomicBool,
    epoch: Instant,
}

impl Switch {
    pub fn new(config: DatapathConfig) -> Arc<Switch> {
        Arc::new(Switch {
            dp: Datapath::new(config),
            ports: ArcSwap::from_pointee(PortSet::default()),
            control: Mutex::new(Control {
                compiler: Compiler::new(),
                topology: Topology {
                    zone: 1,
                    ..Topology::default()
                },
                taps: Vec::new(),
                next_port: 1,
            }),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
        })
    }

    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.dp
    }

    /// The switch's clock (monotonic, since start).
    pub fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_nanos() as u64)
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the pipeline from the ports and the policy and publishes it as one
    /// generation; then publishes the port set.
    fn publish(&self, ctl: &Control) -> Result<u64, Error> {
        let flows: Vec<FlowEntry> = base_flows(&ctl.topology)
            .into_iter()
            .chain(ctl.compiler.flows())
            .collect();
        let now = self.now();
        let (_, generation) = self
            .dp
            .update(now, |t| t.apply(flows, |_| true, now))
            .map_err(Error::Flows)?;
        self.ports.store(Arc::new(PortSet::new(ctl.taps.clone())));
        Ok(generation)
    }

    /// Attaches a pod's TAP device with its MAC and addresses; the pod's labels
    /// come from the cluster model (a pod not known yet has none until it is).
    ///
    /// Fails when the pod is already attached or the flows cannot be installed.
    pub fn attach(
        &self,
        tap: Tap,
        pod: ObjectKey,
        mac: [u8; 6],
        ips: Vec<IpAddr>,
    ) -> Result<PortNo, Error> {
        let mut ctl = self.control();
        if ctl.topology.pods.iter().any(|p| p.pod == pod) {
            return Err(Error::AlreadyAttached(pod));
        }
        let port = PortNo(ctl.next_port);
        ctl.next_port += 1;
        ctl.topology.pods.push(PodPort {
            port,
            pod: pod.clone(),
            mac,
            ips: ips.clone(),
        });
        ctl.taps.push((port, Arc::new(tap)));
        let known = ctl.compiler.cluster().pod(&pod).cloned();
        let record = Pod {
            ips,
            ..known.unwrap_or(Pod {
                key: pod,
                labels: Default::default(),
                ips: vec![],
                node: None,
                ports: vec![],
            })
        };
        ctl.compiler.apply(Change::Pod(record));
        self.publish(&ctl)?;
        Ok(port)
    }

    /// Detaches a pod: its port and flows go away; its TAP fd is closed.
    pub fn detach(&self, pod: &ObjectKey) -> Result<(), Error> {
        let mut ctl = self.control();
        let Some(i) = ctl.topology.pods.iter().position(|p| &p.pod == pod) else {
            return Err(Error::NotAttached(pod.clone()));
        };
        let port = ctl.topology.pods.remove(i).port;
        ctl.taps.retain(|(p, _)| *p != port);
        ctl.compiler.apply(Change::PodDeleted(pod.clone()));
        self.publish(&ctl)?;
        Ok(())
    }

    /// Sets the gateway port.
    pub fn set_gateway(&self, tap: Tap, mac: [u8; 6], ips: Vec<IpAddr>) -> Result<PortNo, Error> {
        let mut ctl = self.control();
        let port = PortNo(0xfffe);
        ctl.taps.retain(|(p, _)| *p != port);
        ctl.taps.push((port, Arc::new(tap)));
        ctl.topology.gateway = Some(Gateway { port, mac, ips });
        self.publish(&ctl)?;
        Ok(port)
    }

    /// Applies a cluster change (policy, namespace, pod labels, node) and
    /// republishes. A pod from the cluster keeps the addresses it was attached with.
    pub fn apply(&self, change: Change) -> Result<u64, Error> {
        let mut ctl = self.control();
        let change = match change {
            Change::Pod(mut pod) => {
                if let Some(p) = ctl.topology.pods.iter().find(|p| p.pod == pod.key) {
                    pod.ips = p.ips.clone();
                }
                Change::Pod(pod)
            }
            other => other,
        };
        ctl.compiler.apply(change);
        self.publish(&ctl)
    }

    /// Runs `f` with the compiler (for provenance lookups).
    pub fn with_compiler<T>(&self, f: impl FnOnce(&Compiler) -> T) -> T {
        f(&self.control().compiler)
    }

    /// Traces a new connection from `src` to `dst` against the live tables and
    /// the live conntrack table (read only); returns the trace view
    /// (`policy::explain::trace_view`).
    ///
    /// Fails when an endpoint is unknown or the two share no address family.
    pub fn trace(
        &self,
        src: &policy::offline::Endpoint,
        dst: &policy::offline::Endpoint,
        l4: policy::offline::L4,
    ) -> Result<serde_json::Value, String> {
        let ctl = self.control();
        let key = policy::offline::packet(ctl.compiler.cluster(), &ctl.topology, src, dst, l4)?;
        let snap = self.dp.snapshot();
        let trace = datapath::trace::trace(
            &snap.tables,
            &key,
            datapath::trace::CtSource::Live(&self.dp.conntrack, self.now()),
        );
        let verdict = policy::explain::explain(&ctl.compiler, &trace);
        let traced = policy::offline::Traced {
            key,
            trace,
            verdict,
        };
        Ok(policy::explain::trace_view(
            &ctl.compiler,
            &ctl.topology,
            src,
            dst,
            l4,
            &traced,
            false,
        ))
    }

    /// Starts a packet thread.
    pub fn spawn_packet_thread(self: &Arc<Self>, name: &str) -> Result<JoinHandle<()>, Error> {
        let me = self.clone();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || me.packet_loop())
            .map_err(Error::Thread)
    }

    /// Asks packet threads to stop (they notice within one poll timeout).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
    }

    fn packet_loop(&self) {
        let mut worker = self.dp.worker();
        let mut buf = vec![0u8; MAX_FRAME];
        let mut ready = Vec::new();
        let mut last_sweep = self.now();
        while !self.stop.load(Relaxed) {
            let polled = self.ports.load_full();
            let fds: Vec<_> = polled.ports.iter().map(|(_, t)| t.as_fd()).collect();
            if fds.is_empty() {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            if sys::poll_readable(&fds, &mut ready, 50).is_err() {
                continue;
            }
            // Ports and flows may have changed while we waited: take both fresh
            // (ports are published before flows, so these ports cover the flows).
            let ports = self.ports.load_full();
            worker.begin_batch();
            let now = self.now();
            for (i, (in_port, tap)) in polled.ports.iter().enumerate() {
                if !ready.get(i).copied().unwrap_or(false) {
                    continue;
                }
                for _ in 0..BATCH {
                    let n = match tap.recv(&mut buf) {
                        Ok(Some(n)) => n,
                        Ok(None) | Err(_) => break,
                    };
                    // With offloads the virtio-net header goes through unchanged:
                    // every port of a switch has the same header length.
                    let hdr = tap.header_len().min(n);
                    let verdict = worker.process(now, *in_port, &mut buf[hdr..n]);
                    for out in verdict.outputs {
                        if let Some(t) = ports.get(*out)
                            && t.header_len() == hdr
                        {
                            let _ = t.send(&buf[..n]);
                        }
                    }
                }
            }
            if now.since(last_sweep).as_secs() >= 1 {
                self.dp.conntrack.sweep(now, 4096);
                last_sweep = now;
            }
        }
    }
}
