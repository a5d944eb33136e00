//! `dpu-snapshotter` configuration: a TOML file, every field optional.
//!
//! ```toml
//! socket = "/run/dpu-snapshotter/snapshotter.sock"   # where containerd's proxy_plugins address points
//! root = "/var/lib/dpu-snapshotter"                   # metadata and snapshot directories
//!
//! [dpu]                                  # optional: layers served by the DPU (without it, every layer is pulled)
//! api = "https://192.168.100.2:50051"    # the DPU agent's API; https = mTLS with the three files below
//! ca = "/etc/dpu-snapshotter/ca.pem"
//! cert = "/etc/dpu-snapshotter/host.pem"
//! key = "/etc/dpu-snapshotter/host.key"
//! subsystem = "host0"                    # the agent's subsystem the layers are exported into
//! ```
//!
//! See [`DpuConfig`] for the rest of the `[dpu]` table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const DEFAULT_SOCKET: &str = "/run/dpu-snapshotter/snapshotter.sock";
pub const DEFAULT_ROOT: &str = "/var/lib/dpu-snapshotter";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The unix socket the gRPC service listens on.
    pub socket: PathBuf,
    /// The directory holding snapshot metadata and layers; must be on a filesystem overlayfs accepts as upper
    /// layer (ext4, xfs, …).
    pub root: PathBuf,
    /// Where remote layers come from; `None`: every layer is downloaded and unpacked by containerd.
    pub dpu: Option<DpuConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self { socket: PathBuf::from(DEFAULT_SOCKET), root: PathBuf::from(DEFAULT_ROOT), dpu: None }
    }
}

/// The `[dpu]` table: how to reach the DPU agent that serves image layers as NVMe namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpuConfig {
    /// The agent's gRPC API, `https://host:port` (mTLS) or `http://host:port` (plaintext, loopback only).
    pub api: String,
    /// CA certificate that signed the agent's certificate (PEM); required for https.
    pub ca: Option<PathBuf>,
    /// This host's client certificate and key (PEM), for agents that require mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to check in the agent's certificate when it differs from the API's host.
    pub server_name: Option<String>,
    /// The agent's subsystem id (`host0` or `subsystems/host0`) the layers are exported into. It must allow
    /// this host's NQN and have a TCP listener.
    pub subsystem: String,
    /// The address of that listener as this host reaches it. Default: the host of `api`.
    pub target_address: Option<String>,
    #[serde(default = "default_target_port")]
    pub target_port: u16,
    /// This host's NQN for `nvme connect`. Default: nvme-cli's (`/etc/nvme/hostnqn`).
    pub host_nqn: Option<String>,
    /// `os/architecture` chosen from multi-platform images. Default: this host's (`linux/amd64`,
    /// `linux/arm64`).
    pub platform: Option<String>,
    /// The converted image is the source's repository tagged `<source tag><suffix>` (`sha256-<hex><suffix>`
    /// for a source pinned by digest).
    #[serde(default = "default_converted_suffix")]
    pub converted_suffix: String,
    /// Registry hosts as this host names them → as the DPU reaches them (mirrors, other networks).
    #[serde(default)]
    pub registries: BTreeMap<String, String>,
    /// `read_ahead_kb` of each layer's block device: what the kernel reads ahead is fetched from the registry.
    #[serde(default = "default_readahead_kb")]
    pub readahead_kb: u32,
    /// How long finding or converting an image and exporting it may take before containerd pulls it instead.
    #[serde(default = "default_image_timeout")]
    pub image_timeout_seconds: u64,
    /// How long an exported layer's namespace may take to appear on this host.
    #[serde(default = "default_device_timeout")]
    pub device_timeout_seconds: u64,
}

fn default_target_port() -> u16 {
    4420
}
fn default_converted_suffix() -> String {
    "-lazy".to_owned()
}
fn default_readahead_kb() -> u32 {
    32
}
fn default_image_timeout() -> u64 {
    900
}
fn default_device_timeout() -> u64 {
    30
}

impl DpuConfig {
    /// The subsystem's resource name, `subsystems/<id>`.
    pub fn subsystem_name(&self) -> String {
        let id = self.subsystem.strip_prefix("subsystems/").unwrap_or(&self.subsystem);
        format!("subsystems/{id}")
    }

