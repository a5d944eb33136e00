//! Agent configuration: one TOML file, parsed strictly (`deny_unknown_fields`) and validated in one step.
//!
//! Relative paths in the file are resolved against the directory of the file, so an example config can name
//! a data directory next to it. Without a file the embedded default applies: API on loopback, plaintext.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::auth::Role;

/// Upper bound of `mesh.poll_window_us`: past a second, polling is not bridging wake-ups any more.
const MAX_POLL_WINDOW_US: u64 = 1_000_000;

/// Default location of the configuration file on a DPU image.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dpu-agent/config.toml";

/// A configuration problem, naming the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema; the message names the field and position.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A field parsed but holds a value the agent cannot run with.
    #[error("config field `{field}`: {message}")]
    Invalid { field: &'static str, message: String },
}

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the intent store and data-path state live (on a DPU: eMMC, e.g. `/var/lib/dpu-agent`).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub mesh: MeshConfig,
    #[serde(default)]
    pub fabric: FabricConfig,
    #[serde(default)]
    pub images: ImagesConfig,
    #[serde(default)]
    pub crypto: CryptoConfig,
}

/// Keys and their protection at rest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CryptoConfig {
    /// The key-encryption key (32 bytes, mode 0600, created on first start) that wraps every key in the intent
    /// log. It must live outside `data_dir`, so a copy of the data directory alone reveals no key. Default:
    /// `<data_dir>.kek`, beside the data directory.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
}

impl CryptoConfig {
    pub fn kek_file(&self, data_dir: &Path) -> PathBuf {
        self.kek_file.clone().unwrap_or_else(|| {
            let mut name = data_dir.file_name().unwrap_or_default().to_os_string();
            name.push(".kek");
            data_dir.with_file_name(name)
        })
    }
}

/// Lazily loaded container images: the DPU's chunk cache and how chunks are fetched from registries.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    /// The chunk cache (default `<data_dir>/image-cache`).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Most bytes of chunks the cache keeps; colder chunks are evicted past it.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: u64,
    /// A read whose chunk cannot be fetched within this fails with an error the host sees as EIO. Keep it under
    /// the host's NVMe I/O timeout (Linux: 30 s).
    #[serde(default = "default_fetch_deadline_ms")]
    pub fetch_deadline_ms: u64,
    /// Registries reached over plain HTTP (`host` or `host:port`); by default only the loopback names.
    #[serde(default = "default_plain_http_hosts")]
    pub plain_http_hosts: Vec<String>,
    /// Extra CA certificates (PEM) trusted for registries, beside the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Scratch space of the converter, and its record of converted layers (default `<data_dir>/convert`).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Replay an image's stored start-up trace as prefetch when it is resolved.
    #[serde(default = "default_true")]
    pub prefetch: bool,
    /// Seconds after an image's first read that its start-up trace is recorded before it is stored in the
    /// registry beside the image (for the next cold start on any DPU); 0: traces are not stored.
    #[serde(default = "default_trace_window_seconds")]
    pub trace_window_seconds: u64,
    /// Background fill of the chunks not read yet, in bytes per second; 0 (the default): off.
    #[serde(default)]
    pub fill_bytes_per_second: u64,
}

fn default_trace_window_seconds() -> u64 {
    30
}

fn default_cache_bytes() -> u64 {
    10 << 30
}

fn default_fetch_deadline_ms() -> u64 {
    20_000
}

fn default_plain_http_hosts() -> Vec<String> {
    ["localhost", "127.0.0.1", "[::1]"].map(String::from).to_vec()
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            cache_bytes: default_cache_bytes(),
            fetch_deadline_ms: default_fetch_deadline_ms(),
            plain_http_hosts: default_plain_http_hosts(),
            ca_file: None,
            work_dir: None,
            prefetch: true,
            trace_window_seconds: default_trace_window_seconds(),
            fill_bytes_per_second: 0,
        }
    }
}

impl ImagesConfig {
    pub fn cache_dir(&self, data_dir: &Path) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| data_dir.join("image-cache"))
    }

    pub fn work_dir(&self, data_dir: &Path) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| data_dir.join("convert"))
    }
}

