//! The unix socket and the tonic server containerd connects to.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::api::SnapshotService;
use crate::snapshot::Snapshotter;

/// Listens on `path`: creates its directory, replaces a stale socket a previous run left, and refuses a path
/// that is not a socket or a socket someone still serves. The socket is for root only (mode 0600), like
/// containerd's own. Must run inside a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o711).create(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the snapshots service on `listener` until `shutdown` completes; requests in flight finish first.
pub async fn serve(
    listener: UnixListener,
    snapshotter: Snapshotter,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(SnapshotService::new(snapshotter).into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use hyper_util::rt::TokioIo;
    use prost_types::FieldMask;
    use tonic::Code;
    use tonic::transport::{Channel, Endpoint, Uri};

    use super::*;
    use crate::api::pb::snapshots::{self as pb, snapshots_client::SnapshotsClient};
    use crate::api::service::LIST_BATCH;
    use crate::snapshot::NoRemoteLayers;

    struct Running {
        client: SnapshotsClient<Channel>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    async fn start() -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/snap.sock");
        let root = dir.path().join("root");
        let snapshotter = Snapshotter::open(&root, Arc::new(NoRemoteLayers)).unwrap();
        let listener = bind(&socket).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, snapshotter, async {
            let _ = stopped.await;
        }));
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
            }))
            .await
            .unwrap();
        Running { client: SnapshotsClient::new(channel), stop: Some(stop), task, _dir: dir, root }
    }

    fn labels(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn prepare(key: &str, parent: &str) -> pb::PrepareSnapshotRequest {
        pb::PrepareSnapshotRequest {
            snapshotter: "dpu".into(),
            key: key.into(),
            parent: parent.into(),
            labels: labels(&[("l", "1")]),
        }
    }

    fn commit(name: &str, key: &str) -> pb::CommitSnapshotRequest {
        pb::CommitSnapshotRequest { snapshotter: "dpu".into(), name: name.into(), key: key.into(), labels: labels(&[]) }
    }

    async fn list(client: &mut SnapshotsClient<Channel>, filters: &[&str]) -> Result<Vec<Vec<String>>, tonic::Status> {
        let request = pb::ListSnapshotsRequest {
            snapshotter: "dpu".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        };
        let mut stream = client.list(request).await?.into_inner();
        let mut batches = Vec::new();
        while let Some(batch) = stream.message().await? {
            batches.push(batch.info.into_iter().map(|i| i.name).collect());
        }
        Ok(batches)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_rpc_over_the_socket() {
        let mut running = start().await;
        let client = &mut running.client;

        let mounts = client.prepare(prepare("k1", "")).await.unwrap().into_inner().mounts;
        assert_eq!(mounts.len(), 1);
        assert_eq!(
            (mounts[0].r#type.as_str(), &mounts[0].options[..]),
            ("bind", &["rw".to_string(), "rbind".into()][..])
        );
        std::fs::write(PathBuf::from(&mounts[0].source).join("f"), "data").unwrap();
        let live = client.usage(pb::UsageRequest { snapshotter: "dpu".into(), key: "k1".into() }).await.unwrap();
        assert_eq!(live.get_ref().inodes, 2);

        client.commit(commit("base", "k1")).await.unwrap();
        let stat =
            client.stat(pb::StatSnapshotRequest { snapshotter: "dpu".into(), key: "base".into() }).await.unwrap();
        let info = stat.into_inner().info.unwrap();
        assert_eq!((info.name.as_str(), info.kind(), info.parent.as_str()), ("base", pb::Kind::Committed, ""));
        assert!(info.created_at.is_some() && info.updated_at.is_some());

        let mounts = client.prepare(prepare("k2", "base")).await.unwrap().into_inner().mounts;
        assert_eq!((mounts[0].r#type.as_str(), mounts[0].source.as_str()), ("overlay", "overlay"));
        let again = client.mounts(pb::MountsRequest { snapshotter: "dpu".into(), key: "k2".into() }).await.unwrap();
        assert_eq!(again.into_inner().mounts, mounts);
        let view = pb::ViewSnapshotRequest {
            snapshotter: "dpu".into(),
            key: "v".into(),
            parent: "base".into(),
            labels: labels(&[]),
        };
        let mounts = client.view(view).await.unwrap().into_inner().mounts;
        assert_eq!(mounts[0].options, ["ro", "rbind"]);

        // Update through field masks.
        let update = |paths: &[&str], pairs: &[(&str, &str)]| pb::UpdateSnapshotRequest {
            snapshotter: "dpu".into(),
            info: Some(pb::Info { name: "base".into(), labels: labels(pairs), ..Default::default() }),
            update_mask: Some(FieldMask { paths: paths.iter().map(|p| p.to_string()).collect() }),
        };
        let info = client.update(update(&["labels.a", "labels.b"], &[("a", "1"), ("b", "2")])).await.unwrap();
        assert_eq!(info.into_inner().info.unwrap().labels, labels(&[("a", "1"), ("b", "2")]));
        let info = client.update(update(&["labels.a"], &[])).await.unwrap();
        assert_eq!(info.into_inner().info.unwrap().labels, labels(&[("b", "2")]));
        let info = client.update(update(&[], &[("c", "3")])).await.unwrap();
        assert_eq!(info.into_inner().info.unwrap().labels, labels(&[("c", "3")]));
        let err = client.update(update(&["parent"], &[])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        // Error codes on the wire.
        assert_eq!(client.prepare(prepare("k2", "")).await.unwrap_err().code(), Code::AlreadyExists);
        assert_eq!(client.prepare(prepare("", "")).await.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(client.prepare(prepare("x", "missing")).await.unwrap_err().code(), Code::NotFound);
        assert_eq!(client.commit(commit("c", "v")).await.unwrap_err().code(), Code::FailedPrecondition);
        let remove = |key: &str| pb::RemoveSnapshotRequest { snapshotter: "dpu".into(), key: key.into() };
        let err = client.remove(remove("base")).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("\"base\""), "{}", err.message());
        let err = client.stat(pb::StatSnapshotRequest { snapshotter: "dpu".into(), key: "nope".into() }).await;
        assert_eq!(err.unwrap_err().code(), Code::NotFound);
        assert_eq!(list(client, &["name=="]).await.unwrap_err().code(), Code::InvalidArgument);

        // List in batches, with filters.
        for i in 0..(LIST_BATCH + 20) {
            client.prepare(prepare(&format!("many-{i:03}"), "base")).await.unwrap();
        }
        let batches = list(client, &[]).await.unwrap();
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [LIST_BATCH, 23]);
        assert_eq!(list(client, &["kind==view", "name==base"]).await.unwrap(), [["base", "v"]]);
        assert_eq!(list(client, &["name==nothing"]).await.unwrap(), Vec::<Vec<String>>::new());

        // Remove everything, then Cleanup has nothing left to do.
        for i in 0..(LIST_BATCH + 20) {
            client.remove(remove(&format!("many-{i:03}"))).await.unwrap();
        }
        for key in ["k2", "v", "base"] {
            client.remove(remove(key)).await.unwrap();
        }
        assert_eq!(client.remove(remove("base")).await.unwrap_err().code(), Code::NotFound);
        std::fs::create_dir_all(running.root.join("snapshots/9999/fs")).unwrap();
        running.client.cleanup(pb::CleanupRequest { snapshotter: "dpu".into() }).await.unwrap();
        assert_eq!(std::fs::read_dir(running.root.join("snapshots")).unwrap().count(), 0);

        running.stop.take().unwrap().send(()).unwrap();
        running.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn bind_replaces_stale_sockets_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind(&path).unwrap();
        // Still served: refused.
        assert_eq!(bind(&path).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        // Stale: replaced.
        let _listener = bind(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Not a socket: refused.
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert_eq!(bind(&file).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
    }
}
