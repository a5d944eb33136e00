//! The eSwitch port inventory: which netdev represents which port.
//!
//! The first source is devlink ([`crate::netlink::devlink`]): each port's flavour (physical, PCI PF/VF/SF),
//! controller, PF and VF/SF numbers and its representor netdev, as the driver registered them. When devlink
//! reports no such port (no devlink in the kernel, or a switch without devlink ports), sysfs is read: on a
//! BlueField in switchdev mode each representor has a `phys_port_name` (`p0`, `pf0hpf`, `pf0vf3`, `c1pf0vf3`)
//! and a `phys_switch_id`; that name is the port's identity. The simulated switch uses veth pairs, which have
//! neither: there a netdev named like a port (`pf0vf3`) stands for it, or a mapping file names the netdev of
//! each port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::FabricError;
use crate::model::PortId;
use crate::netlink::devlink::{DevlinkPort, flavour_name};

/// One port of the eSwitch as found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub id: PortId,
    /// Representor netdev name (changes across renames; never used as identity).
    pub netdev: String,
    pub ifindex: u32,
    /// The netdev has `hw-tc-offload` on: rules are installed `skip_sw` (in hardware only).
    pub hw_tc_offload: bool,
    /// Where the port's identity came from.
    pub source: PortSource,
}

/// Where a port's identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortSource {
    /// devlink's port flavour, controller, PF and VF/SF numbers.
    Devlink,
    /// The netdev's `phys_port_name` in sysfs.
    PhysPortName,
    /// The mapping file.
    Mapping,
    /// The netdev's own name (simulated switch).
    NetdevName,
}

impl PortSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Devlink => "devlink",
            Self::PhysPortName => "phys_port_name",
            Self::Mapping => "mapping",
            Self::NetdevName => "netdev_name",
        }
    }
}

/// Which inventory source to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventorySource {
    /// devlink when it reports eSwitch ports with a netdev, sysfs otherwise.
    #[default]
    Auto,
    /// devlink only: a kernel without devlink is an error.
    Devlink,
    /// sysfs only (`phys_port_name`, the mapping file, port-named netdevs).
    Sysfs,
}

/// How ports are discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryConfig {
    /// Usually `/sys/class/net`.
    pub net_dir: PathBuf,
    /// JSON object `{"pf0vf3": "veth-pod3", ...}`: port name → netdev, for netdevs that carry no port name.
    pub mapping: Option<PathBuf>,
    /// Accept netdevs named like a port (`pf0vf3`, `p0`) that have no `phys_port_name` (the simulated switch).
    pub port_named_netdevs: bool,
    /// devlink, sysfs, or devlink with the sysfs fallback.
    pub source: InventorySource,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            net_dir: PathBuf::from("/sys/class/net"),
            mapping: None,
            port_named_netdevs: true,
            source: InventorySource::Auto,
        }
    }
}

/// The eSwitch ports among devlink's: physical, PCI PF, VF and SF ports that have a netdev. When two ports
/// claim the same identity (two devlink devices), the first in (device, index) order wins.
pub fn from_devlink(mut ports: Vec<DevlinkPort>, offload: &dyn Fn(&str) -> bool) -> Vec<Port> {
    ports.sort_by(|a, b| (&a.device, a.index).cmp(&(&b.device, b.index)));
    let mut found: BTreeMap<PortId, Port> = BTreeMap::new();
    for p in ports {
        let (Some(id), Some(netdev), Some(ifindex)) = (p.id, p.netdev.clone(), p.ifindex) else {
            tracing::debug!(
                port = %p.handle(),
                flavour = flavour_name(p.flavour),
                "devlink port without an eSwitch identity or netdev: not a fabric port"
            );
            continue;
        };
        if let Some(first) = found.get(&id) {
            tracing::warn!(
                port = %id,
                netdev,
                kept = first.netdev,
                "two devlink ports claim the same identity; keeping the first"
            );
            continue;
        }
        found.insert(id, Port { id, hw_tc_offload: offload(&netdev), netdev, ifindex, source: PortSource::Devlink });
    }
    found.into_values().collect()
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// Reads the mapping file.
pub fn read_mapping(path: &Path) -> Result<BTreeMap<PortId, String>, FabricError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| FabricError::Inventory { path: path.display().to_string(), source })?;
    let raw: BTreeMap<String, String> = serde_json::from_str(&text).map_err(|e| FabricError::Mapping {
        path: path.display().to_string(),
        message: format!("not a JSON object of port name to netdev: {e}"),
    })?;
    raw.into_iter()
        .map(|(port, dev)| {
            let id = port
                .parse::<PortId>()
                .map_err(|e| FabricError::Mapping { path: path.display().to_string(), message: e.to_string() })?;
            Ok((id, dev))
        })
        .collect()
}

