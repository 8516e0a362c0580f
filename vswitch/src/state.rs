//! What vswitchd keeps in `state_dir` across restarts.
//!
//! Owns the files and their format: `ports.json` (every attached port, so a
//! restarted daemon reattaches them) and `conntrack.json` (the connection table,
//! written on a graceful stop, read once and deleted at the next start). Writes
//! go to a temporary file that is fsync'd before it is renamed over the old
//! one; a file that cannot be read is never silently overwritten: it is moved
//! aside (`NAME.unreadable-TIME`) and the move is logged.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use datapath::conntrack::{ConnState, SavedConn};
use datapath::key::{ip_to_wide, wide_to_ip};
use serde::{Deserialize, Serialize};

/// One attached port, as the state file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    pub pod: String,
    /// The pod's network namespace (a path); `None`: the host namespace.
    #[serde(default)]
    pub netns: Option<String>,
    /// The TAP device's name in that namespace.
    pub ifname: String,
    pub mac: String,
    pub ips: Vec<IpAddr>,
}

impl std::fmt::Display for PortRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ns = self.netns.as_deref().unwrap_or("host");
        write!(
            f,
            "{} on {} in {ns} ({}, {:?})",
            self.pod, self.ifname, self.mac, self.ips
        )
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    fn ports_file(&self) -> PathBuf {
        self.0.join("ports.json")
    }

    fn conntrack_file(&self) -> PathBuf {
        self.0.join("conntrack.json")
    }

    /// The ports recorded by the last run; none when there is no file. A file
    /// that cannot be parsed is moved aside (and said so), never overwritten.
    pub fn load_ports(&self) -> Vec<PortRecord> {
        let path = self.ports_file();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return vec![];
        };
        match serde_json::from_str(&text) {
            Ok(records) => records,
            Err(e) => {
                set_aside(&path, &e.to_string());
                vec![]
            }
        }
    }

    /// Records the attached ports.
    ///
    /// Fails when the file cannot be written and synced.
    pub fn save_ports(&self, records: &[PortRecord]) -> std::io::Result<()> {
        write_synced(
            &self.ports_file(),
            &serde_json::to_vec_pretty(records).map_err(std::io::Error::other)?,
        )
    }

    /// Saves the connection table, each entry with its time left.
    ///
    /// Fails when the file cannot be written and synced.
    pub fn save_conntrack(&self, conns: Vec<SavedConn>) -> std::io::Result<usize> {
        let n = conns.len();
        let saved = SavedTable {
            saved_at_ms: unix_ms(),
            connections: conns.into_iter().map(SavedConnJson::from).collect(),
        };
        write_synced(
            &self.conntrack_file(),
            &serde_json::to_vec(&saved).map_err(std::io::Error::other)?,
        )?;
        Ok(n)
    }

    /// The saved connection table less the time spent down (entries that
    /// expired meanwhile left out), and that time in ms; the file is removed so
    /// a later crash cannot bring it back. An unreadable file is set aside.
    pub fn take_conntrack(&self) -> (Vec<SavedConn>, u64) {
        let path = self.conntrack_file();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return (vec![], 0);
        };
        let saved: SavedTable = match serde_json::from_str(&text) {
            Ok(s) => s,
            Err(e) => {
                set_aside(&path, &e.to_string());
                return (vec![], 0);
            }
        };
        let _ = std::fs::remove_file(&path);
        let down_ms = unix_ms().saturating_sub(saved.saved_at_ms);
        let conns = saved
            .connections
            .into_iter()
            .filter_map(|c| c.into_saved(down_ms))
            .collect();
        (conns, down_ms)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync'd, renamed
/// over `path`, the directory fsync'd.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Moves an unreadable state file aside so nothing overwrites it, and says so.
fn set_aside(path: &Path, why: &str) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".unreadable-{}", unix_ms()));
    let aside = PathBuf::from(aside);
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            file = %path.display(),
            kept_as = %aside.display(),
            error = why,
            "unreadable state file set aside (not used, not overwritten)"
        ),
        Err(e) => tracing::error!(
            file = %path.display(),
            error = why,
            rename_error = %e,
            "unreadable state file (and it cannot be set aside)"
        ),
    }
}

/// The conntrack file.
#[derive(Debug, Serialize, Deserialize)]
struct SavedTable {
    saved_at_ms: u64,
    connections: Vec<SavedConnJson>,
}

/// A saved connection in the state directory.
#[derive(Debug, Serialize, Deserialize)]
struct SavedConnJson {
    zone: u16,
    proto: u8,
    a: (IpAddr, u16),
    b: (IpAddr, u16),
    orig_is_a: bool,
    state: u8,
    fin_seen: [bool; 2],
    replied: bool,
    expires_in_ms: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
    mark: u8,
    /// A translated connection (a Service's): its original direction's ends
    /// after translation, source then destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nat: Option<((IpAddr, u16), (IpAddr, u16))>,
}

impl From<SavedConn> for SavedConnJson {
    fn from(c: SavedConn) -> SavedConnJson {
        SavedConnJson {
            zone: c.zone,
            proto: c.proto,
            a: (wide_to_ip(c.a.0), c.a.1),
            b: (wide_to_ip(c.b.0), c.b.1),
            orig_is_a: c.orig_is_a,
            state: c.state.code(),
            fin_seen: c.fin_seen,
            replied: c.replied,
            expires_in_ms: c.expires_in_ms,
            packets: c.packets,
            bytes: c.bytes,
            mark: c.mark,
            nat: c
                .nat
                .map(|n| ((wide_to_ip(n.src), n.sport), (wide_to_ip(n.dst), n.dport))),
        }
    }
}

impl SavedConnJson {
    /// Back to the datapath's form, `down_ms` later; `None` once expired.
    fn into_saved(self, down_ms: u64) -> Option<SavedConn> {
        Some(SavedConn {
            zone: self.zone,
            proto: self.proto,
            a: (ip_to_wide(self.a.0), self.a.1),
            b: (ip_to_wide(self.b.0), self.b.1),
            orig_is_a: self.orig_is_a,
            state: ConnState::from_code(self.state)?,
            fin_seen: self.fin_seen,
            replied: self.replied,
            expires_in_ms: self.expires_in_ms.checked_sub(down_ms).filter(|t| *t > 0)?,
            packets: self.packets,
            bytes: self.bytes,
            mark: self.mark,
            nat: self.nat.map(|((s, sp), (d, dp))| datapath::nat::Ends {
                src: ip_to_wide(s),
                sport: sp,
                dst: ip_to_wide(d),
                dport: dp,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_state_file_is_set_aside_not_overwritten() {
        let dir = std::env::temp_dir().join(format!("vswitch-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let state = StateDir(dir.clone());
        std::fs::write(dir.join("ports.json"), b"{ truncated").unwrap();
        assert!(state.load_ports().is_empty());
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("ports.json.unreadable-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "the bad file is kept");
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), b"{ truncated");
        let r = PortRecord {
            pod: "a/b".into(),
            netns: None,
            ifname: "t0".into(),
            mac: "0a:58:00:00:00:01".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        };
        state.save_ports(std::slice::from_ref(&r)).unwrap();
        assert_eq!(state.load_ports(), vec![r]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
