//! The snapshotter: containerd's snapshot model (active, view and committed snapshots in one key namespace)
//! stored on local disk with the directory layout and mounts of an overlayfs snapshotter.
//!
//! - [`store`]: the metadata, one small file per snapshot, replaced atomically, reloaded at start.
//! - [`snapshotter`]: [`Snapshotter`], the operations containerd calls, with locking and disk work.
//! - [`filter`]: containerd's filter expressions for `List`.
//! - [`usage`]: disk usage of a snapshot's own directory.
//! - [`remote`]: [`RemoteLayerSource`], consulted by `Prepare` for layers served read-only from elsewhere.
//!
//! Nothing here sees protobuf; the gRPC edge (`crate::api`) converts.

use std::collections::BTreeMap;
use std::time::SystemTime;

pub mod filter;
pub mod remote;
pub mod snapshotter;
pub mod store;
pub mod usage;

pub use filter::Filter;
pub use remote::{LayerRequest, NoRemoteLayers, RemoteError, RemoteLayerSource};
pub use snapshotter::Snapshotter;

/// Snapshot labels, ordered so records and listings are deterministic.
pub type Labels = BTreeMap<String, String>;

/// The label containerd's unpacker sets on `Prepare` to name the committed snapshot it will create for a layer
/// (the layer's chain id). A remote layer source answers for that name.
pub const TARGET_LABEL: &str = "containerd.io/snapshot.ref";

/// containerd's limit on one label: key and value together.
pub const MAX_LABEL_BYTES: usize = 4096;

/// What a snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Read-only view of a committed snapshot; cannot be committed.
    View,
    /// Writable snapshot being built (a layer being unpacked, a container's rootfs).
    Active,
    /// Immutable; the only kind that can be a parent.
    Committed,
}

impl Kind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Active => "active",
            Self::Committed => "committed",
        }
    }
}

/// A snapshot as containerd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The key (active, view) or name (committed).
    pub name: String,
    /// The committed snapshot this one sits on.
    pub parent: Option<String>,
    pub kind: Kind,
    pub created: SystemTime,
    pub updated: SystemTime,
    pub labels: Labels,
}

/// One mount of a snapshot's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `bind` or `overlay`.
    pub fs_type: String,
    /// The bind source directory, or `overlay`.
    pub source: String,
    pub options: Vec<String>,
}

/// Space a snapshot's own layer takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Allocated bytes (512-byte blocks × 512), each inode counted once.
    pub size: u64,
    /// Distinct inodes, the layer's root directory included.
    pub inodes: u64,
}

/// One change of an `Update`: what containerd's field mask paths mean for labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelEdit {
    /// `labels` (or an empty mask): the snapshot's labels become exactly these.
    ReplaceAll(Labels),
    /// `labels.<key>`: set the label, or remove it when `value` is `None`.
    Set { key: String, value: Option<String> },
}

/// Why an operation failed. Each variant maps to one gRPC code at the edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A disk operation failed; `context` says which and on what path.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The metadata on disk contradicts itself; the snapshotter refuses to guess.
    #[error("snapshot metadata is inconsistent: {0}")]
    Corrupt(String),
    /// A background task failed or the state lock was poisoned by a panic.
    #[error("internal error: {0}")]
    Internal(String),
    /// A service the snapshotter depends on (the remote layer source) could not do its part.
    #[error("{0}")]
    Unavailable(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// Checks labels as containerd does: each key and value together at most [`MAX_LABEL_BYTES`], keys not empty.
pub fn validate_labels(labels: &Labels) -> Result<(), Error> {
    for (key, value) in labels {
        if key.is_empty() {
            return Err(Error::InvalidArgument("label keys must not be empty".into()));
        }
        if key.len() + value.len() > MAX_LABEL_BYTES {
            return Err(Error::InvalidArgument(format!(
                "label {key:?}: key and value are longer than {MAX_LABEL_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

/// Labels with an empty value are not stored (containerd treats an empty value as "no label").
pub fn without_empty(mut labels: Labels) -> Labels {
    labels.retain(|_, v| !v.is_empty());
    labels
}
