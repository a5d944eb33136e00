//! The registry client against real peers: Debian's `docker-registry` (distribution v2.8) anonymous and with
//! htpasswd Basic auth, `skopeo` reading what the client pushed and pushing what the client reads, and small
//! in-process HTTP servers for what a stock registry cannot be made to do: a bearer token service with short
//! token lifetimes, redirects to another host, wrong content, oversized answers, and a registry that is down.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use dpu_storage::image::Digest;
use dpu_storage::image::oci::{
    self, Descriptor, Index, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_LAYER_GZIP,
    MEDIA_TYPE_OCI_MANIFEST, Manifest, OciError, Platform,
};
use dpu_storage::image::registry::{Credentials, Reference, RegistryClient, RegistryConfig, RegistryError};
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt as _;

const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";
const USER: &str = "puller";
const PASSWORD: &str = "pull-Secret-4711";
/// bcrypt (cost 4) of `PASSWORD`, the only hash format the registry's htpasswd accepts; fixed so the test needs
/// no htpasswd tool.
const PASSWORD_BCRYPT: &str = "$2b$04$GC2tMJ1dlAk.qpUBHOCcgeIz9DhU7zzolQaa4VtwsH52qMwFq5HZq";

fn have(tool: &str) -> bool {
    let found = Path::new(tool).is_file()
        || std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()));
    if !found {
        eprintln!("SKIPPED: {tool} is not installed (apt-get install docker-registry skopeo)");
    }
    found
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `docker-registry` process on a free loopback port, storing in a temporary directory; killed on drop.
struct DockerRegistry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl DockerRegistry {
    fn start(htpasswd: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let auth = match htpasswd {
            Some(line) => {
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{line}\n")).unwrap();
                format!("auth:\n  htpasswd:\n    realm: dpu-test\n    path: {}\n", path.display())
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: dpu-test\n{auth}",
            dir.path().join("data").display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(DOCKER_REGISTRY)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let registry = Self { child, port, _dir: dir };
        registry.wait_ready();
        registry
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.write_all(b"GET /v2/ HTTP/1.0\r\nHost: localhost\r\n\r\n");
                let mut head = [0u8; 12];
                if stream.read_exact(&mut head).is_ok() && (head.ends_with(b"200") || head.ends_with(b"401")) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default();
        panic!("docker-registry did not answer on port {} within 20 s:\n{log}", self.port);
    }

    fn reference(&self, name: &str) -> Reference {
        format!("127.0.0.1:{}/{name}", self.port).parse().unwrap()
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> RegistryClient {
    RegistryClient::new(RegistryConfig::default()).unwrap()
}

fn skopeo(args: &[&str]) -> Vec<u8> {
    let output = Command::new("skopeo").args(args).output().unwrap();
    assert!(output.status.success(), "skopeo {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

fn skopeo_digest(args: &[&str]) -> Digest {
    let json: serde_json::Value = serde_json::from_slice(&skopeo(args)).unwrap();
    json["Digest"].as_str().unwrap().parse().unwrap()
}

/// A gzip-compressed tar holding `files`, and the digest of the uncompressed tar (its diff ID).
fn gzip_layer(files: &[(&str, &[u8])]) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, name, *data).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    (gz.finish().unwrap(), Digest::of(&tar))
}

fn gunzip_file(layer: &[u8], name: &str) -> Vec<u8> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(name) {
            let mut out = Vec::new();
            entry.read_to_end(&mut out).unwrap();
            return out;
        }
    }
    panic!("{name} is not in the layer");
}

fn image_config(architecture: &str, diff_id: &Digest) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Entrypoint": ["/hello"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id.to_string()] },
    }))
    .unwrap()
}

