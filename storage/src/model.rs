//! Validated storage intent: what the API accepted, as stored in the intent store. Namespaces and listeners are
//! children of their subsystem and are stored inside it, so a subsystem and everything it exports change
//! atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use dpu_intent::Resource;

use crate::image::Digest;
use crate::image::oci::Platform;
use crate::image::registry::{Credentials, Reference};
use dpu_nvme::spec::fabrics;
use serde::{Deserialize, Serialize};

/// Highest namespace id the target serves.
pub const MAX_NSID: u32 = 1024;

pub use dpu_intent::Invalid;
use dpu_intent::invalid;

/// Where a volume's blocks live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Backend {
    Malloc,
    File {
        path: PathBuf,
    },
    Null,
    /// AES-256-XTS over another volume, in dm-crypt's plain `aes-xts-plain64` layout.
    Encrypted(EncryptedSpec),
    /// A bdev of the agent's SPDK: one its JSON config made, or one the agent creates with an SPDK module.
    Spdk(SpdkBdevSpec),
}

/// An SPDK bdev used as a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpdkBdevSpec {
    /// Name of the bdev (for `nvme`, of the controller; its first namespace is the bdev `<name>n1`).
    pub bdev: String,
    /// How the agent creates the bdev (and deletes it with the volume); `None`: the bdev exists already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<SpdkCreate>,
}

/// SPDK modules the agent creates bdevs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "module")]
pub enum SpdkCreate {
    /// SPDK's RAM bdev, the volume's size.
    Malloc,
    /// Linux AIO on a file or block device.
    Aio { path: PathBuf },
    /// SPDK's user-space NVMe driver on the PCIe function at `traddr` (e.g. `0000:03:00.0`).
    Nvme { traddr: String },
}

impl SpdkBdevSpec {
    /// The bdev I/O goes to.
    pub fn bdev_name(&self) -> String {
        match self.create {
            Some(SpdkCreate::Nvme { .. }) => format!("{}n1", self.bdev),
            _ => self.bdev.clone(),
        }
    }
}

/// What serves a subsystem's hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// The agent's own NVMe/TCP target.
    #[default]
    Native,
    /// SPDK's NVMe-oF target, in the agent's process (feature `spdk`, `[storage.spdk]` configured).
    Spdk,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Native => "native",
            Engine::Spdk => "spdk",
        }
    }
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "native" => Ok(Engine::Native),
            "spdk" => Ok(Engine::Spdk),
            other => Err(format!("{other:?} is not an engine (native, spdk)")),
        }
    }
}

/// How the agent starts SPDK (`[storage.spdk]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpdkConfig {
    /// Reactor core mask (`0x1`, `[0-1]`): the cores SPDK polls on, all the time.
    #[serde(default = "default_spdk_cores")]
    pub cores: String,
    /// Memory for SPDK's buffers, in MiB (its buffer pools alone take about 250 MiB).
    #[serde(default = "default_spdk_memory")]
    pub mem_size_mib: u32,
    /// Use hugepages (set them up first); false runs SPDK on ordinary memory (DPDK `--no-huge`).
    #[serde(default)]
    pub hugepages: bool,
    /// Let SPDK claim PCI devices (user-space NVMe); false leaves every device to the kernel.
    #[serde(default)]
    pub pci: bool,
    /// An SPDK JSON config applied at start (bdevs its modules create, named by `spdk` volumes).
    #[serde(default)]
    pub json_config: Option<PathBuf>,
}

fn default_spdk_cores() -> String {
    "0x1".into()
}

fn default_spdk_memory() -> u32 {
    1024
}

impl Default for SpdkConfig {
    fn default() -> Self {
        SpdkConfig {
            cores: default_spdk_cores(),
            mem_size_mib: default_spdk_memory(),
            hugepages: false,
            pci: false,
            json_config: None,
        }
    }
}