/// The eSwitch port inventory of the fabric data path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FabricConfig {
    /// JSON object of port name to netdev (`{"pf0vf3": "veth-pod3"}`) for netdevs that carry no port name.
    #[serde(default)]
    pub mapping: Option<PathBuf>,
    /// `auto` (devlink when it reports eSwitch ports, sysfs otherwise), `devlink` or `sysfs`.
    #[serde(default)]
    pub inventory: dpu_fabric::ports::InventorySource,
}

/// The shared service-mesh proxy. Its listeners, clusters and routes are intent (MeshService); this section
/// only says where else configuration may come from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// An xDS control plane (Envoy ADS) that drives the proxy alongside the API; none when unset.
    #[serde(default)]
    pub xds: Option<XdsConfig>,
    /// Poll mode, for cores dedicated to the agent: when the workers keep polling for I/O instead of sleeping
    /// until the next readiness event, taking that wake-up out of a request's latency at the price of CPU.
    /// `in_flight` (the default): while HTTP requests are in flight; `always`: after any proxy or NVMe/TCP
    /// traffic; `off`: never, for a machine shared with other work. The workers are shared, so this
    /// one setting covers the proxy and the NVMe/TCP target alike.
    #[serde(default)]
    pub poll: dpu_proxy::poll::Policy,
    /// Polling stops this many microseconds after the proxy or the target last moved bytes (1 to 1,000,000).
    #[serde(default = "default_poll_window_us")]
    pub poll_window_us: u64,
}

/// Where the xDS control plane is and who the proxy says it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    /// `http://host:port` (plaintext, e.g. istiod's 15010) or `https://host:port`.
    pub server: String,
    /// Envoy node id, e.g. `router~10.0.0.2~dpu-0.default~default.svc.cluster.local`.
    pub node_id: String,
    #[serde(default)]
    pub node_cluster: String,
    /// CA certificate (PEM) that signed the server's certificate, for https.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// The NVMe-oF target.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Address of the NVMe/TCP discovery service (the well-known port is 8009); none when unset.
    #[serde(default)]
    pub discovery_listen: Option<SocketAddr>,
    /// SPDK inside the agent (agents built with the `spdk` feature): present = started at boot.
    #[serde(default)]
    pub spdk: Option<dpu_storage::model::SpdkConfig>,
}

/// The gRPC control API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address of the gRPC listener.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// mTLS material; when absent the API is plaintext, which needs a loopback `listen` or `insecure_plaintext`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Allow plaintext on a non-loopback address. Logged as a warning at every start.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Role granted to plaintext clients (they present no certificate to take a role from).
    #[serde(default = "default_plaintext_role")]
    pub plaintext_role: Role,
    /// Seconds to wait for in-flight requests on shutdown.
    #[serde(default = "default_drain_seconds")]
    pub drain_seconds: u64,
}

/// Server certificate, key and the CA that client certificates must chain to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// The admin HTTP listener (Prometheus metrics, liveness and readiness).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `info,dpu_agent::api=debug`. The `log_filter` agent setting,
    /// when set over the API, takes precedence at run time.
    #[serde(default = "default_log_level")]
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Reconciliation timing shared by every data path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Seconds between periodic drift checks.
    #[serde(default = "default_drift_seconds")]
    pub drift_seconds: u64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/dpu-agent")
}
fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9100))
}
fn default_plaintext_role() -> Role {
    Role::Operator
}
fn default_drain_seconds() -> u64 {
    10
}
fn default_poll_window_us() -> u64 {
    1000
}
fn default_drift_seconds() -> u64 {
    30
}
fn default_log_level() -> String {
    "info".into()
}
fn default_true() -> bool {
    true
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            tls: None,
            insecure_plaintext: false,
            plaintext_role: default_plaintext_role(),
            drain_seconds: default_drain_seconds(),
        }
    }
}
impl Default for AdminConfig {
    fn default() -> Self {
        Self { enabled: true, listen: default_admin_listen() }
    }
}
impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::default(), level: default_log_level() }
    }
}
impl Default for MeshConfig {
    fn default() -> Self {
        Self { xds: None, poll: dpu_proxy::poll::Policy::default(), poll_window_us: default_poll_window_us() }
    }
}
impl Default for ReconcileConfig {
    fn default() -> Self {
        Self { drift_seconds: default_drift_seconds() }
    }
}
impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            api: ApiConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            reconcile: ReconcileConfig::default(),
            storage: StorageConfig::default(),
            mesh: MeshConfig::default(),
            fabric: FabricConfig::default(),
            images: ImagesConfig::default(),
            crypto: CryptoConfig::default(),
        }
    }
}

