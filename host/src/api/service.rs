//! `containerd.services.snapshots.v1.Snapshots` over a [`Snapshotter`].
//!
//! The requests' `snapshotter` field (the plugin name containerd was configured with) is not checked: this
//! server serves one snapshotter.

use tonic::{Request, Response, Status};

use super::convert;
use super::pb::snapshots::{self as pb, snapshots_server};
use crate::snapshot::{Error, Filter, Snapshotter};

/// `List` answers in messages of at most this many snapshots.
pub const LIST_BATCH: usize = 100;

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct SnapshotService {
    snapshotter: Snapshotter,
}

impl SnapshotService {
    pub fn new(snapshotter: Snapshotter) -> Self {
        Self { snapshotter }
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> snapshots_server::SnapshotsServer<Self> {
        snapshots_server::SnapshotsServer::new(self)
    }
}

/// Maps the outcome of one RPC, logging failures: the caller's mistakes (and the answers containerd expects
/// routinely, such as NOT_FOUND from Stat) at debug, the snapshotter's own failures as errors.
fn reply<T, U>(
    method: &'static str,
    key: &str,
    result: Result<T, Error>,
    map: impl FnOnce(T) -> U,
) -> Result<Response<U>, Status> {
    match result {
        Ok(value) => Ok(Response::new(map(value))),
        Err(error) => {
            match &error {
                Error::Io { .. } | Error::Corrupt(_) | Error::Internal(_) => {
                    tracing::error!(method, key, error = %DisplayChain(&error), "snapshot request failed");
                }
                _ => tracing::debug!(method, key, error = %error, "snapshot request refused"),
            }
            Err(convert::status(error))
        }
    }
}

/// An error with its sources, for logs.
struct DisplayChain<'a>(&'a Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

type ListStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::ListSnapshotsResponse, Status>>>;

#[tonic::async_trait]
impl snapshots_server::Snapshots for SnapshotService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let key = r.key.clone();
        let result = self.snapshotter.prepare(r.key, convert::parent(r.parent), convert::labels(r.labels)).await;
        reply("Prepare", &key, result, |m| pb::PrepareSnapshotResponse { mounts: convert::mounts(m) })
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        let key = r.key.clone();
        let result = self.snapshotter.view(r.key, convert::parent(r.parent), convert::labels(r.labels)).await;
        reply("View", &key, result, |m| pb::ViewSnapshotResponse { mounts: convert::mounts(m) })
    }

    async fn mounts(&self, request: Request<pb::MountsRequest>) -> Result<Response<pb::MountsResponse>, Status> {
        let r = request.into_inner();
        let result = self.snapshotter.mounts(r.key.clone()).await;
        reply("Mounts", &r.key, result, |m| pb::MountsResponse { mounts: convert::mounts(m) })
    }

    async fn commit(&self, request: Request<pb::CommitSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "commit");
        let key = r.key.clone();
        let result = self.snapshotter.commit(r.name, r.key, convert::labels(r.labels)).await;
        reply("Commit", &key, result, |()| ())
    }

    async fn remove(&self, request: Request<pb::RemoveSnapshotRequest>) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, "remove");
        let result = self.snapshotter.remove(r.key.clone()).await;
        reply("Remove", &r.key, result, |()| ())
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = self.snapshotter.stat(r.key.clone()).await;
        reply("Stat", &r.key, result, |info| pb::StatSnapshotResponse { info: Some(convert::info(info)) })
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let (key, edits) = convert::label_edits(r.info, r.update_mask)?;
        tracing::debug!(key = %key, edits = edits.len(), "update");
        let result = self.snapshotter.update(key.clone(), edits).await;
        reply("Update", &key, result, |info| pb::UpdateSnapshotResponse { info: Some(convert::info(info)) })
    }

    type ListStream = ListStream;

    async fn list(&self, request: Request<pb::ListSnapshotsRequest>) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let filter = Filter::parse_all(&r.filters).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let result = self.snapshotter.list(filter).await;
        reply("List", "", result, |infos| {
            let mut batches = Vec::with_capacity(infos.len().div_ceil(LIST_BATCH));
            let mut infos = infos.into_iter().map(convert::info).peekable();
            while infos.peek().is_some() {
                batches.push(Ok(pb::ListSnapshotsResponse { info: infos.by_ref().take(LIST_BATCH).collect() }));
            }
            tokio_stream::iter(batches)
        })
    }

    async fn usage(&self, request: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let r = request.into_inner();
        let result = self.snapshotter.usage(r.key.clone()).await;
        reply("Usage", &r.key, result, convert::usage)
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let result = self.snapshotter.cleanup().await;
        reply("Cleanup", "", result, |report| {
            tracing::debug!(removed = report.removed, failed = report.failed, "cleanup");
        })
    }
}
