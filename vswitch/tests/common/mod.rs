//! What the end-to-end suites share: `ip`, network namespaces, the rule that
//! an unprivileged run skips outside CI but fails in it, vswitchd as a process,
//! pods through vswitch-cni, the control socket, flowctl, and traffic probes
//! (echo servers and clients inside namespaces).

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use control::{Endpoint, L4, Request};

/// Runs `ip ARGS`, failing the test with ip's message.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// Creates it (replacing a leftover of the same name) with `lo` up.
    pub fn new(name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            vswitch::sys::setns_net(ns.as_fd()).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Whether TAP devices can be created (root; `probe` is a name to try). Outside
/// CI the end-to-end tests skip without; in CI (root, as .ci/run runs them)
/// that is a failure.
pub fn privileged(probe: &str) -> bool {
    match vswitch::Tap::open(probe, false) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "end-to-end tests cannot run in CI: cannot create TAP devices ({e})"
            );
            eprintln!("skipping end-to-end test: cannot create TAP devices ({e})");
            false
        }
    }
}

/// Runs vswitch-cni as a container runtime does: `command` for pod
/// `namespace/name` in `pod_ns`, network config `netconf` on stdin. With
/// `node`, the plugin runs inside that node's network namespace. Returns
/// whether it succeeded and what it printed.
pub fn cni(
    node: Option<&str>,
    command: &str,
    pod_ns: &Netns,
    container: &str,
    pod: &str,
    netconf: &str,
) -> (bool, serde_json::Value) {
    use std::io::Write;
    use std::process::Stdio;
    let (pns, pname) = pod.split_once('/').expect("namespace/name");
    let exe = env!("CARGO_BIN_EXE_vswitch-cni");
    let mut cmd = match node {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, exe]);
            c
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod_ns.0))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={pns};K8S_POD_NAME={pname}"),
        )
        .env("CNI_PATH", "/usr/lib/cni:/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("vswitch-cni runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(netconf.as_bytes())
        .expect("netconf written");
    let out = child.wait_with_output().expect("vswitch-cni finishes");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), v)
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, empty directory named after `tag` and this process.
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("vswitch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a vswitchd config under `dir` (socket, state and manifests there too)
/// with `extra` appended; returns (config path, socket path).
pub fn write_config(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let socket = dir.join("vswitchd.sock");
    let config = dir.join("vswitchd.toml");
    let text = format!(
        "socket = {:?}\nstate_dir = {:?}\nmanifests = {:?}\n{extra}",
        socket.to_str().unwrap(),
        dir.join("state").to_str().unwrap(),
        dir.join("manifests").to_str().unwrap()
    );
    std::fs::write(&config, text).unwrap();
    (config, socket)
}

/// A vswitchd process (in a node's namespace when given), killed on drop.
pub struct Vswitchd {
    child: Option<Child>,
    pub config: PathBuf,
    pub socket: PathBuf,
    netns: Option<String>,
    env: Vec<(String, String)>,
}

impl Vswitchd {
    /// Starts vswitchd with `config` and waits for its control socket.
    pub fn start(config: &Path, socket: &Path) -> Vswitchd {
        Vswitchd::start_with(config, socket, None, &[])
    }

    /// Like [`Vswitchd::start`], inside network namespace `netns`, with extra
    /// environment variables.
    pub fn start_with(
        config: &Path,
        socket: &Path,
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> Vswitchd {
        let mut d = Vswitchd {
            child: None,
            config: config.into(),
            socket: socket.into(),
            netns: netns.map(String::from),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let exe = env!("CARGO_BIN_EXE_vswitchd");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, exe]);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.child = Some(cmd.spawn().expect("vswitchd starts"));
        let start = Instant::now();
        while !self.socket.exists() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("vswitchd exited at start: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "vswitchd did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as a DaemonSet rollout does; waits for a clean exit.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                assert!(
                    status.success(),
                    "vswitchd exits cleanly on SIGTERM: {status}"
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "vswitchd did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it (if running) and starts it again with the same config.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// One request over the control socket; the answer's data as JSON.
    pub fn ask(&self, req: &Request) -> Result<serde_json::Value, String> {
        ask(&self.socket, req)
    }

    /// (verdict, rule) of a live trace of a new TCP connection.
    pub fn verdict(&self, src: &str, dst: &str, port: u16) -> (String, String) {
        match trace(&self.socket, src, dst, L4::Tcp(port)) {
            Ok(v) => (
                v["verdict"].as_str().unwrap_or("").into(),
                v["rule"].as_str().unwrap_or("").into(),
            ),
            Err(e) => ("error".into(), e),
        }
    }

    /// Packets counted on flows whose rule contains `rule`.
    pub fn hits(&self, rule: &str) -> u64 {
        self.ask(&Request::DumpFlows)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["rule"].as_str().unwrap_or("").contains(rule))
            .map(|f| f["n_packets"].as_u64().unwrap())
            .sum()
    }

    /// Whether it says it is ready.
    pub fn ready(&self) -> bool {
        self.ask(&Request::Health)
            .map(|h| h["ready"] == true)
            .unwrap_or(false)
    }
}

impl Drop for Vswitchd {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One request to the vswitchd at `socket` (handshake included); the answer's
/// data as JSON, or vswitchd's error.
pub fn ask(socket: &Path, req: &Request) -> Result<serde_json::Value, String> {
    control::request(socket, "tests", req).map_err(|e| control::error_chain(&e))
}

/// An endpoint as tests write it: `namespace/pod` or an IP address.
pub fn endpoint(s: &str) -> Endpoint {
    match s.parse::<IpAddr>() {
        Ok(ip) => Endpoint::Ip(ip),
        Err(_) => Endpoint::Pod(s.parse().expect("namespace/pod")),
    }
}

/// A live trace.
pub fn trace(socket: &Path, src: &str, dst: &str, l4: L4) -> Result<serde_json::Value, String> {
    ask(
        socket,
        &Request::Trace {
            src: endpoint(src),
            dst: endpoint(dst),
            l4,
        },
    )
}

/// The CNI network configuration of one test: vswitch-cni talking to a socket.
pub struct Cni {
    pub netconf: String,
}

impl Cni {
    /// CNI `command` for `pod` in `ns` (container id from both).
    pub fn call(&self, command: &str, ns: &Netns, pod: &str) -> (bool, serde_json::Value) {
        let pname = pod.split_once('/').unwrap().1;
        cni(
            None,
            command,
            ns,
            &format!("{}-{pname}", ns.0),
            pod,
            &self.netconf,
        )
    }
}

/// Pods attached through CNI, deleted (CNI DEL) on drop.
pub struct Attached<'a> {
    pub cni: &'a Cni,
    pub pods: Vec<(&'a Netns, String)>,
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        for (ns, pod) in &self.pods {
            let _ = self.cni.call("DEL", ns, pod);
        }
    }
}

/// Waits (up to 8 s) until `f` holds.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A TCP echo server in `ns` on `addr:port`, serving connections for the rest
/// of the test.
pub fn serve_tcp(ns: &Netns, addr: &str, port: u16) {
    let addr: SocketAddr = SocketAddr::new(addr.parse().expect("an address"), port);
    let listener = ns.run(move || TcpListener::bind(addr).expect("bind in netns"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            // Echo until the client closes.
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Whether a TCP connection from `ns` to `to:port` completes and echoes.
pub fn tcp(ns: &Netns, to: &str, port: u16) -> bool {
    let addr: SocketAddr = SocketAddr::new(to.parse().expect("an address"), port);
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(1500)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 5];
        s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
    })
}

/// Whether a UDP datagram from `from` reaches a socket in `to_ns` at `to:port`.
pub fn udp(from: &Netns, to_ns: &Netns, to: &str, port: u16) -> bool {
    let addr: SocketAddr = SocketAddr::new(to.parse().expect("an address"), port);
    let rx = to_ns.run(move || UdpSocket::bind(addr).expect("bind in netns"));
    rx.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let any = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let tx = from.run(move || UdpSocket::bind(any).expect("bind"));
    // ARP may take the first datagram's turn; send a few.
    for _ in 0..3 {
        tx.send_to(b"datagram", addr).unwrap();
        let mut buf = [0u8; 16];
        if let Ok((n, _)) = rx.recv_from(&mut buf) {
            return &buf[..n] == b"datagram";
        }
    }
    false
}

/// Whether a connection from namespace `ns` to `to:port` works: TCP connects,
/// or a UDP datagram is echoed back. Runs on its own thread (returned).
pub fn probe(ns: &str, to: IpAddr, port: u16, udp: bool) -> JoinHandle<bool> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).expect("netns");
        vswitch::sys::setns_net(f.as_fd()).expect("setns");
        let addr = SocketAddr::new(to, port);
        if !udp {
            return TcpStream::connect_timeout(&addr, Duration::from_millis(600)).is_ok();
        }
        let any = if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
        let s = UdpSocket::bind(any).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for _ in 0..2 {
            let _ = s.send_to(b"probe", addr);
            let mut buf = [0u8; 8];
            if s.recv_from(&mut buf).is_ok() {
                return true;
            }
        }
        false
    })
}