/// Scans `config.net_dir`. `offload(netdev)` tells whether a netdev has `hw-tc-offload` on. When two netdevs
/// claim the same port, the one with a kernel-reported `phys_port_name` wins, then the lower ifindex.
pub fn scan(config: &InventoryConfig, offload: &dyn Fn(&str) -> bool) -> Result<Vec<Port>, FabricError> {
    let mapping = match &config.mapping {
        Some(path) => read_mapping(path)?,
        None => BTreeMap::new(),
    };
    let mapped: BTreeMap<&str, PortId> = mapping.iter().map(|(id, dev)| (dev.as_str(), *id)).collect();
    let entries = std::fs::read_dir(&config.net_dir)
        .map_err(|source| FabricError::Inventory { path: config.net_dir.display().to_string(), source })?;
    // (port) → (rank, port); lower rank wins.
    let mut found: BTreeMap<PortId, ((u8, u32), Port)> = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(netdev) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let dir = entry.path();
        let Some(ifindex) = read_trimmed(&dir.join("ifindex")).and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let reported = read_trimmed(&dir.join("phys_port_name")).and_then(|n| n.parse::<PortId>().ok());
        let (rank, id, source) = if let Some(id) = reported {
            (0, id, PortSource::PhysPortName)
        } else if let Some(id) = mapped.get(netdev.as_str()) {
            (1, *id, PortSource::Mapping)
        } else if config.port_named_netdevs
            && let Ok(id) = netdev.parse::<PortId>()
        {
            (2, id, PortSource::NetdevName)
        } else {
            continue;
        };
        let port = Port { id, hw_tc_offload: offload(&netdev), netdev, ifindex, source };
        match found.get(&id) {
            Some(((r, i), _)) if (*r, *i) <= (rank, ifindex) => {}
            _ => {
                found.insert(id, ((rank, ifindex), port));
            }
        }
    }
    Ok(found.into_values().map(|(_, p)| p).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netdev(root: &Path, name: &str, ifindex: u32, port_name: Option<&str>) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ifindex"), format!("{ifindex}\n")).unwrap();
        if let Some(n) = port_name {
            std::fs::write(dir.join("phys_port_name"), format!("{n}\n")).unwrap();
        }
    }

    #[test]
    fn identity_comes_from_the_port_name_not_the_netdev() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        netdev(root, "eth7", 7, Some("pf0vf3"));
        netdev(root, "enp3s0f0r1", 8, Some("c1pf0vf1"));
        netdev(root, "p0", 2, Some("p0"));
        netdev(root, "pf0vf5", 9, None); // simulated: named like its port
        netdev(root, "pf0vf3", 10, None); // loses to eth7, which the kernel says is pf0vf3
        netdev(root, "veth-a", 11, None); // mapped below
        netdev(root, "lo", 1, None);
        let mapping = root.join("ports.json");
        std::fs::write(&mapping, r#"{"pf0vf6": "veth-a"}"#).unwrap();
        let config = InventoryConfig { net_dir: root.into(), mapping: Some(mapping), ..InventoryConfig::default() };
        let ports = scan(&config, &|dev| dev == "eth7").unwrap();
        let names: Vec<(String, &str, bool, &str)> =
            ports.iter().map(|p| (p.id.to_string(), p.netdev.as_str(), p.hw_tc_offload, p.source.as_str())).collect();
        assert_eq!(
            names,
            vec![
                ("p0".into(), "p0", false, "phys_port_name"),
                ("pf0vf3".into(), "eth7", true, "phys_port_name"),
                ("pf0vf5".into(), "pf0vf5", false, "netdev_name"),
                ("pf0vf6".into(), "veth-a", false, "mapping"),
                ("c1pf0vf1".into(), "enp3s0f0r1", false, "phys_port_name"),
            ]
        );
        let strict = InventoryConfig { net_dir: root.into(), port_named_netdevs: false, ..InventoryConfig::default() };
        assert_eq!(scan(&strict, &|_| false).unwrap().len(), 3);
    }

    #[test]
    fn devlink_ports_are_identified_by_flavour_numbers() {
        use crate::netlink::attr::Attr;
        use crate::netlink::devlink::tests::{netdev, port_message, vf};
        use crate::netlink::devlink::{ATTR_PORT_NUMBER, FLAVOUR_CPU, FLAVOUR_PCI_VF, FLAVOUR_PHYSICAL, decode_port};
        let messages = [
            port_message("pci/0000:03:00.0", 1, FLAVOUR_PCI_VF, [vf(0, 0, 2), netdev("eth9", 12)].concat()),
            port_message(
                "pci/0000:03:00.0",
                0,
                FLAVOUR_PHYSICAL,
                [vec![Attr::u32(ATTR_PORT_NUMBER, 0)], netdev("enp3s0f0np0", 3)].concat(),
            ),
            port_message("pci/0000:03:00.0", 2, FLAVOUR_PCI_VF, vf(0, 0, 3)), // no netdev yet
            port_message("pci/0000:03:00.0", 4, FLAVOUR_CPU, netdev("cpu0", 20)),
            // Another device claiming pf0vf2: the first device's port is kept.
            port_message("pci/0000:04:00.0", 1, FLAVOUR_PCI_VF, [vf(0, 0, 2), netdev("eth10", 13)].concat()),
        ];
        let decoded: Vec<DevlinkPort> = messages.iter().map(|m| decode_port(m).unwrap()).collect();
        let ports = from_devlink(decoded, &|dev| dev == "eth9");
        let names: Vec<(String, &str, u32, bool, PortSource)> =
            ports.iter().map(|p| (p.id.to_string(), p.netdev.as_str(), p.ifindex, p.hw_tc_offload, p.source)).collect();
        assert_eq!(
            names,
            vec![
                ("p0".into(), "enp3s0f0np0", 3, false, PortSource::Devlink),
                ("pf0vf2".into(), "eth9", 12, true, PortSource::Devlink),
            ]
        );
        assert_eq!(InventoryConfig::default().source, InventorySource::Auto);
    }

    #[test]
    fn bad_mapping_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, r#"{"vf3": "x"}"#).unwrap();
        assert!(matches!(read_mapping(&path), Err(FabricError::Mapping { .. })));
        std::fs::write(&path, "[]").unwrap();
        assert!(matches!(read_mapping(&path), Err(FabricError::Mapping { .. })));
        let missing = InventoryConfig { net_dir: dir.path().join("none"), ..InventoryConfig::default() };
        assert!(matches!(scan(&missing, &|_| false), Err(FabricError::Inventory { .. })));
    }
}
