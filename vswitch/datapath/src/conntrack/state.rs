//! The protocol state machines: TCP (handshake, FIN from each side, reset,
//! port reuse after TIME_WAIT), SCTP (by chunk type) and the request/reply
//! state of everything else, with the timeout each state gets.

use super::{
    Conn, Conntrack, SCTP_ABORT, SCTP_INIT, SCTP_INIT_ACK, SCTP_SHUTDOWN, SCTP_SHUTDOWN_COMPLETE,
};
use crate::field::{ct_state, ip_proto, tcp_flags};
use crate::key::FlowKey;
use crate::time::Time;

/// Protocol state of a connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConnState {
    TcpSynSent,
    TcpSynRecv,
    TcpEstablished,
    TcpClosing,
    TcpTimeWait,
    TcpClosed,
    SctpCookie,
    SctpEstablished,
    SctpClosing,
    SctpClosed,
    /// UDP, ICMP and other protocols: no reply seen yet.
    Unreplied,
    Replied,
}

impl ConnState {
    const ALL: [ConnState; 12] = [
        ConnState::TcpSynSent,
        ConnState::TcpSynRecv,
        ConnState::TcpEstablished,
        ConnState::TcpClosing,
        ConnState::TcpTimeWait,
        ConnState::TcpClosed,
        ConnState::SctpCookie,
        ConnState::SctpEstablished,
        ConnState::SctpClosing,
        ConnState::SctpClosed,
        ConnState::Unreplied,
        ConnState::Replied,
    ];

    /// A stable number for saving the state.
    pub fn code(self) -> u8 {
        ConnState::ALL.iter().position(|s| *s == self).unwrap_or(0) as u8
    }

    pub fn from_code(code: u8) -> Option<ConnState> {
        ConnState::ALL.get(usize::from(code)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            ConnState::TcpSynSent => "SYN_SENT",
            ConnState::TcpSynRecv => "SYN_RECV",
            ConnState::TcpEstablished => "ESTABLISHED",
            ConnState::TcpClosing => "FIN_WAIT",
            ConnState::TcpTimeWait => "TIME_WAIT",
            ConnState::TcpClosed => "CLOSE",
            ConnState::SctpCookie => "COOKIE_WAIT",
            ConnState::SctpEstablished => "ESTABLISHED",
            ConnState::SctpClosing => "SHUTDOWN",
            ConnState::SctpClosed => "CLOSED",
            ConnState::Unreplied => "UNREPLIED",
            ConnState::Replied => "REPLIED",
        }
    }
}

impl Conntrack {
    /// The state machine proper.
    pub(super) fn transition(
        &self,
        conn: &mut Conn,
        now: Time,
        key: &FlowKey,
        orig: bool,
        len: u64,
    ) -> Option<u8> {
        use ct_state::*;
        let dir = usize::from(!orig);
        let c = &self.config;
        let (state, timeout) = match key.nw_proto {
            ip_proto::TCP => {
                let f = key.tcp_flags;
                let (syn, ack, fin, rst) = (
                    f & tcp_flags::SYN != 0,
                    f & tcp_flags::ACK != 0,
                    f & tcp_flags::FIN != 0,
                    f & tcp_flags::RST != 0,
                );
                if syn && (fin || rst) {
                    return None;
                }
                let next = match conn.state {
                    _ if rst => ConnState::TcpClosed,
                    ConnState::TcpSynSent if orig && syn && !ack => ConnState::TcpSynSent,
                    ConnState::TcpSynSent if !orig && syn && ack => ConnState::TcpSynRecv,
                    ConnState::TcpSynSent => return None,
                    ConnState::TcpSynRecv if syn && orig != ack => ConnState::TcpSynRecv,
                    ConnState::TcpSynRecv if orig && ack && !syn => ConnState::TcpEstablished,
                    ConnState::TcpSynRecv => return None,
                    ConnState::TcpTimeWait | ConnState::TcpClosed if orig && syn && !ack => {
                        // Port reuse: a fresh connection replaces the dead one
                        // (same ends, same charge).
                        conn.state = ConnState::TcpSynSent;
                        conn.fin_seen = [false; 2];
                        conn.replied = false;
                        conn.expires = now + c.tcp_syn;
                        conn.created = now;
                        conn.packets = [1, 0];
                        conn.bytes = [len, 0];
                        return Some(TRK | NEW);
                    }
                    _ if syn => return None,
                    ConnState::TcpEstablished | ConnState::TcpClosing if fin => {
                        conn.fin_seen[dir] = true;
                        if conn.fin_seen == [true, true] {
                            ConnState::TcpTimeWait
                        } else {
                            ConnState::TcpClosing
                        }
                    }
                    s => s,
                };
                let timeout = match next {
                    ConnState::TcpSynSent | ConnState::TcpSynRecv => c.tcp_syn,
                    ConnState::TcpEstablished => c.tcp_established,
                    ConnState::TcpClosing => c.tcp_closing,
                    ConnState::TcpTimeWait => c.tcp_time_wait,
                    _ => c.tcp_closed,
                };
                (next, timeout)
            }
            ip_proto::SCTP => {
                let next = match (conn.state, key.sctp_chunk) {
                    (_, SCTP_ABORT | SCTP_SHUTDOWN_COMPLETE) => ConnState::SctpClosed,
                    (_, SCTP_SHUTDOWN) => ConnState::SctpClosing,
                    (ConnState::SctpCookie, SCTP_INIT_ACK) if !orig => ConnState::SctpEstablished,
                    (ConnState::SctpCookie, SCTP_INIT) if orig => ConnState::SctpCookie,
                    (ConnState::SctpCookie, _) if !orig => ConnState::SctpEstablished,
                    (s, _) => s,
                };
                let timeout = match next {
                    ConnState::SctpEstablished => c.tcp_established,
                    ConnState::SctpClosed => c.tcp_closed,
                    _ => c.tcp_closing,
                };
                (next, timeout)
            }
            proto => {
                let replied = conn.replied || !orig;
                let next = if replied {
                    ConnState::Replied
                } else {
                    ConnState::Unreplied
                };
                let timeout = match (proto, replied) {
                    (ip_proto::ICMP | ip_proto::ICMPV6, _) => c.icmp,
                    (ip_proto::UDP, false) => c.udp_first,
                    (ip_proto::UDP, true) => c.udp_replied,
                    _ => c.other,
                };
                (next, timeout)
            }
        };
        if !orig {
            conn.replied = true;
        }
        conn.state = state;
        conn.expires = now + timeout;
        conn.packets[dir] += 1;
        conn.bytes[dir] += len;
        Some(match (orig, conn.replied) {
            (false, _) => TRK | EST | RPL,
            (true, true) => TRK | EST,
            (true, false) => TRK | NEW,
        })
    }
}
