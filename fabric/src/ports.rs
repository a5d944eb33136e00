//! The eSwitch port inventory: which netdev represents which port.
//!
//! On a BlueField in switchdev mode each representor has a `phys_port_name` (`p0`, `pf0hpf`, `pf0vf3`,
//! `c1pf0vf3`) and a `phys_switch_id`; that name is the port's identity. The simulated switch uses veth pairs,
//! which have neither: there a netdev named like a port (`pf0vf3`) stands for it, or a mapping file names the
//! netdev of each port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::FabricError;
use crate::model::PortId;

/// One port of the eSwitch as found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub id: PortId,
    /// Representor netdev name (changes across renames; never used as identity).
    pub netdev: String,
    pub ifindex: u32,
    /// The netdev has `hw-tc-offload` on: rules are installed `skip_sw` (in hardware only).
    pub hw_tc_offload: bool,
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
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self { net_dir: PathBuf::from("/sys/class/net"), mapping: None, port_named_netdevs: true }
    }
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
        let (rank, id) = if let Some(id) = reported {
            (0, id)
        } else if let Some(id) = mapped.get(netdev.as_str()) {
            (1, *id)
        } else if config.port_named_netdevs
            && let Ok(id) = netdev.parse::<PortId>()
        {
            (2, id)
        } else {
            continue;
        };
        let port = Port { id, hw_tc_offload: offload(&netdev), netdev, ifindex };
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
        let config = InventoryConfig { net_dir: root.into(), mapping: Some(mapping), port_named_netdevs: true };
        let ports = scan(&config, &|dev| dev == "eth7").unwrap();
        let names: Vec<(String, &str, bool)> =
            ports.iter().map(|p| (p.id.to_string(), p.netdev.as_str(), p.hw_tc_offload)).collect();
        assert_eq!(
            names,
            vec![
                ("p0".into(), "p0", false),
                ("pf0vf3".into(), "eth7", true),
                ("pf0vf5".into(), "pf0vf5", false),
                ("pf0vf6".into(), "veth-a", false),
                ("c1pf0vf1".into(), "enp3s0f0r1", false),
            ]
        );
        let strict = InventoryConfig { net_dir: root.into(), mapping: None, port_named_netdevs: false };
        assert_eq!(scan(&strict, &|_| false).unwrap().len(), 3);
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
