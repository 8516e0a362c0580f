//! The realiser's ports: attaching and detaching pods' devices (and their
//! queues), the tunnel and the gateway, and the port listings operators see.

use std::net::IpAddr;
use std::sync::Arc;

use datapath::PortNo;
use policy::compile::Change;
use policy::model::{ObjectKey, Pod};
use policy::pipeline::{Gateway, PodPort};

use super::state::Local;
use super::{Error, GATEWAY_PORT, PortInfo, PortRole, QueueInfo, Realiser};
use crate::port::Port;
use crate::tunnel::TunnelIo;

impl Realiser {
    /// Every port: pods (attached and isolated), the gateway, tunnels.
    pub fn ports(&self) -> Vec<PortInfo> {
        let st = self.state();
        let lanes = self
            .published
            .lanes
            .load(std::sync::atomic::Ordering::Relaxed);
        let locals = st.locals.iter().map(|l| {
            let pod = st
                .topology
                .pods
                .iter()
                .chain(&st.unresolved)
                .find(|x| x.port == l.no)
                .map(|x| x.pod.clone());
            let queues = (0..l.queues.len())
                .map(|q| {
                    let e = l.endpoint(q);
                    QueueInfo {
                        lane: e.lane(lanes),
                        work: e.state.work(),
                    }
                })
                .collect();
            PortInfo {
                no: l.no,
                role: pod.map_or(PortRole::Gateway, PortRole::Pod),
                counters: l.counters.clone(),
                queues,
            }
        });
        let tunnels = st.peers.iter().map(|p| PortInfo {
            no: p.no,
            role: PortRole::Tunnel {
                node: p.node.clone(),
                addr: p.addr,
                pod_cidrs: p.pod_cidrs.clone(),
            },
            counters: p.counters.clone(),
            queues: Vec::new(),
        });
        locals.chain(tunnels).collect()
    }

    /// The port of pod `pod`, when it is attached.
    pub fn port_of(&self, pod: &ObjectKey) -> Option<PortInfo> {
        self.ports()
            .into_iter()
            .find(|p| matches!(&p.role, PortRole::Pod(k) if k == pod))
    }

    /// Attaches a pod's port (a TAP device, or any [`Port`]) with its MAC and
    /// addresses; the pod's labels come from the cluster model. A pod not known
    /// yet runs without labels until it is, or, with
    /// [`Realiser::set_isolate_unknown`], gets no flows.
    ///
    /// Fails when the pod is already attached, no port number is free, or the
    /// flows cannot be installed.
    pub fn attach(
        &self,
        io: Arc<dyn Port>,
        pod: ObjectKey,
        mac: [u8; 6],
        ips: Vec<IpAddr>,
    ) -> Result<PortNo, Error> {
        self.attach_queues(vec![io], pod, mac, ips)
    }

    /// [`Realiser::attach`] for a port of several queues (a multiqueue TAP
    /// device): each is read, by whichever packet thread the balancer gives
    /// it; frames to the pod are written to the first.
    ///
    /// Fails as `attach` does, or when `queues` is empty.
    pub fn attach_queues(
        &self,
        queues: Vec<Arc<dyn Port>>,
        pod: ObjectKey,
        mac: [u8; 6],
        ips: Vec<IpAddr>,
    ) -> Result<PortNo, Error> {
        if queues.is_empty() {
            return Err(Error::NoQueues(pod));
        }
        let mut st = self.state();
        if st
            .topology
            .pods
            .iter()
            .chain(&st.unresolved)
            .any(|p| p.pod == pod)
        {
            return Err(Error::AlreadyAttached(pod));
        }
        let port = st.free_port()?;
        // The address may have been someone else's a moment ago: nothing
        // tracked with its last owner may reach this pod.
        self.forget_connections(&ips);
        st.locals.push(Local::new(port, queues));
        let pod_port = PodPort {
            port,
            pod: pod.clone(),
            mac,
            ips: ips.clone(),
        };
        let known = st.compiler.cluster().pod(&pod).cloned();
        if known.is_none() && st.isolate_unknown {
            tracing::warn!(%pod, "attached before its Pod object is known: isolated until it is");
            st.unresolved.push(pod_port);
            self.publish(&mut st)?;
            return Ok(port);
        }
        st.topology.pods.push(pod_port);
        let record = Pod {
            ips,
            node: st.local_node.clone(),
            ..known.unwrap_or(Pod {
                key: pod,
                labels: Default::default(),
                ips: vec![],
                node: None,
                ports: vec![],
            })
        };
        st.compile(Change::Pod(record));
        self.publish(&mut st)?;
        Ok(port)
    }

    /// Detaches a pod: its port and flows go away; its I/O is closed once no
    /// packet thread holds it.
    ///
    /// Fails when the pod is not attached or the flows cannot be installed.
    pub fn detach(&self, pod: &ObjectKey) -> Result<(), Error> {
        let mut st = self.state();
        if let Some(i) = st.unresolved.iter().position(|p| &p.pod == pod) {
            let gone = st.unresolved.remove(i);
            st.locals.retain(|p| p.no != gone.port);
            self.publish(&mut st)?;
            self.forget_connections(&gone.ips);
            return Ok(());
        }
        let Some(i) = st.topology.pods.iter().position(|p| &p.pod == pod) else {
            return Err(Error::NotAttached(pod.clone()));
        };
        let gone = st.topology.pods.remove(i);
        st.locals.retain(|p| p.no != gone.port);
        st.compile(Change::PodDeleted(pod.clone()));
        self.publish(&mut st)?;
        self.forget_connections(&gone.ips);
        Ok(())
    }

    /// Reaches other nodes' pods through `tunnel`, one tunnel port per node of
    /// the cluster model with pod CIDRs.
    ///
    /// Fails when flows cannot be installed.
    pub fn set_tunnel(&self, tunnel: TunnelIo) -> Result<(), Error> {
        let mut st = self.state();
        st.tunnel_states = (0..tunnel.sockets()).map(|_| Arc::default()).collect();
        st.tunnel = Some(Arc::new(tunnel));
        self.publish(&mut st)?;
        Ok(())
    }

    /// Service (ClusterIP) ranges: pods' traffic to them is decided after the
    /// node's kernel translates it (see `policy::pipeline::Topology`).
    ///
    /// Fails when flows cannot be installed.
    pub fn set_service_cidrs(&self, cidrs: Vec<ipnet::IpNet>) -> Result<(), Error> {
        let mut st = self.state();
        st.topology.service_cidrs = cidrs;
        self.publish(&mut st)?;
        Ok(())
    }

    /// Sets the gateway port.
    ///
    /// Fails when flows cannot be installed.
    pub fn set_gateway(
        &self,
        io: Arc<dyn Port>,
        mac: [u8; 6],
        ips: Vec<IpAddr>,
    ) -> Result<PortNo, Error> {
        let mut st = self.state();
        st.locals.retain(|p| p.no != GATEWAY_PORT);
        st.locals.push(Local::new(GATEWAY_PORT, vec![io]));
        st.topology.gateway = Some(Gateway {
            port: GATEWAY_PORT,
            mac,
            ips,
        });
        // The node routes: its "fragmentation needed" and "time exceeded" about
        // pods' connections are believed; nobody else's are.
        self.published
            .dp
            .conntrack
            .set_trusted_error_ports(vec![GATEWAY_PORT]);
        self.publish(&mut st)?;
        Ok(GATEWAY_PORT)
    }
}
