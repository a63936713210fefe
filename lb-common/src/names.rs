//! The names of the frontends ([`crate::map_names::NAMES`]): which Service port each
//! frontend serves, for `lb services` and `lb stats`. The agent alone writes and reads this
//! map (the programs never touch it); it creates it itself, so it is not in the programs'
//! object.

/// Key of [`crate::map_names::NAMES`]: a frontend of either family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    /// The frontend address: an IPv4 address in the first 4 bytes (the rest 0), or an
    /// IPv6 address; network byte order.
    pub addr: [u8; 16],
    /// The frontend port, network byte order.
    pub port: u16,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
}

impl NameKey {
    /// The key of an IPv4 frontend.
    pub fn v4(octets: [u8; 4], port: u16, proto: u8) -> Self {
        let mut addr = [0; 16];
        addr[..4].copy_from_slice(&octets);
        NameKey {
            addr,
            port: port.to_be(),
            proto,
            family: 4,
        }
    }

    /// The key of an IPv6 frontend.
    pub fn v6(octets: [u8; 16], port: u16, proto: u8) -> Self {
        NameKey {
            addr: octets,
            port: port.to_be(),
            proto,
            family: 6,
        }
    }
}

/// The longest name: `namespace/name:port` of 63-character parts.
pub const NAME_MAX: usize = 192;

/// The kinds of frontend ([`FrontendName::kind`]).
pub mod kind {
    /// The kind is not known.
    pub const UNKNOWN: u8 = 0;
    /// A cluster IP.
    pub const CLUSTER_IP: u8 = 1;
    /// A node address and node port.
    pub const NODE_PORT: u8 = 2;
    /// An external IP.
    pub const EXTERNAL_IP: u8 = 3;
    /// A load balancer ingress IP.
    pub const LOAD_BALANCER: u8 = 4;
}

/// Value of [`crate::map_names::NAMES`]: the Service port a frontend serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendName {
    /// One of [`kind`].
    pub kind: u8,
    /// Always 0.
    pub _pad: u8,
    /// The length of the name in [`FrontendName::name`], host byte order.
    pub len: u16,
    /// `namespace/name` or `namespace/name:port-name`, UTF-8, 0-padded.
    pub name: [u8; NAME_MAX],
}

impl FrontendName {
    /// The name of a frontend of `kind`; `None` when `name` is longer than [`NAME_MAX`].
    pub fn new(kind: u8, name: &str) -> Option<Self> {
        let bytes = name.as_bytes();
        if bytes.len() > NAME_MAX {
            return None;
        }
        let mut buf = [0; NAME_MAX];
        buf[..bytes.len()].copy_from_slice(bytes);
        Some(FrontendName {
            kind,
            _pad: 0,
            len: bytes.len() as u16,
            name: buf,
        })
    }

    /// The name; `None` when the entry is not valid UTF-8 of its length.
    pub fn name(&self) -> Option<&str> {
        let bytes = self.name.get(..usize::from(self.len))?;
        core::str::from_utf8(bytes).ok()
    }
}

const _: () = {
    assert!(core::mem::size_of::<NameKey>() == 20);
    assert!(core::mem::size_of::<FrontendName>() == 4 + NAME_MAX);
};

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], integer fields and byte arrays only, no implicit padding: every bit
// pattern is valid.
unsafe impl aya::Pod for NameKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for FrontendName {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_long_ones_are_refused() {
        let n = FrontendName::new(kind::NODE_PORT, "shop/web:http").unwrap();
        assert_eq!(n.name(), Some("shop/web:http"));
        assert_eq!(n.kind, kind::NODE_PORT);
        let longest = "a".repeat(NAME_MAX);
        assert_eq!(
            FrontendName::new(0, &longest).unwrap().name(),
            Some(&*longest)
        );
        assert!(FrontendName::new(0, &(longest + "a")).is_none());
        let mut bad = n;
        bad.len = NAME_MAX as u16 + 1;
        assert_eq!(bad.name(), None);
        assert_eq!(
            NameKey::v4([10, 0, 0, 1], 80, 6).addr[..5],
            [10, 0, 0, 1, 0]
        );
        assert_eq!(NameKey::v4([10, 0, 0, 1], 80, 6).port, 80u16.to_be());
    }
}
