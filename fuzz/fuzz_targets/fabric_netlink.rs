//! Arbitrary bytes as what the kernel sends the fabric: netlink datagrams (acks with extended-ack messages,
//! dumps), tc filter and qdisc messages, ethtool feature replies and devlink port messages. Every input is decoded
//! or rejected, never a panic; a decoded filter re-encodes and decodes to the same rule (its match, and its ct and
//! pedit actions exactly); pipelined acknowledgements split by sequence; a decoded devlink port has
//! an identity only for the eSwitch flavours, and the inventory built from it keeps only ports with a netdev.
#![no_main]

use dpu_fabric::FabricError;
use dpu_fabric::netlink::devlink::{FLAVOUR_PCI_PF, FLAVOUR_PCI_SF, FLAVOUR_PCI_VF, FLAVOUR_PHYSICAL, decode_port};
use dpu_fabric::netlink::socket::{active_feature, parse_replies, parse_sequenced};
use dpu_fabric::netlink::tc::{decode_filter, decode_qdisc, filter};
use dpu_fabric::ports::from_devlink;
use dpu_fabric::rules::Action;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_replies(data, 1);
    if let Ok(all) = parse_sequenced(data) {
        let ones = all.iter().filter(|(seq, _)| *seq == 1).count();
        assert_eq!(parse_replies(data, 1).map(|r| r.len()).ok(), Some(ones));
    }
    let _ = decode_qdisc(data);
    let _ = active_feature(data, "hw-tc-offload");
    if let Ok(port) = decode_port(data) {
        let eswitch = matches!(port.flavour, FLAVOUR_PHYSICAL | FLAVOUR_PCI_PF | FLAVOUR_PCI_VF | FLAVOUR_PCI_SF);
        assert!(port.id.is_none() || eswitch, "flavour {} has no eSwitch identity", port.flavour);
        let usable = port.id.is_some() && port.netdev.is_some() && port.ifindex.is_some();
        assert_eq!(from_devlink(vec![port], &|_| false).len(), usize::from(usable));
    }
    let name_of = |i: u32| format!("if{i}");
    if let Ok(Some(f)) = decode_filter(data, &name_of) {
        // Devices come back as "if{index}": resolve them to the same index.
        let resolve = |d: &str| {
            d.strip_prefix("if").and_then(|n| n.parse().ok()).ok_or_else(|| FabricError::NoDevice(d.to_owned()))
        };
        if let Ok(encoded) = filter(1, f.id, &f.keys, &f.actions, f.flags, &[], &resolve) {
            let again = decode_filter(&encoded, &name_of).expect("re-encoded filter decodes").expect("is a filter");
            assert_eq!(again.keys, f.keys);
            assert_eq!(again.id, f.id);
            for (before, after) in f.actions.iter().zip(&again.actions) {
                if matches!(before, Action::Ct { .. } | Action::SetDstMac(_)) {
                    assert_eq!(before, after);
                }
            }
        }
    }
});
