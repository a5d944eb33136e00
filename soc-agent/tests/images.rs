//! Lazy images through the real agent binary and real peers: umoci builds a two-layer image, skopeo pushes it
//! to Debian's docker-registry, the agent's ImageService converts it, resolves the converted image and exports
//! its layers into a subsystem; a Rust NVMe/TCP initiator reads the namespaces, which mount in the kernel
//! (EROFS + overlayfs) and hold exactly the files `umoci unpack` extracts. The agent is then killed with
//! SIGKILL in the middle of fetching and restarted: every layer reads back intact. Needs root, docker-registry,
//! skopeo, umoci and mkfs.erofs; prints SKIPPED otherwise.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Agent;
use dpu_proto::v1 as pb;
use dpu_proto::v1::image_service_client::ImageServiceClient;
use dpu_proto::v1::storage_service_client::StorageServiceClient;
use dpu_storage::initiator::{ConnectOptions, Initiator};
use tonic::transport::Channel;

const NQN: &str = "nqn.2026-11.io.dpu-agent:images-test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn skip_reason() -> Option<String> {
    if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n")) {
        return Some("not root".into());
    }
    for tool in ["docker-registry", "skopeo", "umoci", "mkfs.erofs"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Debian's docker-registry on a free loopback port with its own configuration; killed on drop.
struct Registry(Child, u16);

impl Registry {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Owned from here on: killed and reaped on every path, a failed start included.
        let registry = Self(child, port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(25));
        }
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A two-layer image built by umoci: the upper layer deletes a file of the lower one and adds its own.
fn build_image(layout: &Path, work: &Path) {
    let image = format!("{}:v1", layout.display());
    run(Command::new("umoci").args(["init", "--layout"]).arg(layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    let bundle = work.join("bundle1");
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::create_dir_all(rootfs.join("usr/share/data")).unwrap();
    std::fs::write(rootfs.join("etc/os-release"), "ID=lazy\n").unwrap();
    std::fs::write(rootfs.join("etc/obsolete"), "removed by the next layer\n").unwrap();
    for i in 0..40u32 {
        let data: Vec<u8> =
            (0..(20_000 + i * 3_000)).map(|j| (j.wrapping_mul(2_654_435_761 ^ i) >> 11) as u8).collect();
        std::fs::write(rootfs.join(format!("usr/share/data/file{i}.bin")), data).unwrap();
    }
    run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle));
    let bundle = work.join("bundle2");
    run(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    std::fs::remove_file(rootfs.join("etc/obsolete")).unwrap();
    std::fs::create_dir_all(rootfs.join("app")).unwrap();
    std::fs::write(rootfs.join("app/start.sh"), "#!/bin/sh\necho ready\n").unwrap();
    run(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle));
}

/// SHA-256 of every regular file under `root`, owner, mode and modification time of files and links, owner and
/// mode of directories. Not directory times: a layer that changes a directory without an entry for it (umoci
/// writes none when it only deletes a file there) does not carry the time, and overlayfs shows the top layer's
/// directory where a sequential extraction keeps the lower one's.
fn tree(root: &Path) -> String {
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . -type f -print0 | sort -z | xargs -0 -r sha256sum && \
         find . -mindepth 1 ! -type c ! -type d -printf '%p %U:%G %m %T@\\n' | sort && \
         find . -mindepth 1 -type d -printf '%p %U:%G %m\\n' | sort",
        root.display()
    )))
}

/// Connects once the listener is up and the image's two layer namespaces are published.
async fn connect(addr: SocketAddr) -> Initiator {
    let deadline = Instant::now() + Duration::from_secs(30);
    let initiator = loop {
        match Initiator::connect(addr, ConnectOptions::new(NQN)).await {
            Ok(initiator) => break initiator,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("connecting to {addr}: {e}"),
        }
    };
    while initiator.refresh_namespaces().await.unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the layer namespaces did not appear");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    initiator
}

