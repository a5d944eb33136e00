//! rtnetlink link messages the fabric writes: creating its collect-metadata VXLAN device.

use super::attr::{Attr, emit_all};

pub const RTM_NEWLINK: u16 = 16;

const IFF_UP: u32 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;
const IFLA_VXLAN_COLLECT_METADATA: u16 = 25;

/// `RTM_NEWLINK` payload creating `name`, up: a VXLAN device in collect-metadata (`external`) mode on UDP `port`
/// that does not learn remote addresses (the fabric's rules say where each frame goes), like
/// `ip link add NAME type vxlan external nolearning dstport PORT`.
pub fn vxlan_external(name: &str, port: u16) -> Vec<u8> {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut out = vec![0u8; 16];
    out[8..12].copy_from_slice(&IFF_UP.to_ne_bytes());
    out[12..16].copy_from_slice(&IFF_UP.to_ne_bytes());
    let data = vec![
        Attr::u8(IFLA_VXLAN_COLLECT_METADATA, 1),
        Attr::u8(IFLA_VXLAN_LEARNING, 0),
        Attr::be16(IFLA_VXLAN_PORT, port),
    ];
    let attrs = [
        Attr::string(IFLA_IFNAME, name),
        Attr::nested(IFLA_LINKINFO, vec![Attr::string(IFLA_INFO_KIND, "vxlan"), Attr::nested(IFLA_INFO_DATA, data)]),
    ];
    emit_all(&attrs, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::attr::Attrs;

    #[test]
    fn vxlan_device_request_carries_kind_port_and_external_mode() {
        let payload = vxlan_external("vxlan0", 4789);
        assert_eq!(u32::from_ne_bytes(payload[8..12].try_into().unwrap()), IFF_UP);
        let attrs = Attrs::parse(&payload[16..]).unwrap();
        assert_eq!(attrs.get(IFLA_IFNAME), Some(&b"vxlan0\0"[..]));
        let info = attrs.nested(IFLA_LINKINFO).unwrap().unwrap();
        assert_eq!(info.get(IFLA_INFO_KIND), Some(&b"vxlan\0"[..]));
        let data = info.nested(IFLA_INFO_DATA).unwrap().unwrap();
        assert_eq!(data.u8(IFLA_VXLAN_COLLECT_METADATA).unwrap(), Some(1));
        assert_eq!(data.u8(IFLA_VXLAN_LEARNING).unwrap(), Some(0));
        assert_eq!(data.get(IFLA_VXLAN_PORT), Some(&4789u16.to_be_bytes()[..]));
    }
}