/// An encrypted volume: its base (holding only ciphertext), its key and its data unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedSpec {
    /// Id of the base volume; same block size and capacity.
    pub base: String,
    /// Id of the `cryptoKeys` resource (an AES-256-XTS key).
    pub key: String,
    /// Bytes per XTS data unit (the tweak counts these): 512 or 4096, dividing the block size.
    pub data_unit: u32,
    #[serde(default)]
    pub policy: dpu_crypto::policy::Policy,
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
        match &self.backend {
            Backend::File { path } if !path.is_absolute() => {
                return invalid("volume.file.path", format!("{} is not an absolute path", path.display()));
            }
            Backend::Spdk(b) => {
                let name_ok = !b.bdev.is_empty()
                    && b.bdev.len() <= 64
                    && b.bdev.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c));
                if !name_ok {
                    return invalid(
                        "volume.spdk.bdev",
                        format!("{:?} is not a bdev name (1-64 of A-Z a-z 0-9 - _ . :)", b.bdev),
                    );
                }
                match &b.create {
                    Some(SpdkCreate::Aio { path }) if !path.is_absolute() => {
                        return invalid("volume.spdk.aio.path", format!("{} is not an absolute path", path.display()));
                    }
                    Some(SpdkCreate::Nvme { traddr }) if traddr.is_empty() => {
                        return invalid("volume.spdk.nvme.traddr", "is empty: give the PCIe address (0000:03:00.0)");
                    }
                    _ => {}
                }
            }
            Backend::Encrypted(e) => {
                if let Err(err) = dpu_intent::validate_id(&e.base) {
                    return invalid("volume.encrypted.base", err.to_string());
                }
                if let Err(err) = dpu_intent::validate_id(&e.key) {
                    return invalid("volume.encrypted.key", err.to_string());
                }
                if !matches!(e.data_unit, 512 | 4096) || e.data_unit > self.block_size {
                    return invalid(
                        "volume.encrypted.data_unit_size",
                        format!("{} is not 512 or 4096 and at most the block size {}", e.data_unit, self.block_size),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Capacity in blocks.
    pub fn blocks(&self) -> u64 {
        self.size_bytes / u64::from(self.block_size)
    }
}

/// A namespace of a subsystem, exporting one volume or one layer of converted images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceSpec {
    pub nsid: u32,
    /// Volume id; empty when the namespace serves an image layer.
    pub volume: String,
    pub uuid: [u8; 16],
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<LayerRef>,
}

/// An image layer served by a namespace, shared by every exported image that has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// Digest of the OCI layer the converted layer was made from.
    pub source: Digest,
    /// Ids of the images exported with this layer here.
    pub images: BTreeSet<String>,
}

/// `images/{id}`: a converted image the DPU resolves in its registry and can export to subsystems.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Reference of the converted image.
    pub reference: String,
    /// Id of the registry credential to use; anonymous when `None`.
    #[serde(default)]
    pub credentials: Option<String>,
    /// Platform chosen when the reference names an index (`os/arch[/variant]`).
    pub platform: String,
}

impl Resource for ImageSpec {
    const KIND: &'static str = "images";
}

/// The platform images are resolved for when none is given: the host's, which on a DPU is usually x86_64.
pub const DEFAULT_IMAGE_PLATFORM: &str = "linux/amd64";

impl ImageSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Err(e) = self.reference.parse::<Reference>() {
            return invalid("image.reference", e.to_string());
        }
        if let Err(e) = self.platform.parse::<Platform>() {
            return invalid("image.platform", e.to_string());
        }
        if let Some(id) = &self.credentials
            && let Err(e) = dpu_intent::validate_id(id)
        {
            return invalid("image.credentials", e.to_string());
        }
        Ok(())
    }

    /// The parsed reference and platform (valid once [`ImageSpec::validate`] passed).
    pub fn parsed(&self) -> Result<(Reference, Platform), Invalid> {
        let reference = self
            .reference
            .parse::<Reference>()
            .map_err(|e| Invalid { field: "image.reference".into(), message: e.to_string() })?;
        let platform = self
            .platform
            .parse::<Platform>()
            .map_err(|e| Invalid { field: "image.platform".into(), message: e.to_string() })?;
        Ok((reference, platform))
    }
}

/// `registryCredentials/{id}`: write-only secrets for registries. `Debug` never shows the secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredentialSpec {
    pub username: String,
    pub password: String,
    pub token: String,
}

impl Resource for RegistryCredentialSpec {
    const KIND: &'static str = "registryCredentials";
}

impl std::fmt::Debug for RegistryCredentialSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentialSpec")
            .field("username", &self.username)
            .field("has_secret", &self.has_secret())
            .finish()
    }
}