/// flowctl, built next to vswitchd by `cargo test --workspace` (scripts/test.sh);
/// fails the test when flowctl fails.
pub fn flowctl(socket: &Path, args: &[&str]) -> String {
    let exe = Path::new(env!("CARGO_BIN_EXE_vswitchd")).with_file_name("flowctl");
    assert!(
        exe.exists(),
        "{} missing: run the workspace's tests (cargo test --workspace) or build flowctl first",
        exe.display()
    );
    let out = Command::new(exe)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "flowctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Sends `frame` out of `dev` from inside `ns` (an AF_PACKET socket): how a
/// pod sends what its stack never would.
pub fn send_raw(ns: &Netns, dev: String, frame: Vec<u8>) {
    ns.run(move || vswitch::sys::send_raw(&dev, &frame).expect("raw send"));
}

/// A persistent TAP device `dev` moved into `ns` as the pod's interface, with
/// `mac` and address `cidr`, up: what vswitch-cni does, by hand. vswitchd
/// attaches it by (namespace path, name).
pub fn tap_in(ns: &Netns, dev: &str, mac: [u8; 6], cidr: &str) {
    drop(vswitch::Tap::open(dev, true).expect("create TAP"));
    place_in(ns, dev, mac, cidr);
}

/// Moves device `dev` into `ns` as a pod's interface: `mac`, address `cidr`, up.
pub fn place_in(ns: &Netns, dev: &str, mac: [u8; 6], cidr: &str) {
    ip(&["link", "set", dev, "netns", &ns.0]);
    ip(&[
        "-n",
        &ns.0,
        "link",
        "set",
        dev,
        "address",
        &control::Mac(mac).to_string(),
    ]);
    ip(&["-n", &ns.0, "addr", "add", cidr, "dev", dev]);
    ip(&["-n", &ns.0, "link", "set", dev, "up"]);
}

/// Like [`place_in`] for an IPv6 address: the link-local address the switch
/// expects (from the MAC) and the address, without duplicate address
/// detection, as vswitch-cni configures a pod.
pub fn place_in6(ns: &Netns, dev: &str, mac: [u8; 6], cidr: &str) {
    ip(&["link", "set", dev, "netns", &ns.0]);
    let mac_text = control::Mac(mac).to_string();
    ip(&["-n", &ns.0, "link", "set", dev, "address", &mac_text]);
    ip(&["-n", &ns.0, "link", "set", dev, "addrgenmode", "none"]);
    let ll = format!("{}/64", policy::pipeline::link_local(mac));
    ip(&["-n", &ns.0, "addr", "add", &ll, "dev", dev, "nodad"]);
    ip(&["-n", &ns.0, "addr", "add", cidr, "dev", dev, "nodad"]);
    ip(&["-n", &ns.0, "link", "set", dev, "up"]);
}

/// A switch (its realiser) with its packet thread, stopped on drop.
pub struct Running {
    pub switch: Arc<vswitch::Realiser>,
    pub forwarder: Arc<vswitch::Forwarder>,
    thread: Option<vswitch::forwarder::PacketThreads>,
}

impl Running {
    /// A switch whose packet thread is named `name` (at most 15 bytes).
    pub fn new(name: &str) -> Running {
        Running::with(name, Default::default())
    }

    pub fn with(name: &str, config: datapath::DatapathConfig) -> Running {
        let switch = vswitch::Realiser::new(config);
        let forwarder = vswitch::Forwarder::new(switch.published().clone());
        // Two packet threads: the tests cross ports served by different ones.
        let thread = Some(forwarder.spawn(name, 2, Default::default(), 0).unwrap());
        Running {
            switch,
            forwarder,
            thread,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.forwarder.stop();
        if let Some(t) = self.thread.take() {
            t.join();
        }
    }
}

impl Cni {
    /// vswitch-cni talking to `socket`, IPAM by host-local over `subnet`
    /// (`a.b.c.0/24`) with `gateway`, its state under `dir`.
    pub fn host_local(socket: &Path, subnet: &str, gateway: &str, dir: &Path) -> Cni {
        Cni {
            netconf: serde_json::json!({
                "cniVersion": "1.0.0", "name": "vswitch", "type": "vswitch-cni", "socket": socket,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet, "gateway": gateway}]], "dataDir": dir.join("ipam")},
            })
            .to_string(),
        }
    }

    /// A network namespace per pod (`{tag}p{i}`), each attached by CNI ADD;
    /// the namespaces and every pod's first address, in `pods`' order.
    pub fn add_all(&self, tag: &str, pods: &[&str]) -> (Vec<Netns>, Vec<IpAddr>) {
        let spaces: Vec<Netns> = (0..pods.len())
            .map(|i| Netns::new(format!("{tag}p{i}")))
            .collect();
        let mut ips = Vec::new();
        for (pod, ns) in pods.iter().zip(&spaces) {
            let (ok, result) = self.call("ADD", ns, pod);
            assert!(ok, "CNI ADD {pod}: {result}");
            let addr = result["ips"][0]["address"].as_str().unwrap_or_default();
            ips.push(addr.split('/').next().unwrap().parse().expect("an address"));
        }
        (spaces, ips)
    }
}