impl Config {
    /// Reads and parses a file, resolving relative paths against its directory. Call [`Config::validate`] next.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_relative(base);
        Ok(config)
    }

    /// Parses TOML text; the error message names the field and its line.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    fn resolve_relative(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        if let Some(tls) = &mut self.api.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
            resolve(&mut tls.client_ca);
        }
        if let Some(ca) = self.mesh.xds.as_mut().and_then(|x| x.ca.as_mut()) {
            resolve(ca);
        }
        if let Some(mapping) = &mut self.fabric.mapping {
            resolve(mapping);
        }
        for path in
            [&mut self.images.cache_dir, &mut self.images.ca_file, &mut self.images.work_dir, &mut self.crypto.kek_file]
                .into_iter()
                .flatten()
        {
            resolve(path);
        }
    }

    /// The one validation step: everything the agent needs to start safely, each failure naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.api.tls.is_none() && !self.api.listen.ip().is_loopback() && !self.api.insecure_plaintext {
            return Err(invalid(
                "api.listen",
                format!(
                    "{} is not a loopback address and [api.tls] is not configured; refusing to serve the \
                     control API in plaintext (configure [api.tls], or set api.insecure_plaintext = true)",
                    self.api.listen
                ),
            ));
        }
        if let Some(tls) = &self.api.tls {
            for (field, path) in
                [("api.tls.cert", &tls.cert), ("api.tls.key", &tls.key), ("api.tls.client_ca", &tls.client_ca)]
            {
                if let Err(e) = std::fs::metadata(path) {
                    return Err(invalid(field, format!("{}: {e}", path.display())));
                }
            }
        }
        if self.admin.enabled && self.admin.listen == self.api.listen && self.api.listen.port() != 0 {
            return Err(invalid("admin.listen", "must differ from api.listen"));
        }
        if let Err(e) = self.log.level.parse::<tracing_subscriber::EnvFilter>() {
            return Err(invalid("log.level", format!("{:?} is not a valid filter: {e}", self.log.level)));
        }
        let kek = self.crypto.kek_file(&self.data_dir);
        if kek.starts_with(&self.data_dir) {
            return Err(invalid(
                "crypto.kek_file",
                format!(
                    "{} is inside data_dir: a copy of the data directory would carry the key-encryption key with \
                     the keys it wraps",
                    kek.display()
                ),
            ));
        }
        if self.images.cache_bytes < 64 << 20 {
            return Err(invalid("images.cache_bytes", format!("{} is less than 64 MiB", self.images.cache_bytes)));
        }
        if !(100..=600_000).contains(&self.images.fetch_deadline_ms) {
            return Err(invalid(
                "images.fetch_deadline_ms",
                format!("{} is not between 100 and 600000", self.images.fetch_deadline_ms),
            ));
        }
        if let Some(ca) = &self.images.ca_file
            && let Err(e) = std::fs::metadata(ca)
        {
            return Err(invalid("images.ca_file", format!("{}: {e}", ca.display())));
        }
        if self.reconcile.drift_seconds == 0 {
            return Err(invalid("reconcile.drift_seconds", "must be at least 1"));
        }
        if !(1..=MAX_POLL_WINDOW_US).contains(&self.mesh.poll_window_us) {
            return Err(invalid(
                "mesh.poll_window_us",
                format!("{} is not between 1 and {MAX_POLL_WINDOW_US} (1 s)", self.mesh.poll_window_us),
            ));
        }
        if let Some(xds) = &self.mesh.xds {
            let ok = (xds.server.starts_with("http://") || xds.server.starts_with("https://"))
                && xds.server.parse::<http::Uri>().is_ok_and(|u| u.authority().is_some());
            if !ok {
                return Err(invalid("mesh.xds.server", format!("{:?} is not http(s)://host:port", xds.server)));
            }
            if xds.node_id.is_empty() {
                return Err(invalid("mesh.xds.node_id", "must not be empty"));
            }
            match &xds.ca {
                Some(ca) => {
                    if let Err(e) = std::fs::metadata(ca) {
                        return Err(invalid("mesh.xds.ca", format!("{}: {e}", ca.display())));
                    }
                }
                None if xds.server.starts_with("https://") => {
                    return Err(invalid("mesh.xds.ca", "required for an https server"));
                }
                None => {}
            }
        }
        Ok(())
    }

    /// True when the API will accept plaintext connections.
    pub fn plaintext(&self) -> bool {
        self.api.tls.is_none()
    }
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, message: message.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_loopback_default() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.api.listen, default_api_listen());
        assert!(config.plaintext());
        config.validate().unwrap();
    }

    #[test]
    fn the_key_encryption_key_lives_beside_the_data_directory() {
        let config = Config::parse("data_dir = \"/var/lib/dpu-agent\"\n").unwrap();
        assert_eq!(config.crypto.kek_file(&config.data_dir), Path::new("/var/lib/dpu-agent.kek"));
        config.validate().unwrap();
        let inside = Config::parse("data_dir = \"/var/lib/dpu\"\n[crypto]\nkek_file = \"/var/lib/dpu/kek\"\n").unwrap();
        let err = inside.validate().unwrap_err().to_string();
        assert!(err.contains("crypto.kek_file") && err.contains("inside data_dir"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::parse("[api]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n").unwrap_err();
        assert!(err.contains("listne"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[admin]\nlisten = 9100\n").unwrap_err();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn plaintext_on_a_public_address_needs_the_insecure_flag() {
        let mut config = Config::parse("[api]\nlisten = \"0.0.0.0:50051\"\n").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.starts_with("config field `api.listen`"), "{err}");
        config.api.insecure_plaintext = true;
        config.validate().unwrap();
    }

    #[test]
    fn missing_tls_file_is_named() {
        let config = Config::parse(
            "[api]\nlisten = \"0.0.0.0:50051\"\n[api.tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"k\"\nclient_ca = \"ca\"\n",
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("api.tls.cert"), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "data_dir = \"state\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.data_dir, dir.path().join("state"));
    }

    #[test]
    fn fabric_section() {
        use dpu_fabric::ports::InventorySource;
        assert_eq!(Config::parse("").unwrap().fabric.inventory, InventorySource::Auto);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "[fabric]\nmapping = \"ports.json\"\ninventory = \"devlink\"\n").unwrap();
        let config = Config::load(&path).unwrap();
        assert_eq!(config.fabric.mapping, Some(dir.path().join("ports.json")));
        assert_eq!(config.fabric.inventory, InventorySource::Devlink);
        let err = Config::parse("[fabric]\ninventory = \"lldp\"\n").unwrap_err();
        assert!(err.contains("inventory") || err.contains("lldp"), "{err}");
        assert!(Config::parse("[fabric]\nmaping = \"x\"\n").unwrap_err().contains("maping"));
    }

    #[test]
    fn poll_mode_defaults_to_in_flight_and_its_window_is_bounded() {
        use dpu_proxy::poll::Policy;
        let config = Config::parse("").unwrap();
        assert_eq!((config.mesh.poll, config.mesh.poll_window_us), (Policy::InFlight, 1000));
        let config = Config::parse("[mesh]\npoll = \"off\"\npoll_window_us = 300\n").unwrap();
        assert_eq!((config.mesh.poll, config.mesh.poll_window_us), (Policy::Off, 300));
        config.validate().unwrap();
        for window in ["0", "2000000"] {
            let text = format!("[mesh]\npoll = \"always\"\npoll_window_us = {window}\n");
            let err = Config::parse(&text).unwrap().validate().unwrap_err().to_string();
            assert!(err.starts_with("config field `mesh.poll_window_us`"), "{err}");
        }
        let err = Config::parse("[mesh]\npoll = \"busy\"\n").unwrap_err();
        assert!(err.contains("busy") && err.contains("in_flight"), "{err}");
    }

    #[test]
    fn bad_log_filter_is_named() {
        let config = Config::parse("[log]\nlevel = \"info,[[[\"\n").unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("log.level"));
    }
}