impl RegistryCredentialSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        match (self.password.is_empty(), self.token.is_empty()) {
            (false, false) => invalid("credential", "give a password or a token, not both"),
            (true, true) => invalid("credential", "a password (with username) or a token is required"),
            (false, true) if self.username.is_empty() => invalid("credential.username", "is required with a password"),
            _ => Ok(()),
        }
    }

    pub fn has_secret(&self) -> bool {
        !self.password.is_empty() || !self.token.is_empty()
    }

    /// The credentials the registry client sends.
    pub fn credentials(&self) -> Credentials {
        if self.token.is_empty() {
            Credentials::Basic { username: self.username.clone(), password: self.password.clone() }
        } else {
            Credentials::Token(self.token.clone())
        }
    }
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
    /// What serves the subsystem.
    #[serde(default, skip_serializing_if = "is_native")]
    pub engine: Engine,
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceSpec>,
    #[serde(default)]
    pub listeners: BTreeMap<String, ListenerSpec>,
}

fn is_native(engine: &Engine) -> bool {
    *engine == Engine::Native
}

impl Resource for SubsystemSpec {
    const KIND: &'static str = "subsystems";
}

/// Checks an NVMe Qualified Name with the wire rules of `dpu-nvme` (`nqn.yyyy-mm.reverse.domain:suffix` or the
/// UUID form, at most 223 bytes), and accepts only printable ASCII without spaces, so an NQN can be typed and
/// logged unambiguously.
pub fn validate_nqn(field: &str, nqn: &str) -> Result<(), Invalid> {
    if let Err(e) = fabrics::validate_nqn(nqn) {
        return invalid(field, format!("{nqn:?}: {e}"));
    }
    if !nqn.bytes().all(|b| b.is_ascii_graphic()) {
        return invalid(field, format!("{nqn:?} must be printable ASCII without spaces"));
    }
    Ok(())
}

/// A random (version 4) UUID, for namespaces created without one and for host identities.
pub fn random_uuid() -> [u8; 16] {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    let (a, b) = (state.hash_one(std::process::id()), state.hash_one(std::time::SystemTime::now()));
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&a.to_le_bytes());
    id[8..].copy_from_slice(&b.to_le_bytes());
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// RFC 4122 text form: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// Parses the text form (hyphens optional); `None` if it is not 32 hex digits.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

impl SubsystemSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_nqn("subsystem.nqn", &self.nqn)?;
        if self.nqn == fabrics::DISCOVERY_NQN {
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
            engine: Engine::Native,
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
        assert!(validate_nqn("f", &format!("nqn.2014-08.org:{}", "\u{e9}")).is_err());
    }

    #[test]
    fn uuids_round_trip() {
        let u = random_uuid();
        assert_eq!(u[6] >> 4, 4, "version 4");
        assert_eq!(parse_uuid(&format_uuid(&u)), Some(u));
        assert_ne!(random_uuid(), u);
        assert_eq!(parse_uuid("xyz"), None);
        assert_eq!(parse_uuid(&"g".repeat(32)), None);
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
        s.namespaces.insert("a".into(), NamespaceSpec { nsid: 1, volume: "v".into(), uuid: [0; 16], layer: None });
        s.namespaces.insert("b".into(), NamespaceSpec { nsid: 1, volume: "w".into(), uuid: [1; 16], layer: None });
        assert!(s.validate().unwrap_err().message.contains("used twice"));
        s.namespaces.remove("b");
        assert_eq!(s.free_nsid(), Some(2));
    }

    #[test]
    fn image_rules() {
        let image = ImageSpec {
            reference: "127.0.0.1:5000/app:v1-lazy".into(),
            credentials: None,
            platform: DEFAULT_IMAGE_PLATFORM.into(),
        };
        image.validate().unwrap();
        let bad = ImageSpec { reference: "UPPER/Case".into(), ..image.clone() };
        assert_eq!(bad.validate().unwrap_err().field, "image.reference");
        let bad = ImageSpec { platform: "amd64".into(), ..image.clone() };
        assert_eq!(bad.validate().unwrap_err().field, "image.platform");
        let bad = ImageSpec { credentials: Some("Not An Id".into()), ..image };
        assert_eq!(bad.validate().unwrap_err().field, "image.credentials");

        let c = RegistryCredentialSpec { username: "u".into(), password: "hunter2".into(), token: String::new() };
        c.validate().unwrap();
        assert!(!format!("{c:?}").contains("hunter2"), "secrets never reach Debug output");
        assert!(RegistryCredentialSpec { username: String::new(), ..c.clone() }.validate().is_err());
        assert!(RegistryCredentialSpec { token: "t".into(), ..c.clone() }.validate().is_err());
        let none = RegistryCredentialSpec { username: "u".into(), password: String::new(), token: String::new() };
        assert!(none.validate().is_err());
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