/// One HTTP/1.1 request to `addr`: the status and the body (by
/// Content-Length, or chunked, or to the end). Enough for the metrics
/// address and chromedriver; no TLS, no redirects.
pub fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use std::io::BufRead;
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (mut length, mut chunked) = (None, false);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<usize>().ok();
        }
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
    let mut out = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).unwrap();
            out.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        out.resize(n, 0);
        r.read_exact(&mut out).unwrap();
    } else {
        let _ = r.read_to_end(&mut out);
    }
    (status, String::from_utf8_lossy(&out).into_owned())
}

/// A free TCP port on loopback (`127.0.0.1:PORT`).
pub fn free_address() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A TCP server on `addr:port` in `ns` that says `name` and then echoes.
pub fn serve_named(ns: &Netns, addr: IpAddr, port: u16, name: &'static str) {
    let listener = ns.run(move || TcpListener::bind(SocketAddr::new(addr, port)).expect("bind"));
    spawn_named(listener, name);
}

pub fn spawn_named(listener: TcpListener, name: &'static str) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                if c.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 64];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Connects from `ns` to `to:port`; the backend's name, the open stream.
pub fn connect(ns: &Netns, to: &str, port: u16) -> Result<(String, TcpStream), std::io::Error> {
    let addr = SocketAddr::new(to.parse().unwrap(), port);
    ns.run(move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_millis(1500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new(s.try_clone()?).read_line(&mut line)?;
        Ok((line.trim().to_string(), s))
    })
}

pub fn backend(ns: &Netns, to: &str, port: u16) -> Option<String> {
    connect(ns, to, port).ok().map(|(name, _)| name)
}