async fn wait_ready(images: &mut ImageServiceClient<Channel>, name: &str) -> pb::Image {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let image = images.get_image(pb::GetImageRequest { name: name.into() }).await.unwrap().into_inner();
        let status = image.status.clone().unwrap();
        if status.state == pb::ResourceState::Ready as i32 {
            return image;
        }
        assert!(status.state != pb::ResourceState::Error as i32, "{name}: {}", status.reason);
        assert!(Instant::now() < deadline, "{name} not ready: {}", status.reason);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every namespace, in nsid order, read whole; stops early (returning what it has) when `stop_after` bytes were
/// read, for killing the agent mid-fetch.
async fn read_namespaces(host: &Initiator, stop_after: Option<u64>) -> Vec<(u32, [u8; 16], Vec<u8>)> {
    let mut out = Vec::new();
    let mut total = 0u64;
    let queue = host.io_queue(0).unwrap();
    let mut nsids: Vec<u32> = host.refresh_namespaces().await.unwrap().iter().map(|n| n.nsid).collect();
    nsids.sort_unstable();
    for nsid in nsids {
        let id = host.identify_namespace(nsid).await.unwrap();
        assert_eq!(id.nsattr & 1, 1, "layer namespaces are write protected");
        let blocks = id.nsze.get();
        let mut data = Vec::with_capacity(blocks as usize * 4096);
        let mut lba = 0;
        while lba < blocks {
            let n = (blocks - lba).min(32);
            let (buf, r) = queue.read(nsid, lba, vec![0; n as usize * 4096]).await;
            r.unwrap();
            data.extend_from_slice(&buf);
            lba += n;
            total += n * 4096;
            if stop_after.is_some_and(|limit| total >= limit) {
                return out;
            }
        }
        out.push((nsid, id.nguid, data));
    }
    out
}

struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_convert_export_mount_and_survive_sigkill() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: lazy images through the agent ({reason})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(dir.path());
    let host = format!("127.0.0.1:{}", registry.1);
    let layout = dir.path().join("layout");
    build_image(&layout, dir.path());
    run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{host}/app:v1")));

    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    // Start-up traces are stored one second after the first read.
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[images]\ntrace_window_seconds = 1\n").unwrap();
    let config = config.to_str().unwrap();
    let agent = Agent::start(&["--config", config, "--data-dir", data]);
    let channel = agent.channel().await;
    let mut images = ImageServiceClient::new(channel.clone());
    let mut storage = StorageServiceClient::new(channel);

    // Credentials are write-only.
    let secret = pb::RegistryCredential { username: "ci".into(), password: "s3cret-pass".into(), ..Default::default() };
    let created = images
        .create_registry_credential(pb::CreateRegistryCredentialRequest {
            credential_id: "reg".into(),
            credential: Some(secret),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.has_secret && created.password.is_empty());
    let listed =
        images.list_registry_credentials(pb::ListRegistryCredentialsRequest::default()).await.unwrap().into_inner();
    assert!(!format!("{listed:?}").contains("s3cret-pass"), "List never returns secrets");

    // Convert through the API, with progress.
    let request = pb::ConvertImageRequest {
        source: format!("{host}/app:v1"),
        destination: format!("{host}/app:v1-lazy"),
        chunk_size: 16384,
        ..Default::default()
    };
    let mut stream = images.convert_image(request).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event.event.unwrap());
    }
    use pb::convert_image_progress::Event;
    assert!(matches!(events.first(), Some(Event::Started(s)) if s.layers == 2), "{events:?}");
    let Some(Event::Summary(summary)) = events.last() else { panic!("no summary: {events:?}") };
    assert_eq!((summary.layers, summary.layers_reused), (2, 0));
    let bad = pb::ConvertImageRequest {
        source: format!("{host}/missing:v1"),
        destination: format!("{host}/x:y"),
        ..Default::default()
    };
    let err = images.convert_image(bad).await.unwrap().into_inner().message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    // Resolve it, export it.
    let image = pb::Image { reference: format!("{host}/app:v1-lazy"), credentials: "reg".into(), ..Default::default() };
    images.create_image(pb::CreateImageRequest { image_id: "app".into(), image: Some(image) }).await.unwrap();
    let ready = wait_ready(&mut images, "images/app").await;
    let status = ready.image_status.unwrap();
    assert_eq!(status.manifest_digest, summary.manifest_digest);
    assert_eq!(status.layers.len(), 2);
    let in_use = images
        .delete_registry_credential(pb::DeleteRegistryCredentialRequest { name: "reg".into(), allow_missing: false })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), tonic::Code::FailedPrecondition);

    let nvme = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let subsystem = pb::Subsystem { nqn: NQN.into(), allow_any_host: true, ..Default::default() };
    storage
        .create_subsystem(pb::CreateSubsystemRequest { subsystem_id: "img".into(), subsystem: Some(subsystem) })
        .await
        .unwrap();
    let listener = pb::Listener { address: nvme.to_string(), ..Default::default() };
    storage
        .create_listener(pb::CreateListenerRequest {
            parent: "subsystems/img".into(),
            listener_id: "tcp".into(),
            listener: Some(listener),
        })
        .await
        .unwrap();
    let export = pb::ExportImageRequest { image: "images/app".into(), subsystem: "subsystems/img".into() };
    let exported = images.export_image(export.clone()).await.unwrap().into_inner().namespaces;
    assert_eq!(exported.len(), 2);
    for (ns, layer) in exported.iter().zip(&status.layers) {
        assert_eq!(ns.uuid, layer.uuid, "namespace UUIDs come from the layer digests");
    }
    assert_eq!(images.export_image(export).await.unwrap().into_inner().namespaces, exported, "export is idempotent");
    let refused = images
        .delete_image(pb::DeleteImageRequest { name: "images/app".into(), allow_missing: false })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("subsystems/img/namespaces/layer-"), "{}", refused.message());

    // The host's side: read the layers through NVMe/TCP; a write is refused.
    let initiator = connect(nvme).await;
    let layers = read_namespaces(&initiator, None).await;
    assert_eq!(layers.len(), 2);
    let (_, r) = initiator.io_queue(0).unwrap().write(layers[0].0, 0, vec![0; 4096]).await;
    assert!(r.is_err(), "a layer namespace refuses writes");
    let uuids: Vec<String> = layers.iter().map(|(_, nguid, _)| dpu_storage::model::format_uuid(nguid)).collect();
    assert_eq!(uuids, exported.iter().map(|n| n.uuid.clone()).collect::<Vec<_>>(), "NGUIDs equal the UUIDs");
    let got = images.get_image(pb::GetImageRequest { name: "images/app".into() }).await.unwrap().into_inner();
    let got = got.image_status.unwrap();
    assert_eq!(got.bytes_cached, got.bytes_total, "everything read is cached");
    assert!(got.bytes_fetched > 0 && got.exported_as.len() == 2);

    // Mount and compare with umoci's own extraction.
    let mut mounts = Mounts(Vec::new());
    let mut lowers = Vec::new();
    for (i, (_, _, data)) in layers.iter().enumerate() {
        let file = dir.path().join(format!("layer{i}.img"));
        std::fs::write(&file, data).unwrap();
        let mnt = dir.path().join(format!("layer{i}"));
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("mount").args(["-t", "erofs", "-o", "loop,ro"]).arg(&file).arg(&mnt));
        mounts.0.push(mnt.clone());
        lowers.insert(0, mnt.display().to_string());
    }
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &format!("lowerdir={}", lowers.join(":"))])
        .arg(&rootfs));
    mounts.0.push(rootfs.clone());
    let bundle = dir.path().join("reference");
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:v1", layout.display())).arg(&bundle));
    assert_eq!(tree(&rootfs), tree(&bundle.join("rootfs")));
    assert!(!rootfs.join("etc/obsolete").exists());
    drop(mounts);
    drop(initiator);

    // The start-up trace lands in the registry beside the image.
    let trace_tag = format!("docker://{host}/app:sha256-{}.trace", &summary.manifest_digest["sha256:".len()..]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &trace_tag])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "no start-up trace was stored");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // SIGKILL in the middle of fetching: a fresh cache, a restart that kills the agent mid-read, then a full
    // read-back after another restart must give the same bytes.
    agent.kill();
    std::fs::remove_dir_all(dir.path().join("data/image-cache")).unwrap();
    let agent = Agent::start(&["--config", config, "--data-dir", data]);
    // Resolved again on an empty cache: the stored start-up trace is replayed before the host reads anything.
    let mut images = ImageServiceClient::new(agent.channel().await);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let image = images.get_image(pb::GetImageRequest { name: "images/app".into() }).await.unwrap().into_inner();
        let status = image.image_status.unwrap();
        if status.prefetched_chunks > 0 && status.bytes_cached == status.bytes_total {
            break;
        }
        assert!(Instant::now() < deadline, "the trace was not replayed: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let initiator = connect(nvme).await;
    let partial = read_namespaces(&initiator, Some(256 << 10)).await;
    assert!(partial.is_empty(), "stopped inside the first layer");
    agent.kill();
    let agent = Agent::start(&["--config", config, "--data-dir", data]);
    let mut images = ImageServiceClient::new(agent.channel().await);
    wait_ready(&mut images, "images/app").await;
    let initiator = connect(nvme).await;
    let again = read_namespaces(&initiator, None).await;
    assert_eq!(again.len(), layers.len());
    for (a, b) in again.iter().zip(&layers) {
        assert!(a.2 == b.2, "namespace {} reads back identical after SIGKILL and restart", a.0);
    }
    drop(initiator);

    // Restarted while the registry is down: the image is served as last resolved, from the cache.
    agent.kill();
    drop(registry);
    let agent = Agent::start(&["--config", config, "--data-dir", data]);
    let mut images = ImageServiceClient::new(agent.channel().await);
    wait_ready(&mut images, "images/app").await;
    let initiator = connect(nvme).await;
    let offline = read_namespaces(&initiator, None).await;
    assert!(offline.iter().zip(&layers).all(|(a, b)| a.2 == b.2), "cached layers read back with the registry down");
    drop(initiator);

    // Unexport, then the image may go.
    images
        .unexport_image(pb::UnexportImageRequest { image: "images/app".into(), subsystem: "subsystems/img".into() })
        .await
        .unwrap();
    images.delete_image(pb::DeleteImageRequest { name: "images/app".into(), allow_missing: false }).await.unwrap();
    let stats = images.get_image_cache_stats(pb::GetImageCacheStatsRequest {}).await.unwrap().into_inner();
    assert!(stats.chunks > 0 && stats.used_bytes <= stats.capacity_bytes);
    agent.stop().await;
}
