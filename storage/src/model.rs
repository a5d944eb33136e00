//! Validated storage intent: what the API accepted, as stored in the intent store. Namespaces and listeners are
//! children of their subsystem and are stored inside it, so a subsystem and everything it exports change
//! atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use dpu_intent::Resource;
use serde::{Deserialize, Serialize};

/// Highest namespace id the target serves.
pub const MAX_NSID: u32 = 1024;

/// An intent value that breaks a rule, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid { field: field.into(), message: message.into() })
}

/// Where a volume's blocks live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Backend {
    Malloc,
    File { path: PathBuf },
    Null,
}

/// `volumes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub block_size: u32,
    pub size_bytes: u64,
    pub backend: Backend,
}

impl Resource for VolumeSpec {
    const KIND: &'static str = "volumes";
}

impl VolumeSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !matches!(self.block_size, 512 | 4096) {
            return invalid("volume.block_size", format!("{} is not 512 or 4096", self.block_size));
        }
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(u64::from(self.block_size)) {
            return invalid(
                "volume.size_bytes",
                format!("{} is not a positive multiple of the block size {}", self.size_bytes, self.block_size),
            );
        }
        if let Backend::File { path } = &self.backend
            && !path.is_absolute()
        {
            return invalid("volume.file.path", format!("{} is not an absolute path", path.display()));
        }
        Ok(())
    }

    /// Capacity in blocks.
    pub fn blocks(&self) -> u64 {
        self.size_bytes / u64::from(self.block_size)
    }
}

/// A namespace of a subsystem, exporting one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSpec {
    pub nsid: u32,
    /// Volume id.
    pub volume: String,
    pub uuid: [u8; 16],
}

/// An NVMe/TCP listener of a subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSpec {
    pub address: SocketAddr,
}

/// `subsystems/{id}` with its namespaces and listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsystemSpec {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub allowed_hosts: BTreeSet<String>,
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceSpec>,
    #[serde(default)]
    pub listeners: BTreeMap<String, ListenerSpec>,
}

impl Resource for SubsystemSpec {
    const KIND: &'static str = "subsystems";
}

/// Checks an NVMe Qualified Name: `nqn.yyyy-mm.reverse.domain:suffix` or the UUID form, at most 223 bytes.
pub fn validate_nqn(field: &str, nqn: &str) -> Result<(), Invalid> {
    if nqn.len() > 223 {
        return invalid(field, format!("{} bytes is longer than the 223 an NQN may have", nqn.len()));
    }
    let Some(rest) = nqn.strip_prefix("nqn.") else {
        return invalid(field, format!("{nqn:?} does not start with \"nqn.\""));
    };
    let date_ok = rest.len() > 8
        && rest.as_bytes()[..4].iter().all(u8::is_ascii_digit)
        && rest.as_bytes()[4] == b'-'
        && rest.as_bytes()[5..7].iter().all(u8::is_ascii_digit)
        && rest.as_bytes()[7] == b'.';
    if !date_ok {
        return invalid(field, format!("{nqn:?} lacks the yyyy-mm. date after \"nqn.\""));
    }
    if !nqn.is_ascii() || nqn.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return invalid(field, format!("{nqn:?} must be printable ASCII without spaces"));
    }
    Ok(())
}

impl SubsystemSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_nqn("subsystem.nqn", &self.nqn)?;
        if self.nqn == DISCOVERY_NQN {
            return invalid("subsystem.nqn", "is the well-known discovery NQN");
        }
        let ascii = |field: &str, value: &str, max: usize| {
            if value.is_empty() || value.len() > max || !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                invalid(field, format!("{value:?} must be 1-{max} printable ASCII characters"))
            } else {
                Ok(())
            }
        };
        ascii("subsystem.serial", &self.serial, 20)?;
        ascii("subsystem.model", &self.model, 40)?;
        for host in &self.allowed_hosts {
            validate_nqn("subsystem.allowed_hosts", host)?;
        }
        if !self.allow_any_host && self.allowed_hosts.is_empty() {
            return invalid("subsystem.allowed_hosts", "is empty and allow_any_host is false: no host could connect");
        }
        let mut nsids = BTreeSet::new();
        for (id, ns) in &self.namespaces {
            if !(1..=MAX_NSID).contains(&ns.nsid) {
                return invalid(format!("namespace {id}: nsid"), format!("{} is not in 1..={MAX_NSID}", ns.nsid));
            }
            if !nsids.insert(ns.nsid) {
                return invalid(format!("namespace {id}: nsid"), format!("{} is used twice", ns.nsid));
            }
        }
        Ok(())
    }

    /// The lowest namespace id not in use.
    pub fn free_nsid(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.namespaces.values().map(|n| n.nsid).collect();
        (1..=MAX_NSID).find(|n| !used.contains(n))
    }
}

/// The well-known NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

#[cfg(test)]
mod tests {
    use super::*;

    fn subsystem() -> SubsystemSpec {
        SubsystemSpec {
            nqn: "nqn.2026-11.io.dpu-agent:images".into(),
            serial: "DPU0001".into(),
            model: "dpu-agent".into(),
            allow_any_host: true,
            allowed_hosts: BTreeSet::new(),
            namespaces: BTreeMap::new(),
            listeners: BTreeMap::new(),
        }
    }

    #[test]
    fn nqn_rules() {
        validate_nqn("f", "nqn.2014-08.org.nvmexpress:uuid:6f3a7d4c-0000-4000-8000-000000000001").unwrap();
        assert!(validate_nqn("f", "iqn.2014-08.org:x").is_err());
        assert!(validate_nqn("f", "nqn.14-08.org:x").is_err());
        assert!(validate_nqn("f", &format!("nqn.2014-08.{}", "a".repeat(220))).is_err());
        assert!(validate_nqn("f", "nqn.2014-08.org:a b").is_err());
    }

    #[test]
    fn subsystem_rules() {
        let mut s = subsystem();
        s.validate().unwrap();
        s.serial = "x".repeat(21);
        assert_eq!(s.validate().unwrap_err().field, "subsystem.serial");
        s = subsystem();
        s.allow_any_host = false;
        assert_eq!(s.validate().unwrap_err().field, "subsystem.allowed_hosts");
        s = subsystem();
        s.namespaces.insert("a".into(), NamespaceSpec { nsid: 1, volume: "v".into(), uuid: [0; 16] });
        s.namespaces.insert("b".into(), NamespaceSpec { nsid: 1, volume: "w".into(), uuid: [1; 16] });
        assert!(s.validate().unwrap_err().message.contains("used twice"));
        s.namespaces.remove("b");
        assert_eq!(s.free_nsid(), Some(2));
    }

    #[test]
    fn volume_rules() {
        let v = VolumeSpec { block_size: 512, size_bytes: 1 << 20, backend: Backend::Malloc };
        v.validate().unwrap();
        assert_eq!(v.blocks(), 2048);
        let bad = VolumeSpec { size_bytes: 1000, ..v.clone() };
        assert_eq!(bad.validate().unwrap_err().field, "volume.size_bytes");
        let rel = VolumeSpec { backend: Backend::File { path: "x.img".into() }, ..v };
        assert_eq!(rel.validate().unwrap_err().field, "volume.file.path");
    }
}
