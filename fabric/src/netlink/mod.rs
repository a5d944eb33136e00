//! Netlink from the agent, without shelling out: attribute encoding on top of `netlink-packet-core`, a blocking
//! `netlink-sys` socket with extended acks, the traffic-control messages (clsact, flower, actions) and ethtool
//! feature reads, the VXLAN device the fabric creates, and the devlink port inventory over generic netlink.

pub mod attr;
pub mod devlink;
pub mod link;
pub mod socket;
pub mod tc;
