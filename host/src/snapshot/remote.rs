//! Remote layers: a layer whose filesystem is already available as a read-only directory on this host (for
//! instance a block device served by the DPU and mounted here), so containerd need not download and unpack it.
//!
//! On `Prepare` of a layer (containerd's unpacker sets [`TARGET_LABEL`](super::TARGET_LABEL) to the layer's
//! chain id) the snapshotter asks its [`RemoteLayerSource`] before creating an ordinary active snapshot. When
//! the source answers with a directory, the snapshotter records a committed snapshot named by the target whose
//! filesystem is that directory, and answers `Prepare` with "already exists": containerd then skips the
//! download and uses the committed snapshot as the parent of the next layer.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use super::Labels;

/// Labels with this prefix are the ones containerd passes down from the layer's descriptor (annotations the
/// image handlers copied) and keeps on the snapshot.
pub const LAYER_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// The layer a `Prepare` is about to unpack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRequest {
    /// The committed snapshot containerd wants to end up with (the layer's chain id).
    pub target: String,
    /// The committed snapshot below the layer.
    pub parent: Option<String>,
    /// Every label of the `Prepare`.
    pub labels: Labels,
}

impl LayerRequest {
    /// The layer's annotations: labels under [`LAYER_LABEL_PREFIX`], with the prefix removed.
    pub fn annotations(&self) -> impl Iterator<Item = (&str, &str)> {
        self.labels.iter().filter_map(|(k, v)| k.strip_prefix(LAYER_LABEL_PREFIX).map(|name| (name, v.as_str())))
    }
}

/// A layer a source serves: where its filesystem is, and labels the source records on the snapshot (beside
/// containerd's) to find it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// A ready, read-only directory holding the layer's filesystem (absolute path).
    pub dir: PathBuf,
    pub labels: Labels,
}

/// A committed snapshot whose filesystem a remote layer source serves, as the snapshotter recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedLayer {
    /// The snapshot's name (the layer's chain id).
    pub name: String,
    pub dir: PathBuf,
    /// containerd's labels and the source's.
    pub labels: Labels,
}

/// What [`RemoteLayerSource::resolve`] returns.
pub type LayerFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<RemoteLayer>, RemoteError>> + Send + 'a>>;

/// What [`RemoteLayerSource::release`] and [`RemoteLayerSource::sync`] return.
pub type SyncFuture<'a> = Pin<Box<dyn Future<Output = Result<(), RemoteError>> + Send + 'a>>;

/// Provides layers that need no download.
pub trait RemoteLayerSource: Send + Sync + fmt::Debug {
    /// The layer, ready, or `None` to let it be downloaded and unpacked as usual. An error is logged and
    /// treated as `None`.
    fn resolve<'a>(&'a self, layer: &'a LayerRequest) -> LayerFuture<'a>;

    /// The snapshot of `removed` is gone (its record is deleted); `remaining` are the remote layers still
    /// recorded. The source may let go of what only `removed` used (mounts, exports).
    fn release<'a>(&'a self, removed: &'a RecordedLayer, remaining: &'a [RecordedLayer]) -> SyncFuture<'a> {
        let _ = (removed, remaining);
        Box::pin(std::future::ready(Ok(())))
    }

    /// `recorded` are every remote layer the snapshotter holds (at start, and on `Cleanup`): make each one's
    /// directory available again (after a reboot or a restart of the source's backend) and let go of what
    /// none of them uses.
    fn sync<'a>(&'a self, recorded: &'a [RecordedLayer]) -> SyncFuture<'a> {
        let _ = recorded;
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The source that has no remote layers: every layer is unpacked locally.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRemoteLayers;

impl RemoteLayerSource for NoRemoteLayers {
    fn resolve<'a>(&'a self, _layer: &'a LayerRequest) -> LayerFuture<'a> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

/// A remote layer source could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl RemoteError {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into(), source: None }
    }

    pub fn with_source(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { message: message.into(), source: Some(Box::new(source)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_are_the_layer_labels_without_their_prefix() {
        let layer = LayerRequest {
            target: "sha256:abc".into(),
            parent: None,
            labels: Labels::from([
                ("containerd.io/snapshot.ref".into(), "sha256:abc".into()),
                ("containerd.io/snapshot/cri.layer-digest".into(), "sha256:def".into()),
                ("other".into(), "x".into()),
            ]),
        };
        assert_eq!(layer.annotations().collect::<Vec<_>>(), [("cri.layer-digest", "sha256:def")]);
    }

    #[tokio::test]
    async fn the_empty_source_declines_every_layer() {
        let layer = LayerRequest { target: "sha256:abc".into(), parent: None, labels: Labels::new() };
        assert!(NoRemoteLayers.resolve(&layer).await.unwrap().is_none());
    }
}
