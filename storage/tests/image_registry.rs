//! Lazy images against real peers: skopeo pushes a two-layer image to Debian's docker-registry, the converter
//! converts it and pushes the result, skopeo reads the converted image back, and the layers — read on demand
//! from the registry through lazy volumes — mount in the kernel (EROFS), stack with overlayfs and hold exactly
//! the files `umoci unpack` extracts from the source. Killing the registry fails uncached reads at the deadline;
//! restarting it makes them succeed again. Needs root, docker-registry, skopeo, umoci and mkfs.erofs.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dpu_storage::bdev::{Volume, VolumeError};
use dpu_storage::image::Digest;
use dpu_storage::image::cache::{CacheConfig, ChunkCache};
use dpu_storage::image::chunk::ChunkIndex;
use dpu_storage::image::convert::{Destination, LayerOptions, Progress, Source, convert_image};
use dpu_storage::image::format::lazy_layers;
use dpu_storage::image::lazy::{FetchPolicy, LazyVolume, RegistryBlob};
use dpu_storage::image::oci::{self, Descriptor, Platform};
use dpu_storage::image::reconcile::ResolvedLayer;
use dpu_storage::image::registry::{Credentials, Reference, RegistryClient, RegistryConfig};
use dpu_storage::image::trace::{self, Trace};

