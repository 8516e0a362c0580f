//! Kernel interfaces the switch needs that no crate here wraps: the TUN/TAP ioctls
//! and poll(2). The only module of the crate with `unsafe`; every block says why
//! it is sound. Everything above it works with owned fds and safe types.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `linux/if_tun.h`
pub const IFF_TAP: libc::c_short = 0x0002;
pub const IFF_NO_PI: libc::c_short = 0x1000;
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
pub const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `TUNSETOFFLOAD` flags: checksum offload, TSO for IPv4 / IPv6 / with ECN.
pub const TUN_F_CSUM: libc::c_uint = 0x01;
pub const TUN_F_TSO4: libc::c_uint = 0x02;
pub const TUN_F_TSO6: libc::c_uint = 0x04;
pub const TUN_F_TSO_ECN: libc::c_uint = 0x08;
/// `struct virtio_net_hdr_mrg_rxbuf`: what precedes each frame with IFF_VNET_HDR.
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens `/dev/net/tun` (close-on-exec, non-blocking).
pub fn open_tun() -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a valid NUL-terminated string; open has no other preconditions.
    let fd = check(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// TUNSETIFF: attaches `fd` to the device `name` (created if missing) with
/// `flags`; returns the kernel's name for it.
pub fn tunsetiff(fd: BorrowedFd<'_>, name: &str, flags: libc::c_short) -> io::Result<String> {
    if name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?} (1-15 bytes)"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a properly sized, initialized `struct ifreq`, live for the call;
    // TUNSETIFF reads and writes only within it.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) })?;
    let len = req
        .name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(libc::IFNAMSIZ);
    Ok(String::from_utf8_lossy(&req.name[..len]).into_owned())
}

/// Sets the calling thread's nice value (on Linux each thread has its own).
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid takes nothing and only returns the caller's thread id.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority takes plain integers; no memory is passed.
    check(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) }).map(drop)
}

/// TUNSETPERSIST: whether the device outlives its last fd.
pub fn tunsetpersist(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(on)) }).map(drop)
}

/// TUNSETOFFLOAD: which offloads the device may hand us (0: none, whole frames only).
pub fn tunsetoffload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) })
        .map(drop)
}

/// TUNSETVNETHDRSZ: the size of the virtio-net header before each frame.
pub fn tunsetvnethdrsz(fd: BorrowedFd<'_>, size: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is live for the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &size as *const libc::c_int) })
        .map(drop)
}

/// read(2) into `buf`.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// write(2) of `buf`.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// poll(2): waits until one of `fds` is readable or `timeout_ms` passes; marks
/// each `ready[i]`.
pub fn poll_readable(
    fds: &[BorrowedFd<'_>],
    ready: &mut Vec<bool>,
    timeout_ms: i32,
) -> io::Result<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            ready.clear();
            ready.resize(fds.len(), false);
            return Ok(0);
        }
        return Err(e);
    }
    ready.clear();
    ready.extend(
        pfds.iter()
            .map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0),
    );
    Ok(n as usize)
}

/// setns(2) into the network namespace `ns` (an open `/var/run/netns/NAME` or
/// `/proc/PID/ns/net`), for the calling thread only.
pub fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns takes an fd and a flag by value; it affects only this thread.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }).map(drop)
}

/// if_nametoindex(3) in the calling thread's network namespace: whether a device
/// named `name` exists there.
pub fn if_nametoindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Sends one raw Ethernet frame out of interface `ifname` (in the calling
/// thread's network namespace) through an AF_PACKET socket: how a pod could try
/// to spoof addresses.
pub fn send_raw(ifname: &str, frame: &[u8]) -> io::Result<()> {
    send_raw_all(ifname, [frame])
}

/// Like [`send_raw`], many frames through one socket (closing an AF_PACKET
/// socket waits for an RCU grace period: one per frame would take milliseconds
/// each).
pub fn send_raw_all<F: AsRef<[u8]>>(
    ifname: &str,
    frames: impl IntoIterator<Item = F>,
) -> io::Result<()> {
    let index = if_nametoindex(ifname)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no device {ifname}")))?;
    // SAFETY: socket has no memory preconditions.
    let fd =
        check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for frame in frames {
        let frame = frame.as_ref();
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value to start from.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        if frame.len() >= 6 {
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        }
        // SAFETY: `frame` and `addr` are valid for the call; the length passed is the
        // size of the sockaddr_ll we pass.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An inotify instance (non-blocking): wakes the manifest watcher on edits.
pub fn inotify_init() -> io::Result<OwnedFd> {
    // SAFETY: inotify_init1 takes flags only and returns a new fd or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by inotify_init1 and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watches directory `dir` for entries created, deleted, moved or written.
pub fn inotify_watch_dir(fd: BorrowedFd<'_>, dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mask = libc::IN_CREATE
        | libc::IN_DELETE
        | libc::IN_MODIFY
        | libc::IN_CLOSE_WRITE
        | libc::IN_MOVED_TO
        | libc::IN_MOVED_FROM
        | libc::IN_ATTRIB
        | libc::IN_ONLYDIR;
    // SAFETY: `path` is a NUL-terminated string live for the call.
    check(unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) }).map(|_| ())
}

/// An eventfd: wakes a thread waiting in epoll (a packet thread, when the
/// ports change or the switch stops) without it polling on a timer.
#[derive(Debug)]
pub struct Doorbell(OwnedFd);

impl Doorbell {
    pub fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd takes an initial count and flags, returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the doorbell readable until [`Doorbell::clear`].
    pub fn ring(&self) {
        // A full counter (2^64 - 2 rings unanswered) is still readable: ignore.
        let _ = write(self.0.as_fd(), &1u64.to_ne_bytes());
    }

    /// Answers every ring so far.
    pub fn clear(&self) {
        let mut buf = [0u8; 8];
        let _ = read(self.0.as_fd(), &mut buf);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// An epoll instance: the packet thread's wait on every port at once.
#[derive(Debug)]
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Reports `fd` readable (level-triggered) with `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event live for the call; both fds are open.
        check(unsafe {
            libc::epoll_ctl(
                self.0.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        })
        .map(drop)
    }

    /// Waits up to `timeout_ms` (0: do not wait) and puts the tokens of readable
    /// fds in `tokens`, reusing `events` as the kernel's buffer.
    pub fn wait(
        &self,
        events: &mut [libc::epoll_event],
        tokens: &mut Vec<u64>,
        timeout_ms: i32,
    ) -> io::Result<()> {
        tokens.clear();
        // SAFETY: `events` is a valid, writable array of `events.len()` entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len().min(i32::MAX as usize) as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        tokens.extend(events[..n as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread and the threads it starts
/// afterwards, so that one thread can take them with [`wait_termination`].
pub fn block_termination_signals() -> io::Result<()> {
    // SAFETY: `set` is initialised by sigemptyset before use; pthread_sigmask reads
    // it and writes no old mask (null), all within this call.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (blocked beforehand); returns the signal.
pub fn wait_termination() -> io::Result<i32> {
    // SAFETY: `set` is initialised by sigemptyset; sigwait writes the signal
    // number into `sig`, which outlives the call.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let mut sig: libc::c_int = 0;
        let r = libc::sigwait(&set, &mut sig);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(sig)
    }
}

/// The credentials of the process at the other end of a unix socket
/// (SO_PEERCRED): (pid, uid, gid).
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes for the call, and `len`
    // says how many bytes `cred` holds.
    check(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid, cred.gid))
}

/// The supplementary groups of process `pid` (from /proc), for a peer that
/// may belong to the control group without it being its primary group.
pub fn process_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}
