//! Cookies: the one place that says how a flow's cookie is laid out.
//!
//! The top byte is the [`CookieKind`]: a compiled policy unit, a base-pipeline
//! purpose, or a flow an operator added by hand; the low 56 bits are the kind's
//! own payload (a unit id, a purpose index, the operator's cookie). Traces, the
//! audit log and `flowctl` ask this module what a cookie is.

use datapath::flow::Cookie;

/// What produced a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CookieKind {
    /// A compiled policy unit (a rule group, a default deny, a node's own traffic).
    Unit = 0x01,
    /// A base-pipeline flow (classifier, spoofguard, ...).
    Pipeline = 0x02,
    /// A flow an operator added by hand (`flowctl add-flow`).
    Manual = 0x03,
}

const SHIFT: u32 = 56;
const PAYLOAD: u64 = (1 << SHIFT) - 1;

impl CookieKind {
    /// A cookie of this kind carrying `payload` (its top byte is dropped).
    pub const fn cookie(self, payload: u64) -> Cookie {
        Cookie(((self as u64) << SHIFT) | (payload & PAYLOAD))
    }

    /// The kind of `cookie`, `None` for a cookie we did not make.
    pub const fn of(cookie: Cookie) -> Option<CookieKind> {
        match cookie.0 >> SHIFT {
            0x01 => Some(CookieKind::Unit),
            0x02 => Some(CookieKind::Pipeline),
            0x03 => Some(CookieKind::Manual),
            _ => None,
        }
    }

    /// The payload of `cookie` when it is of this kind.
    pub const fn payload(self, cookie: Cookie) -> Option<u64> {
        match CookieKind::of(cookie) {
            Some(k) if k as u8 == self as u8 => Some(cookie.0 & PAYLOAD),
            _ => None,
        }
    }
}

/// Whether a flow was added by hand rather than compiled.
pub fn is_manual(cookie: Cookie) -> bool {
    CookieKind::of(cookie) == Some(CookieKind::Manual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_payloads_stay_in_their_bits() {
        for kind in [CookieKind::Unit, CookieKind::Pipeline, CookieKind::Manual] {
            let c = kind.cookie(0xff12_3456);
            assert_eq!(CookieKind::of(c), Some(kind));
            assert_eq!(kind.payload(c), Some(0xff12_3456));
        }
        // An operator's cookie with its own top byte is still marked manual.
        let c = CookieKind::Manual.cookie(0xab00_0000_0000_0001);
        assert!(is_manual(c));
        assert_eq!(CookieKind::Manual.payload(c), Some(1));
        assert_eq!(CookieKind::Unit.payload(c), None);
        assert_eq!(CookieKind::of(Cookie(0)), None);
    }
}