fn skip_reason() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        return Some("not root".into());
    }
    for tool in ["docker-registry", "skopeo", "umoci", "mkfs.erofs"] {
        if Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Debian's docker-registry on a loopback port, storing into `dir`; killed on drop.
struct Registry {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Registry {
    fn start(dir: &Path, port: Option<u16>) -> Self {
        let port = port.unwrap_or_else(|| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        let config = dir.join("config.yml");
        let storage = dir.join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
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
        // Owned from here on: dropped (killed and reaped) on every path, the panic below included.
        let registry = Self { child, port, dir: dir.to_path_buf() };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return registry;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("docker-registry did not listen on {port}");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn tar_layer(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(if path.ends_with('/') { 0o755 } else { 0o644 });
        h.set_entry_type(if path.ends_with('/') { tar::EntryType::Directory } else { tar::EntryType::Regular });
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        tar.append(&h, *data).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// An OCI layout with one two-layer image tagged `v1`; the upper layer deletes a file of the lower one.
fn source_layout(dir: &Path, big: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> Digest {
        let d = Digest::of(data);
        std::fs::write(blobs.join(d.hex()), data).unwrap();
        d
    };
    let lower = tar_layer(&[
        ("etc/", b""),
        ("etc/os-release", b"ID=lazy\n"),
        ("etc/old", b"gone soon\n"),
        ("opt/", b""),
        ("opt/big.bin", big),
    ]);
    // Parents of changed paths are in the layer, as image builders write them.
    let upper = tar_layer(&[("etc/", b""), ("etc/.wh.old", b""), ("app/", b""), ("app/main.py", b"print('ready')\n")]);
    let diff_ids: Vec<String> = [&lower, &upper]
        .iter()
        .map(|gz| {
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw).unwrap();
            Digest::of(&raw).to_string()
        })
        .collect();
    let config = serde_json::json!({
        "architecture": Platform::host().architecture, "os": "linux",
        "config": {"Cmd": ["python3", "/app/main.py"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let layers: Vec<Descriptor> = [lower, upper]
        .iter()
        .map(|l| {
            put(l);
            Descriptor::of(oci::MEDIA_TYPE_OCI_LAYER_GZIP, l)
        })
        .collect();
    put(&config);
    let manifest = oci::Manifest::new(Descriptor::of(oci::MEDIA_TYPE_OCI_CONFIG, &config), layers).to_json();
    let mut entry = Descriptor::of(oci::MEDIA_TYPE_OCI_MANIFEST, &manifest);
    put(&manifest);
    entry.annotations.insert("org.opencontainers.image.ref.name".into(), "v1".into());
    std::fs::write(dir.join("index.json"), oci::Index::new(vec![entry]).to_json()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Path → SHA-256 of every regular file and symlink target under `root` (whiteouts and directories left out).
fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    let out = run(Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . -type f -print0 | sort -z | xargs -0 -r sha256sum", root.display())));
    let mut files: std::collections::BTreeMap<String, String> =
        out.lines().filter_map(|l| l.split_once("  ")).map(|(h, p)| (p.to_string(), h.to_string())).collect();
    // Owners, modes and modification times of directories, files and links.
    let meta = run(Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . -mindepth 1 ! -type c -printf '%p %U:%G %m %T@\\n' | sort", root.display())));
    for line in meta.lines() {
        if let Some((path, rest)) = line.split_once(' ') {
            files.insert(format!("{path} (meta)"), rest.to_string());
        }
    }
    files
}

struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

async fn read_all(volume: &LazyVolume) -> Result<Vec<u8>, VolumeError> {
    let blocks = volume.geometry().blocks;
    let mut out = Vec::new();
    let mut lba = 0;
    while lba < blocks {
        let n = (blocks - lba).min(32);
        let (buf, r) = volume.read(lba, vec![0; n as usize * 4096]).await;
        r?;
        out.extend_from_slice(&buf);
        lba += n;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_convert_in_a_real_registry_and_mount_lazily() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: lazy images against docker-registry ({reason})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut registry = Registry::start(&dir.path().join("registry"), None);
    let host = format!("127.0.0.1:{}", registry.port);
    let big: Vec<u8> =
        (0..2_000_000u32).map(|i| ((i / 7) as u8) ^ ((i.wrapping_mul(2_654_435_761) >> 27) as u8)).collect();
    let layout = dir.path().join("layout");
    source_layout(&layout, &big);

    // A real peer pushes the source image.
    run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{host}/src:v1")));

    let client = Arc::new(RegistryClient::new(RegistryConfig::default()).unwrap());
    let options = LayerOptions { chunk_size: 16384, ..LayerOptions::new(dir.path().join("work")) };
    let source = Source::parse(&format!("{host}/src:v1"), Credentials::Anonymous).unwrap();
    let destination =
        Destination { reference: format!("{host}/lazy:v1").parse().unwrap(), credentials: Credentials::Anonymous };
    let events = std::sync::Mutex::new(Vec::new());
    let record = |p: Progress| events.lock().unwrap().push(p);
    let first = convert_image(&client, &source, &destination, &Platform::host(), &options, &record).await.unwrap();
    assert_eq!((first.layers, first.layers_reused), (2, 0));
    assert!(first.bytes_in > 0 && first.bytes_out > 0 && first.chunks > 0, "{first:?}");
    assert!(events.lock().unwrap().iter().any(|e| matches!(e, Progress::LayerDone { layer: 1, reused: false, .. })));

    // Converting again reuses both layers and gives the same manifest.
    let again = convert_image(&client, &source, &destination, &Platform::host(), &options, &|_| {}).await.unwrap();
    assert_eq!(again.manifest, first.manifest, "reproducible");
    assert_eq!((again.layers_reused, again.bytes_in), (2, 0));
    assert_eq!(again.chunks_reused, again.chunks);
    // From the layout directory, with a fresh work directory (nothing remembered): the same digests again.
    let fresh = LayerOptions { chunk_size: 16384, ..LayerOptions::new(dir.path().join("work2")) };
    let from_layout = Source::parse(&format!("oci:{}:v1", layout.display()), Credentials::Anonymous).unwrap();
    let other = Destination {
        reference: format!("{host}/lazy:from-layout").parse().unwrap(),
        credentials: Credentials::Anonymous,
    };
    let third = convert_image(&client, &from_layout, &other, &Platform::host(), &fresh, &|_| {}).await.unwrap();
    assert_eq!(third.layers_reused, 0);
    assert_eq!(third.manifest, first.manifest, "every conversion of the same image gives the same bytes");

    // skopeo reads the converted image back.
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/lazy:v1")));
    assert_eq!(Digest::of(raw.as_bytes()), first.manifest.unwrap(), "skopeo sees the manifest we pushed");
    let inspect =
        run(Command::new("skopeo").args(["inspect", "--tls-verify=false"]).arg(format!("docker://{host}/lazy:v1")));
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 4, "an index and a data blob per layer");

    // The host's view: each layer a lazy volume over the registry, mounted read-only, stacked with overlayfs.
    let lazy: Reference = format!("{host}/lazy:v1").parse().unwrap();
    let resolved = client.get_manifest(&lazy, &Credentials::Anonymous, &Platform::host()).await.unwrap();
    let layers = lazy_layers(&resolved.manifest).unwrap();
    let cache = ChunkCache::open(CacheConfig::new(dir.path().join("cache"), 256 << 20)).unwrap();
    let policy = FetchPolicy {
        deadline: Duration::from_secs(1),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        ..FetchPolicy::default()
    };
    let mut volumes = Vec::new();
    for l in &layers {
        let index = client.get_blob(&lazy, &Credentials::Anonymous, &l.index.digest, None).await.unwrap();
        let index = Arc::new(ChunkIndex::decode(&index).unwrap());
        assert_eq!(index.data_digest, l.data.digest);
        let blob = RegistryBlob {
            client: client.clone(),
            repository: lazy.clone(),
            credentials: Credentials::Anonymous,
            digest: l.data.digest,
        };
        volumes.push(LazyVolume::new(index, Arc::new(blob), cache.clone(), policy));
    }
    // Part of the lower layer first: the registry then goes away, and an uncached read fails at the deadline.
    let (_, r) = volumes[0].read(0, vec![0; 4096]).await;
    r.unwrap();
    registry.stop();
    let blocks = volumes[0].geometry().blocks;
    let started = std::time::Instant::now();
    let (_, r) = volumes[0].read(blocks - 1, vec![0; 4096]).await;
    assert!(matches!(&r, Err(VolumeError::Unavailable(m)) if m.contains("unavailable")), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "failed at the deadline, not hung");
    let (_, r) = volumes[0].read(0, vec![0; 4096]).await;
    r.unwrap();
    // Back on the same port: reads succeed again, nothing reopened.
    let port = registry.port;
    let registry = Registry::start(&registry.dir.clone(), Some(port));
    let mut mounts = Mounts(Vec::new());
    let mut lowers = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        let image = dir.path().join(format!("layer{i}.img"));
        std::fs::write(&image, read_all(v).await.unwrap()).unwrap();
        let mnt = dir.path().join(format!("layer{i}"));
        std::fs::create_dir(&mnt).unwrap();
        run(Command::new("mount").args(["-t", "erofs", "-o", "loop,ro"]).arg(&image).arg(&mnt));
        mounts.0.push(mnt.clone());
        lowers.push(mnt);
    }
    drop(registry);
    let fetched: u64 = volumes.iter().map(|v| v.stats().fetched_bytes.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(fetched > 0);
    let (upper, work, rootfs) = (dir.path().join("upper"), dir.path().join("ovl-work"), dir.path().join("rootfs"));
    for d in [&upper, &work, &rootfs] {
        std::fs::create_dir(d).unwrap();
    }
    let lowerdir = lowers.iter().rev().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
    let opts = format!("lowerdir={lowerdir},upperdir={},workdir={}", upper.display(), work.display());
    run(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(&rootfs));
    mounts.0.push(rootfs.clone());
    assert!(!rootfs.join("etc/old").exists(), "the upper layer's whiteout hides the lower file");
    assert_eq!(std::fs::read(rootfs.join("opt/big.bin")).unwrap(), big);

    // The reference: umoci's own extraction of the source image.
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:v1", layout.display())).arg(&bundle));
    let expected = tree(&bundle.join("rootfs"));
    assert!(expected.contains_key("./app/main.py") && !expected.contains_key("./etc/old"));
    assert_eq!(tree(&rootfs), expected, "the lazily served image holds exactly the files umoci extracts");

    // The start-up trace: stored beside the image, read back, and replayed into an empty cache on a "second DPU".
    let registry = Registry::start(&dir.path().join("registry"), Some(port));
    let resolved_layers: Vec<ResolvedLayer> = layers
        .iter()
        .zip(&volumes)
        .map(|(l, v)| ResolvedLayer { layer: l.clone(), volume: v.clone(), shared: Arc::new(v.clone()) })
        .collect();
    let recorded = Trace::recorded(&resolved_layers);
    assert_eq!(
        recorded.chunks(),
        volumes.iter().map(|v| v.index().chunks.len()).sum::<usize>(),
        "every chunk was read"
    );
    let subject = Descriptor {
        media_type: resolved.media_type.clone(),
        digest: resolved.digest,
        size: resolved.bytes.len() as u64,
        platform: None,
        annotations: Default::default(),
        artifact_type: resolved.manifest.artifact_type.clone(),
    };
    trace::store(&client, &lazy, &Credentials::Anonymous, subject, &recorded).await.unwrap();
    let loaded = trace::load(&client, &lazy, &Credentials::Anonymous, &resolved.digest).await.unwrap();
    assert_eq!(loaded.as_ref(), Some(&recorded));
    assert_eq!(trace::load(&client, &lazy, &Credentials::Anonymous, &Digest::of(b"other")).await.unwrap(), None);
    let cold = ChunkCache::open(CacheConfig::new(dir.path().join("cache2"), 256 << 20)).unwrap();
    let second: Vec<ResolvedLayer> = resolved_layers
        .iter()
        .map(|l| {
            let blob = RegistryBlob {
                client: client.clone(),
                repository: lazy.clone(),
                credentials: Credentials::Anonymous,
                digest: l.layer.data.digest,
            };
            let index = Arc::new(l.volume.index().clone());
            let v = LazyVolume::new(index, Arc::new(blob), cold.clone(), policy);
            ResolvedLayer { layer: l.layer.clone(), shared: Arc::new(v.clone()), volume: v }
        })
        .collect();
    let cached = trace::replay(&second, &loaded.unwrap()).await;
    assert_eq!(cached, recorded.chunks());
    for l in &second {
        assert_eq!(l.volume.cached().0, l.volume.index().chunks.len(), "the traced chunks are prefetched");
        let fetches = l.volume.stats().fetches.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(read_all(&l.volume).await.unwrap().len() as u64, l.volume.index().image_size);
        assert_eq!(l.volume.stats().fetches.load(std::sync::atomic::Ordering::Relaxed), fetches, "no fetch on read");
    }
    drop(registry);
}