/// Pushes a one-layer image for `architecture` under `tag` and returns its manifest bytes.
async fn push_image(
    client: &RegistryClient,
    r: &Reference,
    creds: &Credentials,
    tag: &str,
    architecture: &str,
    layer: &[u8],
    diff_id: &Digest,
) -> Bytes {
    let config = image_config(architecture, diff_id);
    let config_desc = Descriptor::of(MEDIA_TYPE_OCI_CONFIG, &config);
    client.push_blob(r, creds, &config_desc.digest, Bytes::from(config)).await.unwrap();
    let layer_desc = Descriptor::of(MEDIA_TYPE_OCI_LAYER_GZIP, layer);
    client.push_blob(r, creds, &layer_desc.digest, Bytes::copy_from_slice(layer)).await.unwrap();
    let bytes = Bytes::from(Manifest::new(config_desc, vec![layer_desc]).to_json());
    let digest = client.push_manifest(r, creds, tag, MEDIA_TYPE_OCI_MANIFEST, bytes.clone()).await.unwrap();
    assert_eq!(digest, Digest::of(&bytes));
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_and_pulls_against_docker_registry_and_skopeo_agrees() {
    if !have(DOCKER_REGISTRY) || !have("skopeo") {
        return;
    }
    let registry = DockerRegistry::start(None);
    let client = client();
    let anon = Credentials::Anonymous;
    let r = registry.reference("dpu/hello:v1");
    let payload: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (layer, diff_id) = gzip_layer(&[("hello", b"#!/bin/sh\necho hello\n"), ("data.bin", &payload)]);
    let layer_digest = Digest::of(&layer);

    assert_eq!(client.head_blob(&r, &anon, &layer_digest).await.unwrap(), None);
    let manifest_bytes = push_image(&client, &r, &anon, "v1", "amd64", &layer, &diff_id).await;
    let manifest_digest = Digest::of(&manifest_bytes);
    // A second push finds the blob and uploads nothing.
    assert!(!client.push_blob(&r, &anon, &layer_digest, Bytes::from(layer.clone())).await.unwrap());

    let host = Platform::host();
    let resolved = client.get_manifest(&r, &anon, &host).await.unwrap();
    assert_eq!((resolved.digest, &resolved.bytes, resolved.index_digest), (manifest_digest, &manifest_bytes, None));
    assert_eq!(resolved.media_type, MEDIA_TYPE_OCI_MANIFEST);
    assert_eq!(resolved.manifest.layers[0].digest, layer_digest);
    let pinned = r.with_digest(manifest_digest);
    assert_eq!(client.get_manifest(&pinned, &anon, &host).await.unwrap().bytes, manifest_bytes);

    // Whole blob, a range, HEAD, a stream.
    assert_eq!(client.get_blob(&r, &anon, &layer_digest, None).await.unwrap(), layer);
    let range = 100..4196;
    let part = client.get_blob(&r, &anon, &layer_digest, Some(range.clone())).await.unwrap();
    assert_eq!(&part[..], &layer[100..4196]);
    let len = layer.len() as u64;
    let tail = client.get_blob(&r, &anon, &layer_digest, Some(len - 1..len)).await.unwrap();
    assert_eq!(&tail[..], &layer[layer.len() - 1..]);
    assert_eq!(client.head_blob(&r, &anon, &layer_digest).await.unwrap(), Some(len));
    let mut reader = client.blob_reader(&r, &anon, &layer_digest).await.unwrap();
    assert_eq!(reader.content_length(), Some(len));
    let mut streamed = Vec::new();
    reader.read_to_end(&mut streamed).await.unwrap();
    assert_eq!(Digest::of(&streamed), layer_digest);
    assert_eq!(gunzip_file(&streamed, "data.bin"), payload);

    // What is not there.
    let missing = Digest::of(b"missing");
    match client.get_blob(&r, &anon, &missing, None).await {
        Err(RegistryError::NotFound { detail, .. }) => assert!(detail.contains("BLOB_UNKNOWN"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let err = client.get_manifest(&r.with_tag("nope").unwrap(), &anon, &host).await.unwrap_err();
    assert!(matches!(&err, RegistryError::NotFound { detail, .. } if detail.contains("MANIFEST_UNKNOWN")), "{err}");
    assert!(!err.is_retryable());
    let err = client.get_blob(&r, &anon, &layer_digest, Some(len..len + 10)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)), "{err}");

    // An independent client sees the same manifest.
    let url = format!("docker://127.0.0.1:{}/dpu/hello:v1", registry.port);
    assert_eq!(skopeo_digest(&["inspect", "--tls-verify=false", &url]), manifest_digest);
    assert_eq!(skopeo(&["inspect", "--tls-verify=false", "--raw", &url]), manifest_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_resolves_to_the_wanted_platform() {
    if !have(DOCKER_REGISTRY) || !have("skopeo") {
        return;
    }
    let registry = DockerRegistry::start(None);
    let client = client();
    let anon = Credentials::Anonymous;
    let r = registry.reference("dpu/multi:latest");
    let (layer, diff_id) = gzip_layer(&[("hello", b"multi-arch\n")]);

    let mut entries = Vec::new();
    let mut digests = HashMap::new();
    for architecture in ["amd64", "arm64"] {
        let bytes = Bytes::from(image_config(architecture, &diff_id));
        let config = Descriptor::of(MEDIA_TYPE_OCI_CONFIG, &bytes);
        client.push_blob(&r, &anon, &config.digest, bytes).await.unwrap();
        client.push_blob(&r, &anon, &Digest::of(&layer), Bytes::from(layer.clone())).await.unwrap();
        let manifest = Manifest::new(config, vec![Descriptor::of(MEDIA_TYPE_OCI_LAYER_GZIP, &layer)]).to_json();
        let mut entry = Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, &manifest);
        // Pushed by digest, untagged, as an index's children are.
        let pushed = client
            .push_manifest(&r, &anon, &entry.digest.to_string(), MEDIA_TYPE_OCI_MANIFEST, Bytes::from(manifest))
            .await
            .unwrap();
        assert_eq!(pushed, entry.digest);
        entry.platform = Some(format!("linux/{architecture}").parse().unwrap());
        digests.insert(architecture, entry.digest);
        entries.push(entry);
    }
    let index = Bytes::from(Index::new(entries).to_json());
    let index_digest = client.push_manifest(&r, &anon, "latest", MEDIA_TYPE_OCI_INDEX, index.clone()).await.unwrap();

    for architecture in ["amd64", "arm64"] {
        let platform: Platform = format!("linux/{architecture}").parse().unwrap();
        let resolved = client.get_manifest(&r, &anon, &platform).await.unwrap();
        assert_eq!(resolved.digest, digests[architecture], "{architecture}");
        assert_eq!(resolved.index_digest, Some(index_digest));
        // skopeo reports the top-level digest and, with --config, the config of the instance it selected.
        let url = format!("docker://127.0.0.1:{}/dpu/multi:latest", registry.port);
        let args = ["--override-os", "linux", "--override-arch", architecture, "inspect", "--tls-verify=false", &url];
        assert_eq!(skopeo_digest(&args), index_digest);
        let mut args = args.to_vec();
        args.extend(["--config", "--raw"]);
        let config = skopeo(&args);
        assert_eq!(Digest::of(&config), resolved.manifest.config.digest, "skopeo selects {architecture} the same");
    }
    let arm64_v8: Platform = "linux/arm64/v8".parse().unwrap();
    assert_eq!(client.get_manifest(&r, &anon, &arm64_v8).await.unwrap().digest, digests["arm64"]);
    match client.get_manifest(&r, &anon, &"linux/s390x".parse().unwrap()).await {
        Err(RegistryError::Manifest(OciError::NoMatchingPlatform { available, .. })) => {
            assert_eq!(available, "linux/amd64, linux/arm64");
        }
        other => panic!("{other:?}"),
    }
    let raw = client.get_manifest_raw(&r, &anon).await.unwrap();
    assert_eq!((raw.digest, &raw.bytes), (index_digest, &index));
    assert_eq!(raw.content_type.as_deref(), Some(MEDIA_TYPE_OCI_INDEX));
    let url = format!("docker://127.0.0.1:{}/dpu/multi:latest", registry.port);
    assert_eq!(skopeo(&["inspect", "--tls-verify=false", "--raw", &url]), index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_against_docker_registry() {
    if !have(DOCKER_REGISTRY) {
        return;
    }
    let registry = DockerRegistry::start(Some(&format!("{USER}:{PASSWORD_BCRYPT}")));
    let client = client();
    let r = registry.reference("private/app:v1");
    let creds = Credentials::Basic { username: USER.into(), password: PASSWORD.into() };
    let (layer, diff_id) = gzip_layer(&[("secret", b"only for puller\n")]);

    let err = client.head_blob(&r, &Credentials::Anonymous, &Digest::of(&layer)).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Unauthorized(m) if m.contains("user name and password")), "{err}");
    let wrong_password = "Wr0ng-Passw0rd-Value";
    let wrong = Credentials::Basic { username: USER.into(), password: wrong_password.into() };
    let err = client.head_blob(&r, &wrong, &Digest::of(&layer)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unauthorized(_)), "{err}");
    assert!(!format!("{err} {err:?}").contains(wrong_password));

    let manifest = push_image(&client, &r, &creds, "v1", "amd64", &layer, &diff_id).await;
    let resolved = client.get_manifest(&r, &creds, &"linux/amd64".parse().unwrap()).await.unwrap();
    assert_eq!(resolved.bytes, manifest);
    assert_eq!(client.get_blob(&r, &creds, &Digest::of(&layer), None).await.unwrap(), layer);
    let debug = format!("{client:?} {creds:?}");
    assert!(!debug.contains(PASSWORD), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_what_skopeo_copied_from_an_oci_layout() {
    if !have(DOCKER_REGISTRY) || !have("skopeo") {
        return;
    }
    let registry = DockerRegistry::start(None);
    let layout = tempfile::tempdir().unwrap();
    let (layer, diff_id) = gzip_layer(&[("etc/motd", b"copied by skopeo\n")]);
    let config = image_config("arm64", &diff_id);
    let manifest = Manifest::new(
        Descriptor::of(MEDIA_TYPE_OCI_CONFIG, &config),
        vec![Descriptor::of(MEDIA_TYPE_OCI_LAYER_GZIP, &layer)],
    )
    .to_json();
    let mut entry = Descriptor::of(MEDIA_TYPE_OCI_MANIFEST, &manifest);
    entry.annotations = BTreeMap::from([("org.opencontainers.image.ref.name".to_owned(), "v1".to_owned())]);
    write_oci_layout(layout.path(), &[&config, &layer, &manifest], &Index::new(vec![entry]));

    let source = format!("oci:{}:v1", layout.path().display());
    let target = format!("docker://127.0.0.1:{}/copied/motd:v1", registry.port);
    skopeo(&["--insecure-policy", "copy", "--dest-tls-verify=false", &source, &target]);

    let client = client();
    let r = registry.reference("copied/motd:v1");
    let anon = Credentials::Anonymous;
    let resolved = client.get_manifest(&r, &anon, &"linux/arm64".parse().unwrap()).await.unwrap();
    assert_eq!(resolved.digest, Digest::of(&manifest), "skopeo copied the manifest unchanged");
    let layer_desc = &resolved.manifest.layers[0];
    assert_eq!(oci::layer_compression(&layer_desc.media_type), Some(oci::LayerCompression::Gzip));
    let fetched = client.get_blob(&r, &anon, &layer_desc.digest, None).await.unwrap();
    assert_eq!(gunzip_file(&fetched, "etc/motd"), b"copied by skopeo\n");
    let fetched_config = client.get_blob(&r, &anon, &resolved.manifest.config.digest, None).await.unwrap();
    assert_eq!(fetched_config, config);
}

fn write_oci_layout(dir: &Path, blobs: &[&[u8]], index: &Index) {
    let blob_dir: PathBuf = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).unwrap();
    for blob in blobs {
        std::fs::write(blob_dir.join(Digest::of(blob).hex()), blob).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(dir.join("index.json"), index.to_json()).unwrap();
}

type Handler = Arc<dyn Fn(&http::request::Parts) -> Response<Full<Bytes>> + Send + Sync>;

/// An HTTP/1.1 server on a free loopback port answering every request with `handler`.
async fn serve(handler: Handler) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                    let response = handler(&request.into_parts().0);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

fn respond(status: StatusCode, headers: &[(&str, String)], body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    for (name, value) in headers {
        response.headers_mut().append(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_str(value).unwrap(),
        );
    }
    response
}

fn authorization(parts: &http::request::Parts) -> Option<String> {
    parts.headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned())
}

/// A token service, a registry demanding its tokens, and an object store the registry redirects blobs to.
#[derive(Default)]
struct BearerWorld {
    token_requests: AtomicUsize,
    token_queries: Mutex<Vec<String>>,
    /// Token to when it was issued.
    issued: Mutex<HashMap<String, Instant>>,
    /// Tokens issued before this are refused.
    revoked_before: Mutex<Option<Instant>>,
    expired_presented: AtomicUsize,
    registry_requests: AtomicUsize,
    object_requests: AtomicUsize,
    object_saw_authorization: AtomicBool,
}

const TOKEN_LIFETIME: Duration = Duration::from_secs(3);

impl BearerWorld {
    fn token_service(self: &Arc<Self>) -> Handler {
        let world = self.clone();
        Arc::new(move |parts| {
            world.token_requests.fetch_add(1, Ordering::SeqCst);
            world.token_queries.lock().unwrap().push(parts.uri.query().unwrap_or_default().to_owned());
            let expected =
                format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")));
            if authorization(parts).as_deref() != Some(expected.as_str()) {
                let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
                return respond(StatusCode::UNAUTHORIZED, &[], body);
            }
            let mut issued = world.issued.lock().unwrap();
            let token = format!("tok-{}", issued.len() + 1);
            issued.insert(token.clone(), Instant::now());
            let body = serde_json::json!({ "token": token, "expires_in": TOKEN_LIFETIME.as_secs(), "issued_at": "2026-01-01T00:00:00Z" });
            respond(StatusCode::OK, &[("content-type", "application/json".into())], body.to_string())
        })
    }

    /// Whether `authorization` carries a live token; counts expired ones.
    fn token_valid(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else { return false };
        let Some(&issued) = self.issued.lock().unwrap().get(token) else { return false };
        if self.revoked_before.lock().unwrap().is_some_and(|cut| issued < cut) {
            return false;
        }
        if issued.elapsed() >= TOKEN_LIFETIME {
            self.expired_presented.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn registry(self: &Arc<Self>, token_addr: SocketAddr, object_addr: SocketAddr, blob: Bytes) -> Handler {
        let world = self.clone();
        let digest = Digest::of(&blob);
        Arc::new(move |parts| {
            world.registry_requests.fetch_add(1, Ordering::SeqCst);
            if !world.token_valid(authorization(parts).as_deref()) {
                let challenge = format!(
                    r#"Bearer realm="http://{token_addr}/token",service="fake-registry",scope="repository:team/app:pull""#
                );
                let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
                return respond(StatusCode::UNAUTHORIZED, &[("www-authenticate", challenge)], body);
            }
            if parts.uri.path() != format!("/v2/team/app/blobs/{digest}") {
                return respond(StatusCode::NOT_FOUND, &[], r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#);
            }
            if parts.method == http::Method::HEAD {
                let headers =
                    [("content-length", blob.len().to_string()), ("docker-content-digest", digest.to_string())];
                return respond(StatusCode::OK, &headers, Bytes::new());
            }
            let location = format!("http://{object_addr}/objects/{}?X-Signature=abc", digest.hex());
            respond(StatusCode::TEMPORARY_REDIRECT, &[("location", location)], Bytes::new())
        })
    }

    fn object_store(self: &Arc<Self>, blob: Bytes) -> Handler {
        let world = self.clone();
        Arc::new(move |parts| {
            world.object_requests.fetch_add(1, Ordering::SeqCst);
            if parts.headers.contains_key(header::AUTHORIZATION) {
                world.object_saw_authorization.store(true, Ordering::SeqCst);
            }
            respond(StatusCode::OK, &[], blob.clone())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_cached_refreshed_and_never_follow_redirects() {
    let world = Arc::new(BearerWorld::default());
    let blob = Bytes::from_static(b"a blob kept in an object store");
    let digest = Digest::of(&blob);
    let token_addr = serve(world.token_service()).await;
    let object_addr = serve(world.object_store(blob.clone())).await;
    let registry_addr = serve(world.registry(token_addr, object_addr, blob.clone())).await;
    let client = client();
    let r: Reference = format!("{registry_addr}/team/app").parse().unwrap();
    let creds = Credentials::Basic { username: USER.into(), password: PASSWORD.into() };
    let tokens = || world.token_requests.load(Ordering::SeqCst);

    // First request: 401, a token, the retry, a redirect to the object store without Authorization.
    assert_eq!(client.get_blob(&r, &creds, &digest, None).await.unwrap(), blob);
    let first = Instant::now();
    assert_eq!(tokens(), 1);
    assert_eq!(world.object_requests.load(Ordering::SeqCst), 1);
    assert!(!world.object_saw_authorization.load(Ordering::SeqCst), "credentials leaked to the object store");
    let query = world.token_queries.lock().unwrap()[0].clone();
    assert!(
        query.contains("service=fake-registry") && query.contains("scope=repository%3Ateam%2Fapp%3Apull"),
        "{query}"
    );

    // While valid, the token is reused: no more token requests, no more 401s.
    let before = world.registry_requests.load(Ordering::SeqCst);
    assert_eq!(client.head_blob(&r, &creds, &digest).await.unwrap(), Some(blob.len() as u64));
    assert_eq!(client.get_blob(&r, &creds, &digest, None).await.unwrap(), blob);
    assert_eq!(tokens(), 1);
    assert_eq!(world.registry_requests.load(Ordering::SeqCst), before + 2);

    // Within the last tenth of its lifetime the token is replaced before it is sent, never presented expired.
    tokio::time::sleep_until((first + TOKEN_LIFETIME - Duration::from_millis(200)).into()).await;
    assert_eq!(client.get_blob(&r, &creds, &digest, None).await.unwrap(), blob);
    assert_eq!(tokens(), 2);
    assert_eq!(world.expired_presented.load(Ordering::SeqCst), 0);

    // A token the registry stops accepting is dropped and replaced once.
    *world.revoked_before.lock().unwrap() = Some(Instant::now());
    assert_eq!(client.get_blob(&r, &creds, &digest, None).await.unwrap(), blob);
    assert_eq!(tokens(), 3);
    assert!(!world.object_saw_authorization.load(Ordering::SeqCst));

    // Refused credentials and anonymous access are unauthorized, and nothing secret is shown anywhere.
    let wrong_password = "Wr0ng-Passw0rd-Value";
    let wrong = Credentials::Basic { username: USER.into(), password: wrong_password.into() };
    let err = client.get_blob(&r, &wrong, &digest, None).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Unauthorized(m) if m.contains("bad credentials")), "{err}");
    assert!(!err.is_retryable());
    let err_anon = client.get_blob(&r, &Credentials::Anonymous, &digest, None).await.unwrap_err();
    assert!(matches!(err_anon, RegistryError::Unauthorized(_)), "{err_anon}");
    let shown = format!("{client:?} {creds:?} {wrong:?} {err} {err:?} {err_anon:?}");
    for secret in [PASSWORD, wrong_password, "tok-"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }

    // A pre-issued token is sent as is; a refused one is an error, not a token request.
    let issued = tokens();
    let token = Credentials::Token("tok-1".into());
    let err = client.head_blob(&r, &token, &digest).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Unauthorized(m) if m.contains("refused the bearer token")), "{err}");
    assert_eq!(tokens(), issued);
    assert!(!format!("{token:?}").contains("tok-1"));
}

/// A registry that misbehaves in every way a client must survive.
fn misbehaving_registry(blob: Bytes, manifest: Bytes) -> Handler {
    let digest = Digest::of(&blob);
    Arc::new(move |parts| {
        let path = parts.uri.path();
        let range = parts.headers.get(header::RANGE).map(|v| v.to_str().unwrap().to_owned());
        match path.strip_prefix("/v2/bad/") {
            Some(p) if p == format!("blobs/{digest}") && range.is_none() => {
                respond(StatusCode::OK, &[], Bytes::from_static(b"not the blob you asked for"))
            }
            // Ignores Range and sends the whole blob.
            Some(p) if p == format!("blobs/{digest}") => respond(StatusCode::OK, &[], blob.clone()),
            Some("blobs/sha256:2222222222222222222222222222222222222222222222222222222222222222") => {
                respond(StatusCode::PARTIAL_CONTENT, &[("content-range", "bytes 0-3/100".into())], "abcd")
            }
            Some("manifests/huge") => respond(StatusCode::OK, &[], vec![b' '; oci::MAX_MANIFEST_BYTES + 1]),
            Some("manifests/lying") => {
                let wrong = Digest::of(b"something else").to_string();
                let headers = [("docker-content-digest", wrong), ("content-type", MEDIA_TYPE_OCI_MANIFEST.into())];
                respond(StatusCode::OK, &headers, manifest.clone())
            }
            Some("manifests/busy") => {
                let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"try again later"}]}"#;
                respond(StatusCode::SERVICE_UNAVAILABLE, &[], body)
            }
            Some("manifests/loop") => respond(StatusCode::FOUND, &[("location", "/v2/bad/manifests/loop".into())], ""),
            Some("manifests/downgrade") => {
                respond(StatusCode::FOUND, &[("location", "http://example.com/v2/x".into())], "")
            }
            _ => respond(StatusCode::NOT_FOUND, &[], ""),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_registry_gives_clear_errors() {
    let blob = Bytes::from((0..=255u8).collect::<Vec<u8>>());
    let digest = Digest::of(&blob);
    let manifest = Bytes::from(Manifest::new(Descriptor::of(MEDIA_TYPE_OCI_CONFIG, b"{}"), vec![]).to_json());
    let addr = serve(misbehaving_registry(blob.clone(), manifest)).await;
    let client = client();
    let anon = Credentials::Anonymous;
    let r: Reference = format!("{addr}/bad").parse().unwrap();
    let host = Platform::host();

    let err = client.get_blob(&r, &anon, &digest, None).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { expected, .. } if expected == digest), "{err}");
    assert!(!err.is_retryable());
    // A registry that ignores Range: the slice is cut from the stream.
    assert_eq!(&client.get_blob(&r, &anon, &digest, Some(10..20)).await.unwrap()[..], &blob[10..20]);
    assert!(matches!(client.get_blob(&r, &anon, &digest, Some(250..300)).await, Err(RegistryError::Invalid(_))));
    assert!(matches!(client.get_blob(&r, &anon, &digest, Some(5..5)).await, Err(RegistryError::Invalid(_))));
    let other: Digest = "sha256:2222222222222222222222222222222222222222222222222222222222222222".parse().unwrap();
    let err = client.get_blob(&r, &anon, &other, Some(10..14)).await.unwrap_err();
    assert!(matches!(&err, RegistryError::Protocol(m) if m.contains("bytes 0-3/100")), "{err}");

    let get = |tag: &str| {
        let r = r.with_tag(tag).unwrap();
        let client = client.clone();
        let host = host.clone();
        async move { client.get_manifest(&r, &Credentials::Anonymous, &host).await.unwrap_err() }
    };
    let err = get("huge").await;
    assert!(matches!(err, RegistryError::TooLarge { limit, .. } if limit == oci::MAX_MANIFEST_BYTES as u64), "{err}");
    assert!(matches!(get("lying").await, RegistryError::DigestMismatch { .. }));
    let err = get("busy").await;
    assert!(err.is_retryable() && err.to_string().contains("UNAVAILABLE: try again later"), "{err}");
    assert!(matches!(&get("loop").await, RegistryError::Protocol(m) if m.contains("redirects")));
    assert!(matches!(&get("downgrade").await, RegistryError::Protocol(m) if m.contains("plain http")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_down_fails_fast_and_retryably() {
    let port = free_port();
    let client = client();
    let r: Reference = format!("127.0.0.1:{port}/down/app").parse().unwrap();
    let started = Instant::now();
    let err = client.get_blob(&r, &Credentials::Anonymous, &Digest::of(b"x"), None).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)) && err.is_retryable(), "{err}");
    assert!(err.to_string().contains("onnection refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());

    // A registry that accepts connections and never answers times out, also retryably.
    let silent = StdListener::bind("127.0.0.1:0").unwrap();
    let config = RegistryConfig { request_timeout: Duration::from_millis(300), ..Default::default() };
    let client = RegistryClient::new(config).unwrap();
    let r: Reference = format!("{}/silent/app", silent.local_addr().unwrap()).parse().unwrap();
    let started = Instant::now();
    let err = client.head_blob(&r, &Credentials::Anonymous, &Digest::of(b"x")).await.unwrap_err();
    assert!(err.is_retryable() && err.to_string().contains("no response within"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}