    /// `linux/<architecture of this host>` unless configured.
    pub fn platform(&self) -> String {
        self.platform.clone().unwrap_or_else(|| {
            let arch = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            };
            format!("linux/{arch}")
        })
    }

    /// The NVMe/TCP listener's address: configured, or the API URL's host.
    pub fn target_address(&self) -> Option<String> {
        if let Some(address) = &self.target_address {
            return Some(address.clone());
        }
        let rest = self.api.split_once("://")?.1;
        let authority = rest.split('/').next()?;
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split_once(']')?.0,
            None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
        };
        (!host.is_empty()).then(|| host.to_owned())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: String| Err(ConfigError::Invalid(format!("[dpu] {what}")));
        let tls = self.api.starts_with("https://");
        if !tls && !self.api.starts_with("http://") {
            return invalid(format!("api {:?} is not an http:// or https:// URL", self.api));
        }
        if tls && self.ca.is_none() {
            return invalid("api is https but no ca is given".into());
        }
        if self.cert.is_some() != self.key.is_some() {
            return invalid("cert and key go together".into());
        }
        for (name, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return invalid(format!("{name} {} is not an absolute path", path.display()));
            }
        }
        let id = self.subsystem.strip_prefix("subsystems/").unwrap_or(&self.subsystem);
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return invalid(format!("subsystem {:?} is not a resource id", self.subsystem));
        }
        if self.target_address().is_none() {
            return invalid("target_address is missing and api names no host".into());
        }
        let suffix_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if self.converted_suffix.is_empty()
            || self.converted_suffix.len() > 32
            || !self.converted_suffix.chars().all(suffix_ok)
        {
            return invalid(format!("converted_suffix {:?} is not 1-32 tag characters", self.converted_suffix));
        }
        if self.image_timeout_seconds == 0 || self.device_timeout_seconds == 0 {
            return invalid("timeouts must be positive".into());
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Self::parse(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Both paths must be absolute (the service usually runs from systemd, whose working directory is `/`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, path) in [("socket", &self.socket), ("root", &self.root)] {
            if !path.is_absolute() {
                return Err(ConfigError::Invalid(format!("{name} {} is not an absolute path", path.display())));
            }
        }
        if self.socket.starts_with(self.root.join("snapshots")) || self.socket.starts_with(self.root.join("metadata")) {
            return Err(ConfigError::Invalid(format!(
                "socket {} is inside the snapshot data of root {}",
                self.socket.display(),
                self.root.display()
            )));
        }
        if let Some(dpu) = &self.dpu {
            dpu.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config, Config::default());
        config.validate().unwrap();
    }

    #[test]
    fn fields_and_unknown_fields() {
        let config = Config::parse("socket = \"/tmp/s.sock\"\nroot = \"/srv/snap\"\n").unwrap();
        assert_eq!(config.socket, Path::new("/tmp/s.sock"));
        assert_eq!(config.root, Path::new("/srv/snap"));
        let err = Config::parse("sockt = \"/tmp/s.sock\"\n").unwrap_err();
        assert!(err.to_string().contains("sockt"), "{err}");
    }

    #[test]
    fn relative_or_nested_paths_are_refused() {
        let relative = Config { root: PathBuf::from("data"), ..Config::default() };
        assert!(relative.validate().unwrap_err().to_string().contains("root"));
        let nested =
            Config { socket: PathBuf::from("/srv/r/snapshots/s.sock"), root: PathBuf::from("/srv/r"), dpu: None };
        assert!(nested.validate().is_err());
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "root = 5\n").unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(err.to_string().contains("c.toml"));
        let missing = Config::load(&dir.path().join("absent.toml")).unwrap_err();
        assert!(matches!(missing, ConfigError::Read { .. }));
    }

    #[test]
    fn the_dpu_table() {
        let text = r#"
            [dpu]
            api = "https://10.0.2.2:50051"
            ca = "/etc/dpu/ca.pem"
            cert = "/etc/dpu/host.pem"
            key = "/etc/dpu/host.key"
            subsystem = "subsystems/host0"
            [dpu.registries]
            "10.0.2.2:5000" = "127.0.0.1:5000"
        "#;
        let config = Config::parse(text).unwrap();
        config.validate().unwrap();
        let dpu = config.dpu.unwrap();
        assert_eq!(dpu.subsystem_name(), "subsystems/host0");
        assert_eq!(dpu.target_address().as_deref(), Some("10.0.2.2"));
        assert_eq!((dpu.target_port, dpu.readahead_kb, dpu.converted_suffix.as_str()), (4420, 32, "-lazy"));
        assert_eq!(dpu.registries["10.0.2.2:5000"], "127.0.0.1:5000");
        assert!(dpu.platform().starts_with("linux/"));

        let v6 = DpuConfig { api: "http://[fd00::2]:50051".into(), ca: None, cert: None, key: None, ..dpu.clone() };
        assert_eq!(v6.target_address().as_deref(), Some("fd00::2"));
        v6.validate().unwrap();
    }

    #[test]
    fn bad_dpu_tables_are_refused() {
        let base = "[dpu]\napi = \"https://h:1\"\nca = \"/ca.pem\"\nsubsystem = \"s\"\n";
        Config::parse(base).unwrap().validate().unwrap();
        for (extra, needle) in [
            ("cert = \"/c.pem\"\n", "cert and key"),
            ("converted_suffix = \"/x\"\n", "converted_suffix"),
            ("device_timeout_seconds = 0\n", "timeouts"),
        ] {
            let err = Config::parse(&format!("{base}{extra}")).unwrap().validate().unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let no_ca = Config::parse("[dpu]\napi = \"https://h:1\"\nsubsystem = \"s\"\n").unwrap();
        assert!(no_ca.validate().unwrap_err().to_string().contains("ca"));
        let bad_subsystem = Config::parse("[dpu]\napi = \"http://h:1\"\nsubsystem = \"S!\"\n").unwrap();
        assert!(bad_subsystem.validate().is_err());
        let not_url = Config::parse("[dpu]\napi = \"h:1\"\nsubsystem = \"s\"\n").unwrap();
        assert!(not_url.validate().is_err());
        assert!(Config::parse("[dpu]\napi = \"http://h:1\"\n").is_err(), "subsystem is required");
    }
}
