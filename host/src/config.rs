//! `dpu-snapshotter` configuration: a TOML file, every field optional.
//!
//! ```toml
//! socket = "/run/dpu-snapshotter/snapshotter.sock"   # where containerd's proxy_plugins address points
//! root = "/var/lib/dpu-snapshotter"                   # metadata and snapshot directories
//! ```

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
}

impl Default for Config {
    fn default() -> Self {
        Self { socket: PathBuf::from(DEFAULT_SOCKET), root: PathBuf::from(DEFAULT_ROOT) }
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
        let nested = Config { socket: PathBuf::from("/srv/r/snapshots/s.sock"), root: PathBuf::from("/srv/r") };
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
}
