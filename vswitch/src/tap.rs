//! TAP devices: the switch holds each pod's TAP file descriptor.
//!
//! Owns creating, attaching to and deleting TAP devices (whole Ethernet frames, no
//! packet-information header, offloads off unless asked for), single- or
//! multiqueue (`IFF_MULTI_QUEUE`: one fd per queue, the device's frames
//! spread over them by flow). Reads and writes are non-blocking.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Whether frames carry a virtio-net header (offloads on).
    vnet_hdr: bool,
}

impl Tap {
    /// Creates the TAP device `name`, or attaches to it if it exists (a persistent
    /// device after a restart). With `persist`, the device survives this process.
    ///
    /// Fails when `/dev/net/tun` cannot be opened (not root, no tun module), the
    /// name is invalid, or the device exists with other flags.
    pub fn open(name: &str, persist: bool) -> io::Result<Tap> {
        Tap::open_with(name, persist, false)
    }

    /// Like [`Tap::open`]; with `offload`, each frame read or written is preceded
    /// by a 12-byte virtio-net header and the kernel may hand over TCP segments up
    /// to 64 KiB with checksums left to the receiver (TSO and checksum offload).
    /// The header must then be passed on unchanged to a port with offload too.
    pub fn open_with(name: &str, persist: bool, offload: bool) -> io::Result<Tap> {
        Tap::open_flags(name, persist, offload, 0)
    }

    /// Opens `queues` queues of the multiqueue TAP device `name` (creating it
    /// when it does not exist): each queue is an fd of its own, and the
    /// kernel spreads the frames the device sends over them by flow, so
    /// several packet threads can read one pod. A device made single-queue
    /// (by an older CNI plugin) is opened single-queue: one fd.
    ///
    /// Fails as [`Tap::open_with`] does, or when `queues` is 0.
    pub fn open_queues(
        name: &str,
        persist: bool,
        offload: bool,
        queues: usize,
    ) -> io::Result<Vec<Tap>> {
        if queues == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TAP device needs at least one queue",
            ));
        }
        let first = match Tap::open_flags(name, persist, offload, sys::IFF_MULTI_QUEUE) {
            Ok(tap) => tap,
            // The device exists without IFF_MULTI_QUEUE.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(vec![Tap::open_with(name, persist, offload)?]);
            }
            Err(e) => return Err(e),
        };
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Tap::open_flags(
                name,
                persist,
                offload,
                sys::IFF_MULTI_QUEUE,
            )?);
        }
        Ok(taps)
    }

    fn open_flags(
        name: &str,
        persist: bool,
        offload: bool,
        extra: libc::c_short,
    ) -> io::Result<Tap> {
        let fd = sys::open_tun()?;
        let mut flags = sys::IFF_TAP | sys::IFF_NO_PI | extra;
        if offload {
            flags |= sys::IFF_VNET_HDR;
        }
        let name = sys::tunsetiff(fd.as_fd(), name, flags)?;
        if offload {
            sys::tunsetvnethdrsz(fd.as_fd(), sys::VNET_HDR_LEN as libc::c_int)?;
            sys::tunsetoffload(
                fd.as_fd(),
                sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6 | sys::TUN_F_TSO_ECN,
            )?;
        } else {
            sys::tunsetoffload(fd.as_fd(), 0)?;
        }
        sys::tunsetpersist(fd.as_fd(), persist)?;
        Ok(Tap {
            fd,
            name,
            vnet_hdr: offload,
        })
    }

    /// Bytes of virtio-net header before each frame (0 without offload).
    pub fn header_len(&self) -> usize {
        if self.vnet_hdr { sys::VNET_HDR_LEN } else { 0 }
    }

    /// Deletes a persistent TAP device (attaches and clears persistence; the device
    /// goes away with the fd). Succeeds when the device does not exist.
    pub fn delete(name: &str) -> io::Result<()> {
        let attach = |flags| {
            let fd = sys::open_tun()?;
            sys::tunsetiff(fd.as_fd(), name, flags)?;
            sys::tunsetpersist(fd.as_fd(), false)
        };
        let single = sys::IFF_TAP | sys::IFF_NO_PI;
        match attach(single | sys::IFF_MULTI_QUEUE) {
            // Made single-queue.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => attach(single),
            other => other,
        }
    }

    /// Attaches to `queues` queues (see [`Tap::open_queues`]) of the existing TAP
    /// device `name` inside the network namespace `netns` (a path such as
    /// `/var/run/netns/NAME`): device names are looked up in the caller's
    /// namespace, so this runs on a thread that joins `netns`. The returned fds
    /// work from any thread.
    ///
    /// Fails when the namespace cannot be entered or has no device `name` (it is
    /// never created there).
    pub fn open_in(
        netns: &std::path::Path,
        name: &str,
        offload: bool,
        queues: usize,
    ) -> io::Result<Vec<Tap>> {
        let netns = netns.to_path_buf();
        let name = name.to_string();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&netns)?;
            sys::setns_net(ns.as_fd())?;
            if sys::if_nametoindex(&name).is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no device {name} in {}", netns.display()),
                ));
            }
            Tap::open_queues(&name, true, offload, queues)
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `Ok(None)` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match sys::read(self.fd.as_fd(), buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one frame. A full queue drops the frame (`Ok(false)`), as a NIC would.
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        match sys::write(self.fd.as_fd(), frame) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // The device is down or its namespace went away: the frame is lost.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
