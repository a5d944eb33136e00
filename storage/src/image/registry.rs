//! A client for the OCI distribution API (the registry HTTP API v2): manifests and blobs pulled and pushed over
//! HTTP/1.1, TLS by rustls with the ring provider.
//!
//! - **References** are `[registry/]repository[:tag][@sha256:…]` with Docker Hub's defaults (`docker.io`, the
//!   `library/` prefix, the API at `registry-1.docker.io`); see [`Reference`].
//! - **Transport**: HTTPS, except for the hosts in [`RegistryConfig::plain_http_hosts`] (by default the loopback
//!   names, where plain HTTP crosses no wire). Redirects of GET and HEAD are followed (at most 5); a redirect to
//!   another scheme or host (a blob served from an object store) drops the `Authorization` header, and a
//!   redirect from HTTPS to plain HTTP is refused unless the target host is allowed plain HTTP.
//! - **Authentication** follows `WWW-Authenticate`: `Basic` is answered with the given credentials; `Bearer`
//!   sends them to the token realm for a token scoped to the repository (`pull`, or `pull,push` for uploads),
//!   which is cached per host, scope and credentials and refreshed shortly before it expires. A request refused
//!   with a cached token drops it and authenticates once more. Credentials and tokens are never logged, and the
//!   `Debug` output of [`Credentials`] and [`RegistryClient`] redacts them.
//! - **Verification**: manifests are checked against the digest they were asked by or, failing that, the
//!   registry's `Docker-Content-Digest`; whole blobs against their digest. Ranges cannot be verified here (the
//!   caller checks its chunks); streamed blobs ([`RegistryClient::blob_reader`]) are verified by the caller.
//! - **Bounds**: every body read into memory has a limit (manifests 4 MiB, token responses and error bodies
//!   64 KiB, whole blobs [`RegistryConfig::max_buffered_blob`]); a response larger than that is an error before
//!   or while it is read, never a large allocation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::io;
use std::net::Ipv6Addr;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, ReadBuf};

use super::Digest;
use super::oci::{self, Manifest, OciError, Parsed, Platform};

/// The registry name Docker Hub references normalize to.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's registry API is served from.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

const MAX_REFERENCE_INPUT: usize = 4096;
const MAX_REPOSITORY: usize = 255;
const MAX_TAG: usize = 128;
const MAX_REDIRECTS: usize = 5;
const MAX_LOCATION: usize = 8192;
const MAX_TOKEN_RESPONSE: u64 = 64 << 10;
const MAX_ERROR_BODY: u64 = 64 << 10;
const MAX_ERROR_DETAIL: usize = 512;
const MAX_CHALLENGE_HEADER: usize = 16 << 10;
const MAX_CHALLENGES: usize = 16;
const MAX_CHALLENGE_PARAMS: usize = 32;
const MAX_CACHED_TOKENS: usize = 256;
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// CA bundles of the common Linux distributions, tried in order when `SSL_CERT_FILE` is not set.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Why a registry operation failed. [`RegistryError::is_retryable`] tells transient failures from final ones.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The caller's input was refused before anything was sent (a bad reference, tag, range or configuration).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The registry has no such repository, manifest or blob.
    #[error("{what} not found{detail}")]
    NotFound { what: String, detail: String },
    /// Authentication failed or access was denied. The message never holds credentials or tokens.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The registry could not be reached or is overloaded: connection refused or reset, a timeout, 408, 429 or
    /// a 5xx status. Worth retrying.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// TLS failed (an untrusted certificate, a name mismatch): retrying will not help.
    #[error("TLS failure: {0}")]
    Tls(String),
    /// The registry answered something this client cannot accept.
    #[error("registry protocol error: {0}")]
    Protocol(String),
    /// Content did not hash to the digest it was fetched by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    /// A response body is larger than this client reads into memory.
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// A manifest or index was refused (see [`OciError`]), or an index has no manifest for the platform.
    #[error("manifest refused: {0}")]
    Manifest(#[from] OciError),
}

impl RegistryError {
    /// Whether the same request may succeed later: only [`RegistryError::Unavailable`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// An image reference: `[registry/]repository[:tag][@sha256:…]`.
///
/// Without a registry the reference is on Docker Hub (`docker.io`), where a one-component repository gets the
/// `library/` prefix; `index.docker.io` is the same registry. The first component is a registry when it holds a
/// `.` or a `:`, is `localhost`, or has an uppercase letter (then refused as a registry name if malformed).
/// Registries may be DNS names, IPv4 addresses or bracketed IPv6 addresses, each with an optional port.
/// Repository components are lowercase letters and digits separated by `.`, `_`, `__` or dashes (the
/// distribution grammar), at most 255 characters in all; `.` and `..` are refused. Tags are
/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; without a tag or a digest the tag is `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// The registry as named (`docker.io`, `localhost:5000`, `[::1]:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository (`library/alpine`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<Digest> {
        self.digest
    }

    /// The `host[:port]` the registry API is served from: `registry-1.docker.io` for Docker Hub.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB { DOCKER_HUB_API } else { &self.registry }
    }

    /// What a manifest is fetched by: the digest when there is one, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => "latest".to_owned(),
        }
    }

    /// The same repository, pinned to `digest` (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self { digest: Some(digest), ..self.clone() }
    }

    /// The same repository with `tag` and no digest.
    pub fn with_tag(&self, tag: &str) -> Result<Self, RegistryError> {
        check_tag(tag).map_err(|why| RegistryError::Invalid(format!("tag {:?}: {why}", shown(tag, 160))))?;
        Ok(Self { tag: Some(tag.to_owned()), digest: None, ..self.clone() })
    }

    /// `registry/repository`, for messages.
    fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_reference(s).map_err(|why| RegistryError::Invalid(format!("reference {:?}: {why}", shown(s, 160))))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn parse_reference(s: &str) -> Result<Reference, String> {
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.len() > MAX_REFERENCE_INPUT {
        return Err(format!("longer than {MAX_REFERENCE_INPUT} bytes"));
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest.parse::<Digest>().map_err(|e| e.to_string())?)),
        None => (s, None),
    };
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        check_tag(tag).map_err(|why| format!("tag {tag:?}: {why}"))?;
    }
    if name.split('/').any(|c| c == "." || c == "..") {
        return Err("'.' and '..' path components are not allowed".into());
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':']) || first == "localhost" || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    };
    let registry = if registry == "index.docker.io" { DOCKER_HUB } else { registry };
    check_registry(registry)?;
    let repository = if registry == DOCKER_HUB && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_owned()
    };
    check_repository(&repository)?;
    let tag = match (tag, digest) {
        (None, None) => Some("latest".to_owned()),
        (tag, _) => tag.map(str::to_owned),
    };
    Ok(Reference { registry: registry.to_owned(), repository, tag, digest })
}

fn check_tag(tag: &str) -> Result<(), &'static str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    match bytes.first() {
        None => Err("empty"),
        _ if bytes.len() > MAX_TAG => Err("longer than 128 characters"),
        Some(&first) if !word(first) => Err("must start with a letter, digit or '_'"),
        _ if !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') => Err("only letters, digits, '_', '.', '-'"),
        _ => Ok(()),
    }
}

/// Splits `host[:port]`, where an IPv6 host is bracketed.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(inner) = authority.strip_prefix('[') {
        let end = inner.find(']')? + 2;
        let after = &authority[end..];
        return match after {
            "" => Some((&authority[..end], None)),
            _ => after.strip_prefix(':').map(|port| (&authority[..end], Some(port))),
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port))),
        None => Some((authority, None)),
    }
}

fn check_registry(registry: &str) -> Result<(), String> {
    let malformed = || format!("registry {registry:?} is not a host name, IPv4 or [IPv6] address with optional :port");
    let (host, port) = split_host_port(registry).ok_or_else(malformed)?;
    if let Some(port) = port
        && (port.is_empty()
            || port.len() > 5
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err())
    {
        return Err(malformed());
    }
    let ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => {
            host.len() <= 253
                && host.split('.').all(|label| {
                    let b = label.as_bytes();
                    !b.is_empty()
                        && b.len() <= 63
                        && b[0].is_ascii_alphanumeric()
                        && b[b.len() - 1].is_ascii_alphanumeric()
                        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
                })
        }
    };
    if ok { Ok(()) } else { Err(malformed()) }
}

fn check_repository(repository: &str) -> Result<(), String> {
    if repository.len() > MAX_REPOSITORY {
        return Err(format!("repository is longer than {MAX_REPOSITORY} characters"));
    }
    for component in repository.split('/') {
        if component.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("repository component {component:?} must be lowercase"));
        }
        if !path_component_ok(component) {
            return Err(format!(
                "repository component {:?} is not lowercase letters and digits separated by '.', '_', '__' or '-'",
                shown(component, 64)
            ));
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn path_component_ok(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else { return false };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &bytes[start..i];
        let ok = matches!(separator, b"." | b"_" | b"__") || separator.iter().all(|&b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Who the client is to the registry.
#[derive(Clone, Default)]
pub enum Credentials {
    /// No credentials: public repositories, or anonymous bearer tokens.
    #[default]
    Anonymous,
    /// A user name and password (or personal access token): sent to `Basic` challenges and to bearer token
    /// realms, never to any other host.
    Basic { username: String, password: String },
    /// A bearer access token issued elsewhere, sent as `Authorization: Bearer` to the registry host as is.
    Token(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => {
                f.debug_struct("Basic").field("username", username).field("password", &"<redacted>").finish()
            }
            Self::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

impl Credentials {
    /// A digest identifying the credentials in the token cache, so tokens are never shared between identities.
    fn identity(&self) -> Digest {
        match self {
            Self::Anonymous => Digest::of(b"anonymous"),
            Self::Basic { username, password } => Digest::of(format!("basic\0{username}\0{password}").as_bytes()),
            Self::Token(token) => Digest::of(format!("token\0{token}").as_bytes()),
        }
    }
}

/// How the client connects.
#[derive(Clone)]
pub struct RegistryConfig {
    /// Extra trust anchors (PEM certificates, e.g. a private registry's CA), added to the system's CA bundle
    /// (`SSL_CERT_FILE`, else the first of the usual Linux bundle paths).
    pub ca_pem: Option<Vec<u8>>,
    /// Registries reached over plain HTTP instead of HTTPS: `host` (any port) or `host:port`, IPv6 hosts
    /// bracketed (`[::1]`). Defaults to the loopback names `localhost`, `127.0.0.1` and `[::1]` on any port,
    /// whose traffic never leaves the machine; other loopback spellings (`127.0.0.2`, `localhost.localdomain`)
    /// use HTTPS unless listed. Clear the list to use HTTPS everywhere. Token realms and redirects may use plain
    /// HTTP only to these hosts too.
    pub plain_http_hosts: Vec<String>,
    /// Limit on establishing a TCP connection.
    pub connect_timeout: Duration,
    /// Limit on getting a response's headers, and on each wait for more of a body (an idle limit, so a large
    /// layer may take as long as it needs while data keeps arriving).
    pub request_timeout: Duration,
    /// Largest blob (or range) [`RegistryClient::get_blob`] reads into memory; stream larger ones with
    /// [`RegistryClient::blob_reader`].
    pub max_buffered_blob: u64,
    /// The `User-Agent` header.
    pub user_agent: String,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            ca_pem: None,
            plain_http_hosts: vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()],
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_buffered_blob: 64 << 20,
            user_agent: concat!("dpu-agent/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| format!("{} bytes", pem.len())))
            .field("plain_http_hosts", &self.plain_http_hosts)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_buffered_blob", &self.max_buffered_blob)
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

/// A manifest document as served, before any platform selection.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// SHA-256 of `bytes`, checked against the reference's digest or the registry's `Docker-Content-Digest`.
    pub digest: Digest,
    /// The response's `Content-Type` without parameters, if any.
    pub content_type: Option<String>,
    pub bytes: Bytes,
}

/// An image manifest for one platform.
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    pub manifest: Manifest,
    /// SHA-256 of `bytes`, verified.
    pub digest: Digest,
    /// The manifest's media type (its `mediaType`, else the `Content-Type` it was served with).
    pub media_type: String,
    pub bytes: Bytes,
    /// The digest of the index the manifest was selected from, when the reference named an index.
    pub index_digest: Option<Digest>,
}

/// One token of the cache, keyed by host, scope and credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    host: String,
    scope: String,
    identity: Digest,
}

struct CachedToken {
    authorization: HeaderValue,
    /// When the token was requested (before the request was sent, so its lifetime is never overestimated).
    obtained: Instant,
    lifetime: Duration,
}

/// Whether a token `age` old with `lifetime` may still be sent. It is refreshed once less than a tenth of its
/// lifetime or 10 s is left, whichever margin is smaller, so short-lived tokens are still reused.
pub fn token_is_fresh(age: Duration, lifetime: Duration) -> bool {
    let margin = (lifetime / 10).min(Duration::from_secs(10));
    age.saturating_add(margin) < lifetime
}

/// What a request is for: the repository, who asks and whether it pushes (the token scope).
struct Access<'a> {
    reference: &'a Reference,
    creds: &'a Credentials,
    push: bool,
}

impl Access<'_> {
    fn scope(&self) -> String {
        let actions = if self.push { "pull,push" } else { "pull" };
        format!("repository:{}:{actions}", self.reference.repository)
    }

    fn token_key(&self) -> TokenKey {
        TokenKey { host: self.reference.api_host().to_owned(), scope: self.scope(), identity: self.creds.identity() }
    }
}

/// A registry client. Cloning is cheap and clones share connections and cached tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    config: RegistryConfig,
    user_agent: HeaderValue,
    tokens: Mutex<HashMap<TokenKey, CachedToken>>,
    /// Hosts that asked for Basic credentials: later requests with Basic credentials send them at once.
    basic_hosts: Mutex<HashSet<String>>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("config", &self.inner.config)
            .field("cached_tokens", &lock(&self.inner.tokens).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RegistryClient {
    /// A client for `config`. Fails on an unusable `ca_pem` or `user_agent`.
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        let tls = tls_config(config.ca_pem.as_deref())?;
        let user_agent = HeaderValue::from_str(&config.user_agent)
            .map_err(|_| RegistryError::Invalid("user_agent is not a valid header value".into()))?;
        let mut connector = HttpConnector::new();
        connector.enforce_http(false);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(30));
        let inner = Inner {
            http: builder.build(https),
            config,
            user_agent,
            tokens: Mutex::new(HashMap::new()),
            basic_hosts: Mutex::new(HashSet::new()),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The configuration the client was built with.
    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// `http` for hosts allowed plain HTTP, else `https`.
    pub fn scheme_for(&self, authority: &str) -> &'static str {
        let (host, _) = split_host_port(authority).unwrap_or((authority, None));
        let plain = self
            .inner
            .config
            .plain_http_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(authority) || h.eq_ignore_ascii_case(host));
        if plain { "http" } else { "https" }
    }

    /// The URL of `r`'s manifest `tag_or_digest`.
    pub fn manifest_url(&self, r: &Reference, tag_or_digest: &str) -> Result<Uri, RegistryError> {
        self.api_url(r, &format!("manifests/{tag_or_digest}"))
    }

    /// The URL of blob `digest` in `r`'s repository.
    pub fn blob_url(&self, r: &Reference, digest: &Digest) -> Result<Uri, RegistryError> {
        self.api_url(r, &format!("blobs/{digest}"))
    }

    fn api_url(&self, r: &Reference, path: &str) -> Result<Uri, RegistryError> {
        let host = r.api_host();
        let url = format!("{}://{host}/v2/{}/{path}", self.scheme_for(host), r.repository);
        url.parse().map_err(|_| RegistryError::Invalid(format!("{:?} is not a valid URL", shown(&url, 200))))
    }

    /// The manifest of `r` for `platform`: an index is resolved to the entry for `platform`, which is fetched
    /// by digest. Both documents are validated and verified.
    pub async fn get_manifest(
        &self,
        r: &Reference,
        creds: &Credentials,
        platform: &Platform,
    ) -> Result<ResolvedManifest, RegistryError> {
        let raw = self.get_manifest_raw(r, creds).await?;
        let index = match oci::parse_manifest(raw.content_type.as_deref(), &raw.bytes)? {
            Parsed::Manifest(manifest) => return Ok(resolved(raw, manifest, None)),
            Parsed::Index(index) => index,
        };
        let entry = oci::select_platform(&index, platform)?;
        if entry.size > oci::MAX_MANIFEST_BYTES as u64 {
            let what = format!("manifest {}@{}", r.name(), entry.digest);
            return Err(RegistryError::TooLarge { what, limit: oci::MAX_MANIFEST_BYTES as u64 });
        }
        let child = r.with_digest(entry.digest);
        let raw_child = self.fetch_manifest(&child, creds, Some(entry.size)).await?;
        match oci::parse_manifest(raw_child.content_type.as_deref(), &raw_child.bytes)? {
            Parsed::Manifest(manifest) => Ok(resolved(raw_child, manifest, Some(raw.digest))),
            Parsed::Index(_) => {
                Err(RegistryError::Protocol(format!("the index entry of {} for {platform} is another index", r.name())))
            }
        }
    }

    /// The manifest or index document of `r` as served, verified against `r`'s digest or the registry's
    /// `Docker-Content-Digest`, without parsing it.
    pub async fn get_manifest_raw(&self, r: &Reference, creds: &Credentials) -> Result<RawManifest, RegistryError> {
        self.fetch_manifest(r, creds, None).await
    }

    async fn fetch_manifest(
        &self,
        r: &Reference,
        creds: &Credentials,
        expected_size: Option<u64>,
    ) -> Result<RawManifest, RegistryError> {
        let access = Access { reference: r, creds, push: false };
        let reference = r.manifest_reference();
        let url = self.manifest_url(r, &reference)?;
        let separator = if r.digest.is_some() { '@' } else { ':' };
        let what = format!("manifest {}{separator}{reference}", r.name());
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, manifest_accept());
        let response = self.send_authed(&access, &Method::GET, &url, &headers, &Bytes::new()).await?;
        if response.status() != StatusCode::OK {
            return Err(self.status_error(&what, response).await);
        }
        let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(essence);
        let announced = header_digest(response.headers())?;
        let bytes = self.read_body(response, oci::MAX_MANIFEST_BYTES as u64, &what).await?;
        if let Some(size) = expected_size
            && bytes.len() as u64 != size
        {
            return Err(RegistryError::Protocol(format!(
                "{what} is {} bytes, its descriptor says {size}",
                bytes.len()
            )));
        }
        let digest = Digest::of(&bytes);
        for expected in [r.digest, announced].into_iter().flatten() {
            if expected != digest {
                return Err(RegistryError::DigestMismatch { what, expected, actual: digest });
            }
        }
        Ok(RawManifest { digest, content_type, bytes })
    }

    /// Blob `digest` of `repo`'s repository, or bytes `range` of it.
    ///
    /// A whole blob is verified against `digest` and may be at most [`RegistryConfig::max_buffered_blob`]
    /// bytes. A range is sent as `Range: bytes=a-(b-1)` and must be answered with 206 and a matching
    /// `Content-Range`, and exactly `b - a` bytes; it cannot be verified here. A registry that ignores the
    /// `Range` header (200) is tolerated when the range starts within `max_buffered_blob`: the body is streamed,
    /// the bytes before the range are discarded, the range is kept and the rest is not read. A range past the end
    /// of the blob is [`RegistryError::Invalid`].
    pub async fn get_blob(
        &self,
        repo: &Reference,
        creds: &Credentials,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Bytes, RegistryError> {
        match range {
            None => self.get_whole_blob(repo, creds, digest).await,
            Some(range) => self.get_blob_range(repo, creds, digest, range).await,
        }
    }

    async fn get_whole_blob(
        &self,
        r: &Reference,
        creds: &Credentials,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let (what, response) = self.whole_blob_response(r, creds, digest).await?;
        let bytes = self.read_body(response, self.inner.config.max_buffered_blob, &what).await?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(RegistryError::DigestMismatch { what, expected: *digest, actual });
        }
        Ok(bytes)
    }

    async fn get_blob_range(
        &self,
        r: &Reference,
        creds: &Credentials,
        digest: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let what = format!("bytes {}..{} of blob {digest} of {}", range.start, range.end, r.name());
        if range.start >= range.end {
            return Err(RegistryError::Invalid(format!("{what}: the range is empty")));
        }
        let len = range.end - range.start;
        if len > self.inner.config.max_buffered_blob {
            return Err(RegistryError::TooLarge { what, limit: self.inner.config.max_buffered_blob });
        }
        let response = self.blob_response(r, creds, digest, Some(&range)).await?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let served = response.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok());
                match served.and_then(parse_content_range) {
                    Some((first, last, _)) if first == range.start && last.checked_add(1) == Some(range.end) => {}
                    _ => {
                        let served = served.map_or_else(|| "none".to_owned(), |s| shown(s, 100));
                        return Err(RegistryError::Protocol(format!(
                            "{what}: the registry sent Content-Range {served}"
                        )));
                    }
                }
                let bytes = self.read_body(response, len, &what).await?;
                if bytes.len() as u64 != len {
                    return Err(RegistryError::Protocol(format!("{what}: got {} bytes", bytes.len())));
                }
                Ok(bytes)
            }
            StatusCode::OK => self.slice_of_whole(response, &range, &what).await,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                Err(RegistryError::Invalid(format!("{what}: the range is beyond the end of the blob")))
            }
            _ => Err(self.status_error(&what, response).await),
        }
    }

    /// `range` of a whole blob served without honouring `Range`: streamed, with only the range kept.
    async fn slice_of_whole(
        &self,
        response: Response<Incoming>,
        range: &Range<u64>,
        what: &str,
    ) -> Result<Bytes, RegistryError> {
        if range.start > self.inner.config.max_buffered_blob {
            return Err(RegistryError::Protocol(format!(
                "{what}: the registry ignored the Range header, and {} bytes are too many to skip",
                range.start
            )));
        }
        let mut body = response.into_body();
        let mut out = BytesMut::new();
        let mut position = 0u64;
        while position < range.end {
            let Some(data) = self.next_data(&mut body, what).await? else { break };
            let start = position;
            position += data.len() as u64;
            let (from, to) = (range.start.max(start), range.end.min(position));
            if from < to {
                // Both offsets lie within this frame, so they fit in usize.
                out.extend_from_slice(&data[(from - start) as usize..(to - start) as usize]);
            }
        }
        if (out.len() as u64) < range.end - range.start {
            return Err(RegistryError::Invalid(format!("{what}: the blob is only {position} bytes")));
        }
        // The rest of the body is not read: dropping it closes the connection.
        Ok(out.freeze())
    }

    /// Blob `digest` as a stream, for layers too large to hold in memory.
    ///
    /// The bytes are **not verified**: the caller hashes them while reading (with [`super::Hasher`]) and must
    /// discard everything it derived from them unless the result equals `digest` once the reader is exhausted.
    /// Each wait for more data is bounded by [`RegistryConfig::request_timeout`] (an `io::ErrorKind::TimedOut`
    /// error).
    pub async fn blob_reader(
        &self,
        repo: &Reference,
        creds: &Credentials,
        digest: &Digest,
    ) -> Result<BlobReader, RegistryError> {
        let (_, response) = self.whole_blob_response(repo, creds, digest).await?;
        Ok(BlobReader::new(response, self.inner.config.request_timeout))
    }

    /// A 200 answer to a GET of the whole blob (anything else is an error), with the blob's name for errors.
    async fn whole_blob_response(
        &self,
        r: &Reference,
        creds: &Credentials,
        digest: &Digest,
    ) -> Result<(String, Response<Incoming>), RegistryError> {
        let what = format!("blob {digest} of {}", r.name());
        let response = self.blob_response(r, creds, digest, None).await?;
        if response.status() != StatusCode::OK {
            return Err(self.status_error(&what, response).await);
        }
        Ok((what, response))
    }

    async fn blob_response(
        &self,
        r: &Reference,
        creds: &Credentials,
        digest: &Digest,
        range: Option<&Range<u64>>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let access = Access { reference: r, creds, push: false };
        let url = self.blob_url(r, digest)?;
        let mut headers = HeaderMap::new();
        if let Some(range) = range {
            let value = format!("bytes={}-{}", range.start, range.end - 1);
            headers.insert(header::RANGE, HeaderValue::try_from(value).map_err(invalid_header)?);
        }
        self.send_authed(&access, &Method::GET, &url, &headers, &Bytes::new()).await
    }

    /// The size of blob `digest` if the repository has it, `None` if not.
    pub async fn head_blob(
        &self,
        repo: &Reference,
        creds: &Credentials,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        self.head_blob_as(&Access { reference: repo, creds, push: false }, digest).await
    }

    async fn head_blob_as(&self, access: &Access<'_>, digest: &Digest) -> Result<Option<u64>, RegistryError> {
        let what = format!("blob {digest} of {}", access.reference.name());
        let url = self.blob_url(access.reference, digest)?;
        let response = self.send_authed(access, &Method::HEAD, &url, &HeaderMap::new(), &Bytes::new()).await?;
        match response.status() {
            StatusCode::OK => {
                if let Some(announced) = header_digest(response.headers())?
                    && announced != *digest
                {
                    return Err(RegistryError::DigestMismatch { what, expected: *digest, actual: announced });
                }
                let size = content_length(response.headers())
                    .ok_or_else(|| RegistryError::Protocol(format!("{what}: HEAD answered without Content-Length")))?;
                Ok(Some(size))
            }
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_error(&what, response).await),
        }
    }

    /// Uploads `data` as blob `digest` unless the repository has it already. Returns whether it was uploaded.
    ///
    /// The upload is monolithic: `POST /v2/<name>/blobs/uploads/`, then one `PUT` of the whole blob to the
    /// returned `Location` with `?digest=`. `data` must hash to `digest`.
    pub async fn push_blob(
        &self,
        repo: &Reference,
        creds: &Credentials,
        digest: &Digest,
        data: Bytes,
    ) -> Result<bool, RegistryError> {
        let actual = Digest::of(&data);
        if actual != *digest {
            return Err(RegistryError::Invalid(format!("blob to push hashes to {actual}, not {digest}")));
        }
        let access = Access { reference: repo, creds, push: true };
        let what = format!("blob {digest} of {}", repo.name());
        if let Some(size) = self.head_blob_as(&access, digest).await? {
            if size == data.len() as u64 {
                return Ok(false);
            }
            let message = format!("{what} exists with {size} bytes, not {}", data.len());
            return Err(RegistryError::Protocol(message));
        }
        let location = self.start_upload(&access).await?;
        let url = with_query(&location, "digest", &digest.to_string())?;
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let response = self.send_authed(&access, &Method::PUT, &url, &headers, &data).await?;
        if response.status() != StatusCode::CREATED {
            return Err(self.status_error(&format!("upload of {what}"), response).await);
        }
        if let Some(announced) = header_digest(response.headers())?
            && announced != *digest
        {
            return Err(RegistryError::DigestMismatch { what, expected: *digest, actual: announced });
        }
        Ok(true)
    }

    /// Opens an upload session; returns its absolute URL.
    async fn start_upload(&self, access: &Access<'_>) -> Result<Uri, RegistryError> {
        let url = self.api_url(access.reference, "blobs/uploads/")?;
        let what = format!("upload to {}", access.reference.name());
        let response = self.send_authed(access, &Method::POST, &url, &HeaderMap::new(), &Bytes::new()).await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(self.status_error(&what, response).await);
        }
        let location = response.headers().get(header::LOCATION).and_then(|v| v.to_str().ok());
        let location = location.ok_or_else(|| RegistryError::Protocol(format!("{what}: 202 without a Location")))?;
        let resolved = resolve_location(&url, location)?;
        self.check_scheme(&resolved)?;
        Ok(resolved)
    }

    /// Stores `bytes` as a manifest of `media_type` under `tag` (a tag, or the manifest's own digest) and
    /// returns its digest.
    pub async fn push_manifest(
        &self,
        repo: &Reference,
        creds: &Credentials,
        tag: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        if bytes.len() > oci::MAX_MANIFEST_BYTES {
            let limit = oci::MAX_MANIFEST_BYTES as u64;
            return Err(RegistryError::TooLarge { what: "manifest to push".into(), limit });
        }
        let digest = Digest::of(&bytes);
        if tag.starts_with("sha256:") {
            let named: Digest = tag.parse().map_err(|e| RegistryError::Invalid(format!("manifest reference: {e}")))?;
            if named != digest {
                return Err(RegistryError::Invalid(format!("manifest to push hashes to {digest}, not {named}")));
            }
        } else {
            check_tag(tag).map_err(|why| RegistryError::Invalid(format!("tag {:?}: {why}", shown(tag, 160))))?;
        }
        let content_type = HeaderValue::from_str(media_type)
            .ok()
            .filter(|_| !media_type.is_empty())
            .ok_or_else(|| RegistryError::Invalid(format!("media type {:?}", shown(media_type, 160))))?;
        let access = Access { reference: repo, creds, push: true };
        let url = self.manifest_url(repo, tag)?;
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type);
        let response = self.send_authed(&access, &Method::PUT, &url, &headers, &bytes).await?;
        let what = format!("manifest {}:{tag}", repo.name());
        if !response.status().is_success() {
            return Err(self.status_error(&format!("push of {what}"), response).await);
        }
        if let Some(announced) = header_digest(response.headers())?
            && announced != digest
        {
            return Err(RegistryError::DigestMismatch { what, expected: digest, actual: announced });
        }
        Ok(digest)
    }

    /// A request to the registry with authentication: known credentials or a cached token first; on 401,
    /// the challenge is answered and the request sent once more. `Authorization` goes only to the registry's
    /// own origin. A final 401 is returned to the caller (which turns it into [`RegistryError::Unauthorized`]).
    async fn send_authed(
        &self,
        access: &Access<'_>,
        method: &Method,
        url: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Response<Incoming>, RegistryError> {
        let host = access.reference.api_host();
        let own_origin = url.scheme_str() == Some(self.scheme_for(host))
            && url.authority().is_some_and(|a| a.as_str().eq_ignore_ascii_case(host));
        let mut authorization = if own_origin { self.known_authorization(access)? } else { None };
        let mut answered = false;
        loop {
            let response = self.send(method, url, headers, body, authorization.as_ref()).await?;
            if response.status() != StatusCode::UNAUTHORIZED || !own_origin {
                return Ok(response);
            }
            if authorization.is_some() {
                lock(&self.inner.tokens).remove(&access.token_key());
            }
            if answered {
                return Ok(response);
            }
            let challenge = challenge_of(&response, host)?;
            authorization = Some(self.answer(access, &challenge).await?);
            answered = true;
        }
    }

    /// What to send before any challenge: a given token, a fresh cached token, or Basic credentials to a host
    /// known to want them.
    fn known_authorization(&self, access: &Access<'_>) -> Result<Option<HeaderValue>, RegistryError> {
        match access.creds {
            Credentials::Token(token) => {
                let value = bearer(token);
                value.map(Some).ok_or_else(|| RegistryError::Invalid("the token is not a valid header value".into()))
            }
            Credentials::Anonymous | Credentials::Basic { .. } => {
                if let Some(cached) = lock(&self.inner.tokens).get(&access.token_key())
                    && token_is_fresh(cached.obtained.elapsed(), cached.lifetime)
                {
                    return Ok(Some(cached.authorization.clone()));
                }
                match access.creds {
                    Credentials::Basic { username, password }
                        if lock(&self.inner.basic_hosts).contains(access.reference.api_host()) =>
                    {
                        Ok(Some(basic(username, password)))
                    }
                    _ => Ok(None),
                }
            }
        }
    }

    /// The `Authorization` answering `challenge`.
    async fn answer(&self, access: &Access<'_>, challenge: &Challenge) -> Result<HeaderValue, RegistryError> {
        let host = access.reference.api_host();
        match (&challenge.scheme, access.creds) {
            (AuthScheme::Bearer, Credentials::Token(_)) => {
                Err(RegistryError::Unauthorized(format!("{host} refused the bearer token{}", challenge.error_text())))
            }
            (AuthScheme::Bearer, _) => self.fetch_token(access, challenge).await,
            (AuthScheme::Basic, Credentials::Basic { username, password }) => {
                lock(&self.inner.basic_hosts).insert(host.to_owned());
                Ok(basic(username, password))
            }
            (AuthScheme::Basic, Credentials::Anonymous) => {
                let realm =
                    challenge.param("realm").map(|r| format!(" (realm {:?})", shown(r, 100))).unwrap_or_default();
                Err(RegistryError::Unauthorized(format!("{host} requires a user name and password{realm}")))
            }
            (AuthScheme::Basic, Credentials::Token(_)) => {
                Err(RegistryError::Unauthorized(format!("{host} wants a user name and password, not a token")))
            }
            (AuthScheme::Other(scheme), _) => Err(RegistryError::Unauthorized(format!(
                "{host} asks for the unsupported authentication scheme {:?}",
                shown(scheme, 40)
            ))),
        }
    }

    /// A bearer token from the challenge's realm, cached for the access's host, scope and credentials.
    async fn fetch_token(&self, access: &Access<'_>, challenge: &Challenge) -> Result<HeaderValue, RegistryError> {
        let host = access.reference.api_host();
        let realm = challenge
            .param("realm")
            .ok_or_else(|| RegistryError::Protocol(format!("{host}: Bearer challenge without a realm")))?;
        let scope = access.scope();
        let mut query = Vec::new();
        if let Some(service) = challenge.param("service") {
            query.push(("service", service));
        }
        query.push(("scope", scope.as_str()));
        if let Some(asked) = challenge.param("scope").filter(|asked| *asked != scope) {
            query.push(("scope", asked));
        }
        let mut url = realm.to_owned();
        for (i, (key, value)) in query.iter().enumerate() {
            let separator = if i == 0 && !realm.contains('?') { '?' } else { '&' };
            let _ = write!(url, "{separator}{key}={}", query_escape(value));
        }
        let bad_realm = || RegistryError::Protocol(format!("{host}: token realm {:?} is not a URL", shown(realm, 200)));
        let url: Uri = url.parse().map_err(|_| bad_realm())?;
        if url.authority().is_none() {
            return Err(bad_realm());
        }
        self.check_scheme(&url).map_err(|_| {
            RegistryError::Unauthorized(format!(
                "{host}: token realm {} is neither https nor a host allowed plain http",
                shown_url(&url)
            ))
        })?;
        let authorization = match access.creds {
            Credentials::Basic { username, password } => Some(basic(username, password)),
            Credentials::Anonymous | Credentials::Token(_) => None,
        };
        let obtained = Instant::now();
        let what = format!("token from {}", shown_url(&url));
        let response = self.send(&Method::GET, &url, &HeaderMap::new(), &Bytes::new(), authorization.as_ref()).await?;
        if response.status() != StatusCode::OK {
            return Err(match self.status_error(&what, response).await {
                RegistryError::NotFound { what, detail } => RegistryError::Protocol(format!("{what}: 404{detail}")),
                other => other,
            });
        }
        let body = self.read_body(response, MAX_TOKEN_RESPONSE, &what).await?;
        let (authorization, lifetime) =
            parse_token_response(&body).map_err(|why| RegistryError::Protocol(format!("{what}: {why}")))?;
        self.store_token(access.token_key(), CachedToken { authorization: authorization.clone(), obtained, lifetime });
        Ok(authorization)
    }

    fn store_token(&self, key: TokenKey, token: CachedToken) {
        let mut tokens = lock(&self.inner.tokens);
        if tokens.len() >= MAX_CACHED_TOKENS {
            tokens.retain(|_, t| token_is_fresh(t.obtained.elapsed(), t.lifetime));
            if tokens.len() >= MAX_CACHED_TOKENS {
                tokens.clear();
            }
        }
        tokens.insert(key, token);
    }

    /// Refuses plain HTTP to hosts not allowed it.
    fn check_scheme(&self, url: &Uri) -> Result<(), RegistryError> {
        let authority = url.authority().map(|a| a.as_str()).unwrap_or_default();
        match url.scheme_str() {
            Some("https") => Ok(()),
            Some("http") if self.scheme_for(authority) == "http" => Ok(()),
            _ => Err(RegistryError::Protocol(format!(
                "{} is neither https nor a host allowed plain http",
                shown_url(url)
            ))),
        }
    }

    /// One request and its redirects (GET and HEAD only). `authorization` is dropped at the first redirect to
    /// another scheme or authority.
    async fn send(
        &self,
        method: &Method,
        url: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
        authorization: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut url = url.clone();
        let mut authorization = authorization.cloned();
        let origin = (url.scheme().cloned(), url.authority().cloned());
        let mut redirects = 0;
        loop {
            let response = self.send_once(method, &url, headers, body, authorization.as_ref()).await?;
            let follow = matches!(*method, Method::GET | Method::HEAD) && is_redirect(response.status());
            if !follow {
                return Ok(response);
            }
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                let message = format!("{}: more than {MAX_REDIRECTS} redirects", shown_url(&url));
                return Err(RegistryError::Protocol(message));
            }
            let location = response.headers().get(header::LOCATION).and_then(|v| v.to_str().ok());
            let location = location
                .ok_or_else(|| RegistryError::Protocol(format!("{}: redirect without a Location", shown_url(&url))))?;
            let next = resolve_location(&url, location)?;
            self.check_scheme(&next)?;
            if (next.scheme().cloned(), next.authority().cloned()) != origin {
                authorization = None;
            }
            tracing::debug!(from = %shown_url(&url), to = %shown_url(&next), "registry redirect");
            url = next;
        }
    }

    async fn send_once(
        &self,
        method: &Method,
        url: &Uri,
        headers: &HeaderMap,
        body: &Bytes,
        authorization: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, RegistryError> {
        let mut request = Request::new(Full::new(body.clone()));
        *request.method_mut() = method.clone();
        *request.uri_mut() = url.clone();
        let request_headers = request.headers_mut();
        for (name, value) in headers {
            request_headers.insert(name, value.clone());
        }
        request_headers.insert(header::USER_AGENT, self.inner.user_agent.clone());
        if let Some(authorization) = authorization {
            request_headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            request_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let timeout = self.inner.config.request_timeout;
        let result = tokio::time::timeout(timeout, self.inner.http.request(request)).await;
        let shown = shown_url(url);
        match result {
            Err(_) => Err(RegistryError::Unavailable(format!("{method} {shown}: no response within {timeout:?}"))),
            Ok(Err(e)) if is_tls_failure(&e) => {
                Err(RegistryError::Tls(format!("{method} {shown}: {}", error_chain(&e))))
            }
            Ok(Err(e)) => Err(RegistryError::Unavailable(format!("{method} {shown}: {}", error_chain(&e)))),
            Ok(Ok(response)) => {
                tracing::debug!(%method, url = %shown, status = response.status().as_u16(), "registry request");
                Ok(response)
            }
        }
    }

    /// A response body of at most `limit` bytes.
    async fn read_body(&self, response: Response<Incoming>, limit: u64, what: &str) -> Result<Bytes, RegistryError> {
        let too_large = || RegistryError::TooLarge { what: what.to_owned(), limit };
        let announced = content_length(response.headers());
        if announced.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        // The announced length is at most `limit`, a bound the caller chose to hold in memory.
        let mut out = BytesMut::with_capacity(announced.unwrap_or(0) as usize);
        let mut body = response.into_body();
        while let Some(data) = self.next_data(&mut body, what).await? {
            if (out.len() + data.len()) as u64 > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&data);
        }
        Ok(out.freeze())
    }

    /// The next data frame of `body` (trailers are skipped), waiting at most the request timeout.
    async fn next_data(&self, body: &mut Incoming, what: &str) -> Result<Option<Bytes>, RegistryError> {
        let timeout = self.inner.config.request_timeout;
        loop {
            let frame: Frame<Bytes> = match tokio::time::timeout(timeout, body.frame()).await {
                Err(_) => return Err(RegistryError::Unavailable(format!("{what}: no data for {timeout:?}"))),
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(RegistryError::Unavailable(format!("{what}: {}", error_chain(&e)))),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
    }

    /// The error for an unexpected status, with the registry's error message when it sent one.
    async fn status_error(&self, what: &str, response: Response<Incoming>) -> RegistryError {
        let status = response.status();
        let detail = match self.read_body(response, MAX_ERROR_BODY, what).await {
            Ok(body) => error_detail(&body),
            Err(_) => String::new(),
        };
        classify(status, what, detail)
    }
}

fn resolved(raw: RawManifest, manifest: Manifest, index_digest: Option<Digest>) -> ResolvedManifest {
    let media_type = match (&manifest.media_type, &raw.content_type) {
        (Some(own), _) => own.clone(),
        (None, Some(served)) if oci::is_manifest_type(served) => served.clone(),
        (None, _) => oci::MEDIA_TYPE_OCI_MANIFEST.to_owned(),
    };
    ResolvedManifest { manifest, digest: raw.digest, media_type, bytes: raw.bytes, index_digest }
}

fn manifest_accept() -> HeaderValue {
    HeaderValue::from_static(
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
         application/vnd.docker.distribution.manifest.list.v2+json, \
         application/vnd.docker.distribution.manifest.v2+json",
    )
}

fn classify(status: StatusCode, what: &str, detail: String) -> RegistryError {
    match status.as_u16() {
        404 => RegistryError::NotFound { what: what.to_owned(), detail },
        401 | 403 => RegistryError::Unauthorized(format!("{what}: {status}{detail}")),
        408 | 429 | 500..=599 => RegistryError::Unavailable(format!("{what}: {status}{detail}")),
        _ => RegistryError::Protocol(format!("{what}: unexpected {status}{detail}")),
    }
}

/// `": CODE: message; …"` from a registry error body (`{"errors":[{"code","message"}]}`), cut to a few hundred
/// characters with control characters replaced; empty when the body is not such a document.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let Ok(parsed) = serde_json::from_slice::<Errors>(body) else { return String::new() };
    let entries: Vec<String> = parsed
        .errors
        .iter()
        .take(8)
        .map(|e| match (&e.code, &e.message) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(one), None) | (None, Some(one)) => one.clone(),
            (None, None) => "(no message)".to_owned(),
        })
        .collect();
    if entries.is_empty() {
        return String::new();
    }
    let text: String = entries.join("; ").chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    format!(": {}", shown(&text, MAX_ERROR_DETAIL))
}

/// A token endpoint's answer: the `Authorization` value and the token's lifetime (`expires_in`, 60 s when
/// absent). `issued_at` is not used: the lifetime counts from when the token was requested on this machine's
/// monotonic clock, which never overestimates it, whatever the two clocks say.
fn parse_token_response(body: &[u8]) -> Result<(HeaderValue, Duration), String> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<f64>,
    }
    let parsed: TokenResponse = serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    let token = [parsed.token, parsed.access_token]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .ok_or("neither token nor access_token is set")?;
    let authorization = bearer(&token).ok_or("the token is not a valid header value")?;
    let lifetime = match parsed.expires_in {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(secs) if secs.is_finite() && secs > 0.0 => {
            Duration::from_secs_f64(secs.min(MAX_TOKEN_LIFETIME.as_secs_f64()))
        }
        Some(_) => Duration::ZERO,
    };
    Ok((authorization, lifetime))
}

fn basic(username: &str, password: &str) -> HeaderValue {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    // Base64 is always a valid header value; the fallback is never taken.
    let mut value = HeaderValue::try_from(format!("Basic {encoded}")).unwrap_or_else(|_| HeaderValue::from_static(""));
    value.set_sensitive(true);
    value
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {token}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn invalid_header(e: http::header::InvalidHeaderValue) -> RegistryError {
    RegistryError::Invalid(format!("header value: {e}"))
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// The registry's `Docker-Content-Digest`, when it is a SHA-256 digest (other algorithms cannot be checked here
/// and are ignored; our own hash of the content decides).
fn header_digest(headers: &HeaderMap) -> Result<Option<Digest>, RegistryError> {
    let Some(value) = headers.get(DOCKER_CONTENT_DIGEST) else { return Ok(None) };
    let text = value.to_str().map_err(|_| RegistryError::Protocol("Docker-Content-Digest is not ASCII".into()))?;
    if !text.starts_with("sha256:") {
        return Ok(None);
    }
    text.trim().parse().map(Some).map_err(|e| RegistryError::Protocol(format!("Docker-Content-Digest: {e}")))
}

/// `Content-Range: bytes first-last/total` (total may be `*`).
pub fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    let (first, last): (u64, u64) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    let total = match total.trim() {
        "*" => None,
        n => Some(n.parse::<u64>().ok()?),
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some((first, last, total))
}

/// A `Content-Type` without parameters, lowercased.
fn essence(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

/// `Location` resolved against the URL it answered: absolute, scheme-relative (`//host/…`), absolute-path,
/// query-only or path-relative. Fragments are dropped. Only http and https URLs are accepted.
pub fn resolve_location(base: &Uri, location: &str) -> Result<Uri, RegistryError> {
    let bad = || RegistryError::Protocol(format!("redirect to an invalid Location {:?}", shown(location, 200)));
    if location.len() > MAX_LOCATION {
        return Err(bad());
    }
    let location = location.split('#').next().unwrap_or_default().trim();
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let has_scheme = location.split_once(':').is_some_and(|(s, _)| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    });
    let absolute = if location.starts_with("//") {
        format!("{scheme}:{location}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else if has_scheme {
        location.to_owned()
    } else if location.starts_with('?') {
        format!("{scheme}://{authority}{}{location}", base.path())
    } else {
        let path = base.path();
        let directory = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let directory = if directory.is_empty() { "/" } else { directory };
        format!("{scheme}://{authority}{directory}{location}")
    };
    let uri: Uri = absolute.parse().map_err(|_| bad())?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(bad()),
    }
}

/// `url` with `key=value` appended to its query.
fn with_query(url: &Uri, key: &str, value: &str) -> Result<Uri, RegistryError> {
    let separator = if url.query().is_some() { '&' } else { '?' };
    let text = format!("{url}{separator}{key}={}", query_escape(value));
    text.parse().map_err(|_| RegistryError::Protocol(format!("upload URL {:?} is invalid", shown(&text, 200))))
}

/// Percent-encoding of everything but RFC 3986 unreserved characters.
fn query_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A URL for messages and logs: scheme, authority and path, never the query (upload state, signed object store
/// URLs).
fn shown_url(url: &Uri) -> String {
    format!("{}://{}{}", url.scheme_str().unwrap_or("?"), url.authority().map_or("?", |a| a.as_str()), url.path())
}

/// At most `max` characters of untrusted text.
fn shown(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

/// An error and its sources, `a: b: c`, without repeats.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Whether TLS itself failed (rustls refused the peer), as opposed to the network.
fn is_tls_failure(e: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = err.source();
    }
    false
}

fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, RegistryError> {
    let mut roots = rustls::RootCertStore::empty();
    let (system, unusable) = roots.add_parsable_certificates(system_roots());
    tracing::debug!(system, unusable, "system trust anchors loaded");
    if let Some(pem) = ca_pem {
        let certs = rustls_pemfile::certs(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RegistryError::Invalid(format!("ca_pem is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(RegistryError::Invalid("ca_pem holds no CERTIFICATE block".into()));
        }
        for (i, cert) in certs.into_iter().enumerate() {
            roots.add(cert).map_err(|e| {
                RegistryError::Invalid(format!("ca_pem certificate {i} is not a usable trust anchor: {e}"))
            })?;
        }
    }
    if roots.is_empty() {
        tracing::warn!("no TLS trust anchors (no system CA bundle, no ca_pem): HTTPS registries will be refused");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RegistryError::Invalid(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The system's trust anchors: `SSL_CERT_FILE` if set, else the first CA bundle found at the usual paths.
fn system_roots() -> Vec<CertificateDer<'static>> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    for path in from_env.into_iter().chain(CA_BUNDLES.iter().map(PathBuf::from)) {
        let Ok(pem) = std::fs::read(&path) else { continue };
        let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).filter_map(Result::ok).collect();
        if !certs.is_empty() {
            tracing::debug!(path = %path.display(), count = certs.len(), "system trust anchors");
            return certs;
        }
    }
    Vec::new()
}

/// A blob's bytes as they arrive, from [`RegistryClient::blob_reader`]. **Not verified**: see there.
pub struct BlobReader {
    body: Incoming,
    chunk: Bytes,
    idle: Duration,
    stall: Pin<Box<tokio::time::Sleep>>,
    /// Whether the reader is waiting for data, the stall timer armed.
    waiting: bool,
    length: Option<u64>,
    done: bool,
}

impl BlobReader {
    fn new(response: Response<Incoming>, idle: Duration) -> Self {
        let length = content_length(response.headers());
        Self {
            body: response.into_body(),
            chunk: Bytes::new(),
            idle,
            stall: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
            length,
            done: false,
        }
    }

    /// The blob's size as the registry announced it (`Content-Length`), if it did.
    pub fn content_length(&self) -> Option<u64> {
        self.length
    }
}

impl fmt::Debug for BlobReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobReader").field("length", &self.length).field("done", &self.done).finish_non_exhaustive()
    }
}

impl AsyncRead for BlobReader {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.chunk.is_empty() {
                let n = this.chunk.len().min(buf.remaining());
                buf.put_slice(&this.chunk.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.waiting = false;
                    if let Ok(data) = frame.into_data() {
                        this.chunk = data;
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(error_chain(&e)))),
                Poll::Ready(None) => this.done = true,
                Poll::Pending => {
                    // The idle limit counts from when the reader started waiting, not from the last frame, so
                    // a consumer that is slow between reads is not mistaken for a stalled registry.
                    if !this.waiting {
                        this.waiting = true;
                        this.stall.as_mut().reset(tokio::time::Instant::now() + this.idle);
                    }
                    return match this.stall.as_mut().poll(cx) {
                        Poll::Ready(()) => {
                            let message = format!("no blob data for {:?}", this.idle);
                            Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, message)))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

/// An authentication scheme of a `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthScheme {
    Basic,
    Bearer,
    /// Any other scheme, lowercased.
    Other(String),
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: AuthScheme,
    /// Parameters by lowercased name, values unquoted and unescaped.
    pub params: BTreeMap<String, String>,
    /// The token68 form (`Basic dXNlcg==`), instead of parameters.
    pub token68: Option<String>,
}

impl Challenge {
    /// Parameter `name` (lowercase).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// `" (error: …)"` from the RFC 6750 `error` and `error_description` parameters, for messages.
    fn error_text(&self) -> String {
        match (self.param("error"), self.param("error_description")) {
            (Some(e), Some(d)) => format!(" (error: {}: {})", shown(e, 60), shown(d, 200)),
            (Some(e), None) => format!(" (error: {})", shown(e, 60)),
            _ => String::new(),
        }
    }
}

/// Every challenge of a `WWW-Authenticate` header value (RFC 9110 §11.6.1): case-insensitive schemes and
/// parameter names, token or quoted-string values with backslash escapes, token68, several challenges separated
/// by commas. Duplicate parameters, unterminated strings, control characters and anything else malformed are
/// refused, as is a header over 16 KiB, more than 16 challenges or 32 parameters in one.
pub fn parse_challenges(header: &str) -> Result<Vec<Challenge>, RegistryError> {
    let bad = |why: &str, at: usize| {
        RegistryError::Protocol(format!("WWW-Authenticate {:?}: {why} at byte {at}", shown(header, 120)))
    };
    if header.len() > MAX_CHALLENGE_HEADER {
        return Err(bad("the header is too long", MAX_CHALLENGE_HEADER));
    }
    let mut c = Cursor { s: header, pos: 0 };
    let mut out = Vec::new();
    loop {
        c.skip_list_separators();
        if c.at_end() {
            break;
        }
        if out.len() == MAX_CHALLENGES {
            return Err(bad("too many challenges", c.pos));
        }
        let scheme = c.token().ok_or_else(|| bad("expected an authentication scheme", c.pos))?;
        let mut challenge = Challenge { scheme: scheme_of(scheme), params: BTreeMap::new(), token68: None };
        let spaced = c.skip_ws();
        if c.at_end() || c.peek() == Some(b',') {
            out.push(challenge);
            continue;
        }
        if !spaced {
            return Err(bad("expected a space after the scheme", c.pos));
        }
        if let Some(token68) = c.token68() {
            challenge.token68 = Some(token68.to_owned());
            out.push(challenge);
            continue;
        }
        loop {
            let at = c.pos;
            let name = c.token().ok_or_else(|| bad("expected a parameter name", c.pos))?;
            c.skip_ws();
            if !c.eat(b'=') {
                return Err(bad("expected '=' after a parameter name", c.pos));
            }
            c.skip_ws();
            let value = if c.peek() == Some(b'"') {
                let at = c.pos;
                c.quoted().map_err(|why| bad(why, at))?
            } else {
                c.token().ok_or_else(|| bad("expected a parameter value", c.pos))?.to_owned()
            };
            if challenge.params.len() == MAX_CHALLENGE_PARAMS {
                return Err(bad("too many parameters", at));
            }
            if challenge.params.insert(name.to_ascii_lowercase(), value).is_some() {
                return Err(bad("duplicate parameter", at));
            }
            c.skip_ws();
            if c.at_end() {
                break;
            }
            if !c.eat(b',') {
                return Err(bad("expected ',' after a parameter", c.pos));
            }
            c.skip_list_separators();
            if c.at_end() || !c.param_follows() {
                break;
            }
        }
        out.push(challenge);
    }
    if out.is_empty() {
        return Err(bad("no challenge", 0));
    }
    Ok(out)
}

/// The challenge of a `WWW-Authenticate` header value this client answers: the first `Bearer` challenge, else
/// the first `Basic` one, else the first. See [`parse_challenges`] for the grammar.
pub fn parse_www_authenticate(header: &str) -> Result<Challenge, RegistryError> {
    let challenges = parse_challenges(header)?;
    let preferred = challenges
        .iter()
        .position(|c| c.scheme == AuthScheme::Bearer)
        .or_else(|| challenges.iter().position(|c| c.scheme == AuthScheme::Basic))
        .unwrap_or(0);
    challenges.into_iter().nth(preferred).ok_or_else(|| RegistryError::Protocol("no challenge".into()))
}

/// The preferred challenge of a 401 response, over all its `WWW-Authenticate` headers.
fn challenge_of(response: &Response<Incoming>, host: &str) -> Result<Challenge, RegistryError> {
    let values: Vec<&str> =
        response.headers().get_all(header::WWW_AUTHENTICATE).iter().filter_map(|v| v.to_str().ok()).collect();
    if values.is_empty() {
        return Err(RegistryError::Unauthorized(format!("{host} answered 401 without a WWW-Authenticate challenge")));
    }
    parse_www_authenticate(&values.join(", "))
        .map_err(|e| RegistryError::Unauthorized(format!("{host} sent an unusable challenge: {e}")))
}

fn scheme_of(token: &str) -> AuthScheme {
    if token.eq_ignore_ascii_case("basic") {
        AuthScheme::Basic
    } else if token.eq_ignore_ascii_case("bearer") {
        AuthScheme::Bearer
    } else {
        AuthScheme::Other(token.to_ascii_lowercase())
    }
}

/// A position in a header value. It only moves over whole characters, so every slice is on a char boundary.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let hit = self.peek() == Some(byte);
        if hit {
            self.pos += 1;
        }
        hit
    }

    /// Skips spaces and tabs; whether there were any.
    fn skip_ws(&mut self) -> bool {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos > start
    }

    /// Skips whitespace and empty list elements (`, ,`).
    fn skip_list_separators(&mut self) {
        loop {
            self.skip_ws();
            if !self.eat(b',') {
                break;
            }
        }
    }

    fn take_while(&mut self, accept: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(&accept) {
            self.pos += 1;
        }
        self.s.get(start..self.pos).unwrap_or_default()
    }

    /// `1*tchar`
    fn token(&mut self) -> Option<&'a str> {
        Some(self.take_while(is_tchar)).filter(|t| !t.is_empty())
    }

    /// `token68` followed by the end or a comma; nothing is consumed otherwise.
    fn token68(&mut self) -> Option<&'a str> {
        let start = self.pos;
        let body = self.take_while(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        self.take_while(|b| b == b'=');
        let end = self.pos;
        self.skip_ws();
        if !body.is_empty() && (self.at_end() || self.peek() == Some(b',')) {
            return self.s.get(start..end);
        }
        self.pos = start;
        None
    }

    /// Whether an `auth-param` (`token BWS "="`) starts here, rather than the next challenge.
    fn param_follows(&mut self) -> bool {
        let start = self.pos;
        let follows = self.token().is_some() && {
            self.skip_ws();
            self.peek() == Some(b'=')
        };
        self.pos = start;
        follows
    }

    /// A quoted-string starting at the opening quote, unescaped.
    fn quoted(&mut self) -> Result<String, &'static str> {
        let rest = self.s.get(self.pos + 1..).unwrap_or_default();
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, ch)) = chars.next() {
            let ch = match ch {
                '"' => {
                    self.pos += 1 + i + 1;
                    return Ok(out);
                }
                '\\' => chars.next().map(|(_, escaped)| escaped).ok_or("unterminated escape")?,
                ch => ch,
            };
            if ch.is_control() && ch != '\t' {
                return Err("control character in a quoted string");
            }
            out.push(ch);
        }
        Err("unterminated quoted string")
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn parts(s: &str) -> (String, String, Option<String>, Option<Digest>) {
        let r = reference(s);
        (r.registry.clone(), r.repository.clone(), r.tag.clone(), r.digest)
    }

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn references_parse_with_docker_hub_defaults() {
        let latest = Some("latest".to_owned());
        assert_eq!(parts("alpine"), ("docker.io".into(), "library/alpine".into(), latest.clone(), None));
        assert_eq!(parts("alpine:3.19"), ("docker.io".into(), "library/alpine".into(), Some("3.19".into()), None));
        assert_eq!(parts("docker.io/alpine").1, "library/alpine");
        assert_eq!(parts("index.docker.io/library/alpine").0, "docker.io");
        assert_eq!(parts("bitnami/redis").1, "bitnami/redis");
        let r = reference("alpine");
        assert_eq!(r.api_host(), DOCKER_HUB_API);
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(reference(&r.to_string()), r);

        assert_eq!(parts("localhost:5000/foo:bar"), ("localhost:5000".into(), "foo".into(), Some("bar".into()), None));
        assert_eq!(parts("localhost/foo").0, "localhost");
        assert_eq!(parts("127.0.0.1:5000/a/b/c").1, "a/b/c");
        assert_eq!(parts("[::1]:5000/foo:v1"), ("[::1]:5000".into(), "foo".into(), Some("v1".into()), None));
        assert_eq!(parts("[fe80::1]/foo").0, "[fe80::1]");
        // An uppercase first component is a registry (a host name), as in the distribution grammar.
        assert_eq!(parts("UPPER/foo").0, "UPPER");
        assert_eq!(parts("ghcr.io/org/app").2, latest);
        let digest: Digest = DIGEST.parse().unwrap();
        let pinned = reference(&format!("ghcr.io/org/app@{DIGEST}"));
        assert_eq!((pinned.tag(), pinned.digest()), (None, Some(digest)));
        assert_eq!(pinned.manifest_reference(), DIGEST);
        let both = reference(&format!("ghcr.io/org/app:v1@{DIGEST}"));
        assert_eq!((both.tag(), both.digest()), (Some("v1"), Some(digest)));
        assert_eq!(both.to_string(), format!("ghcr.io/org/app:v1@{DIGEST}"));
        assert_eq!(reference("quay.io/a/b-c__d.e_f---g:T_1.x-y").repository(), "a/b-c__d.e_f---g");
        assert_eq!(reference("r.io/x:v").with_tag("w").unwrap().to_string(), "r.io/x:w");
        assert_eq!(reference("r.io/x:v").with_digest(digest).manifest_reference(), DIGEST);
    }

    #[test]
    fn bad_references_are_refused_clearly() {
        let cases = [
            ("", "empty"),
            ("Alpine", "lowercase"),
            ("docker.io/Library/alpine", "lowercase"),
            ("UPPER:x/foo", "registry"),
            ("foo/../bar", "'..'"),
            ("../foo", "'..'"),
            ("localhost:5000/./x", "'.'"),
            ("foo//bar", "component \"\""),
            ("foo/-bar", "-bar"),
            ("foo/bar_", "bar_"),
            ("foo/a___b", "a___b"),
            ("foo/a._b", "a._b"),
            ("foo:", "tag \"\""),
            ("foo:-x", "tag"),
            ("foo:a/b", "registry"),
            ("foo@sha256:abc", "64"),
            ("foo@md5:abc", "md5"),
            ("localhost:99999/foo", "registry"),
            ("localhost:/foo", "registry"),
            ("[::1/foo", "registry"),
            ("[zz::1]:5000/foo", "registry"),
            ("-bad.io/foo", "registry"),
            ("bad..io/foo", "registry"),
            ("foo bar", "component"),
            ("héllo.io/foo", "registry"),
        ];
        for (input, needle) in cases {
            let err = input.parse::<Reference>().expect_err(input).to_string();
            assert!(err.starts_with("invalid input: reference"), "{input}: {err}");
            assert!(err.contains(needle), "{input}: {err} lacks {needle}");
        }
        let long_tag = format!("foo:{}", "a".repeat(129));
        assert!(long_tag.parse::<Reference>().is_err());
        let long_name = format!("r.io/{}", "a".repeat(256));
        assert!(long_name.parse::<Reference>().unwrap_err().to_string().contains("longer than 255"));
        assert!("x".repeat(5000).parse::<Reference>().is_err());
        assert!(reference("r.io/x").with_tag("bad tag").is_err());
    }

    #[test]
    fn challenges_parse() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, AuthScheme::Bearer);
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:library/alpine:pull"));

        let c = parse_www_authenticate("bAsIc   REALM = \"a \\\"quoted\\\" \\\\ realm\" , charset=UTF-8").unwrap();
        assert_eq!(c.scheme, AuthScheme::Basic);
        assert_eq!(c.param("realm"), Some(r#"a "quoted" \ realm"#));
        assert_eq!(c.param("charset"), Some("UTF-8"));

        let all = parse_challenges(r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#)
            .unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].scheme, AuthScheme::Other("newauth".into()));
        assert_eq!(all[0].param("title"), Some(r#"Login to "apps""#));
        assert_eq!(all[1].param("realm"), Some("simple"));
        // Bearer is preferred over Basic, Basic over others.
        let preferred = parse_www_authenticate(r#"Basic realm="b", Bearer realm="t",, Other"#).unwrap();
        assert_eq!((&preferred.scheme, preferred.param("realm")), (&AuthScheme::Bearer, Some("t")));
        assert_eq!(parse_www_authenticate("Other x=1, Basic realm=r").unwrap().scheme, AuthScheme::Basic);

        let t68 = parse_challenges("Basic dXNlcjpwYXNz==, Bearer").unwrap();
        assert_eq!(t68[0].token68.as_deref(), Some("dXNlcjpwYXNz=="));
        assert_eq!((&t68[1].scheme, t68[1].params.len()), (&AuthScheme::Bearer, 0));
        let unicode = parse_www_authenticate("Bearer realm=\"ünïcødé\", error=insufficient_scope").unwrap();
        assert_eq!(unicode.param("realm"), Some("ünïcødé"));
        assert_eq!(unicode.error_text(), " (error: insufficient_scope)");
    }

    #[test]
    fn hostile_challenges_are_refused() {
        let cases = [
            "",
            "   ,  , ",
            "Bearer realm=\"unterminated",
            "Bearer realm=\"escape at end\\",
            "Bearer realm=\"a\", realm=\"b\"",
            "Bearer REALM=a, realm=b",
            "Bearer realm =",
            "Bearer realm=,service=x",
            "Bearer realm=a service=b",
            "Bearer realm=\"a\"\"b\"",
            "Bearer realm=\"bell\u{7}\"",
            "Bearer realm=\"nul\0\"",
            "=realm",
            "\"Bearer\" realm=a",
            "Bearer\trealm=a;b",
            "Bearer\u{e9} realm=a",
            "Bearer realm=ü",
            "Basic,realm=a",
        ];
        for input in cases {
            match parse_challenges(input) {
                Err(RegistryError::Protocol(message)) => assert!(message.contains("WWW-Authenticate"), "{message}"),
                other => panic!("{input:?} gave {other:?}"),
            }
        }
        let huge = format!("Bearer realm=\"{}\"", "a".repeat(MAX_CHALLENGE_HEADER));
        assert!(parse_challenges(&huge).is_err());
        let many_params: Vec<String> = (0..=MAX_CHALLENGE_PARAMS).map(|i| format!("p{i}=v")).collect();
        assert!(parse_challenges(&format!("Bearer {}", many_params.join(","))).is_err());
        let many: Vec<&str> = std::iter::repeat_n("Basic realm=a", MAX_CHALLENGES + 1).collect();
        assert!(parse_challenges(&many.join(", ")).is_err());
        // A long message is cut.
        let err = parse_challenges(&format!("Bearer realm=\"{}", "x".repeat(1000))).unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn token_freshness() {
        let s = Duration::from_secs;
        // 60 s token: a 6 s margin.
        assert!(token_is_fresh(s(0), s(60)));
        assert!(token_is_fresh(s(53), s(60)));
        assert!(!token_is_fresh(s(54), s(60)));
        assert!(!token_is_fresh(s(61), s(60)));
        // 1 h token: the margin is 10 s, not 6 min.
        assert!(token_is_fresh(s(3589), s(3600)));
        assert!(!token_is_fresh(s(3590), s(3600)));
        // Short tokens are still reused for most of their lifetime.
        assert!(token_is_fresh(Duration::from_millis(1700), s(2)));
        assert!(!token_is_fresh(Duration::from_millis(1800), s(2)));
        assert!(!token_is_fresh(s(0), Duration::ZERO));
        assert!(!token_is_fresh(Duration::MAX, s(60)));
    }

    #[test]
    fn token_responses() {
        let (value, lifetime) = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((value.to_str().unwrap(), lifetime), ("Bearer abc", Duration::from_secs(300)));
        assert!(value.is_sensitive());
        let (value, lifetime) =
            parse_token_response(br#"{"access_token":"xyz","issued_at":"2026-01-01T00:00:00Z"}"#).unwrap();
        assert_eq!((value.to_str().unwrap(), lifetime), ("Bearer xyz", DEFAULT_TOKEN_LIFETIME));
        let (value, _) = parse_token_response(br#"{"token":"","access_token":"second"}"#).unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer second");
        assert_eq!(parse_token_response(br#"{"token":"a","expires_in":-5}"#).unwrap().1, Duration::ZERO);
        assert_eq!(parse_token_response(br#"{"token":"a","expires_in":1e300}"#).unwrap().1, MAX_TOKEN_LIFETIME);
        assert!(parse_token_response(br#"{"expires_in":60}"#).is_err());
        assert!(parse_token_response(b"{\"token\":\"a\\nb\"}").is_err());
        assert!(parse_token_response(b"not json").is_err());
    }

    #[test]
    fn credentials_are_redacted() {
        let creds = Credentials::Basic { username: "alice".into(), password: "hunter2".into() };
        let text = format!("{creds:?}");
        assert!(text.contains("alice") && !text.contains("hunter2"), "{text}");
        let token = format!("{:?}", Credentials::Token("s3cr3t-token".into()));
        assert!(!token.contains("s3cr3t"), "{token}");
        assert!(basic("alice", "hunter2").is_sensitive());
        assert_ne!(creds.identity(), Credentials::Anonymous.identity());
    }

    #[test]
    fn plain_http_policy() {
        let client = RegistryClient::new(RegistryConfig::default()).unwrap();
        for host in ["localhost", "localhost:5000", "127.0.0.1:1234", "[::1]:5000", "[::1]", "LOCALHOST:80"] {
            assert_eq!(client.scheme_for(host), "http", "{host}");
        }
        for host in ["127.0.0.2:5000", "localhost.localdomain", "registry.example:5000", "[::2]:5000"] {
            assert_eq!(client.scheme_for(host), "https", "{host}");
        }
        let config = RegistryConfig { plain_http_hosts: vec!["mirror.lan:5000".into()], ..Default::default() };
        let client = RegistryClient::new(config).unwrap();
        assert_eq!(client.scheme_for("mirror.lan:5000"), "http");
        assert_eq!(client.scheme_for("mirror.lan:5001"), "https");
        assert_eq!(client.scheme_for("localhost:5000"), "https");
        let url = client.blob_url(&reference("localhost:5000/a/b"), &DIGEST.parse().unwrap()).unwrap();
        assert_eq!(url.to_string(), format!("https://localhost:5000/v2/a/b/blobs/{DIGEST}"));
        let url = client.manifest_url(&reference("alpine"), "latest").unwrap();
        assert_eq!(url.to_string(), "https://registry-1.docker.io/v2/library/alpine/manifests/latest");
        assert!(client.check_scheme(&"http://mirror.lan:5000/x".parse().unwrap()).is_ok());
        assert!(client.check_scheme(&"http://evil.example/x".parse().unwrap()).is_err());
    }

    #[test]
    fn client_configuration_errors() {
        let bad_pem = RegistryConfig { ca_pem: Some(b"not a certificate".to_vec()), ..Default::default() };
        assert!(matches!(RegistryClient::new(bad_pem), Err(RegistryError::Invalid(m)) if m.contains("no CERTIFICATE")));
        let bad_agent = RegistryConfig { user_agent: "a\nb".into(), ..Default::default() };
        assert!(matches!(RegistryClient::new(bad_agent), Err(RegistryError::Invalid(_))));
        let debug = format!("{:?}", RegistryClient::new(RegistryConfig::default()).unwrap());
        assert!(debug.contains("cached_tokens: 0"), "{debug}");
    }

    #[test]
    fn locations_resolve() {
        let base: Uri = "https://r.io:5000/v2/foo/blobs/uploads/?x=1".parse().unwrap();
        let resolve = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(
            resolve("/v2/foo/blobs/uploads/abc?_state=z").unwrap(),
            "https://r.io:5000/v2/foo/blobs/uploads/abc?_state=z"
        );
        assert_eq!(resolve("abc").unwrap(), "https://r.io:5000/v2/foo/blobs/uploads/abc");
        assert_eq!(resolve("?y=2").unwrap(), "https://r.io:5000/v2/foo/blobs/uploads/?y=2");
        assert_eq!(resolve("//cdn.example/blob").unwrap(), "https://cdn.example/blob");
        assert_eq!(resolve("http://s3.example/b?sig=1#frag").unwrap(), "http://s3.example/b?sig=1");
        assert!(resolve("ftp://x/y").is_err());
        assert!(resolve("javascript:alert(1)").is_err());
        assert!(resolve("http://").is_err());
        assert!(resolve(&"a".repeat(MAX_LOCATION + 1)).is_err());

        let upload: Uri = "http://h:1/v2/f/blobs/uploads/u?_state=s".parse().unwrap();
        assert_eq!(
            with_query(&upload, "digest", DIGEST).unwrap().to_string(),
            format!("http://h:1/v2/f/blobs/uploads/u?_state=s&digest=sha256%3A{}", &DIGEST[7..])
        );
        let bare: Uri = "http://h:1/u".parse().unwrap();
        assert_eq!(with_query(&bare, "k", "a b&c").unwrap().to_string(), "http://h:1/u?k=a%20b%26c");
        assert_eq!(shown_url(&upload), "http://h:1/v2/f/blobs/uploads/u");
    }

    #[test]
    fn content_ranges_and_error_bodies() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, Some(1000))));
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5, None)));
        for bad in ["bytes 9-1/10", "bytes 0-10/10", "items 0-1/2", "bytes */10", "bytes 0-x/1", "bytes -1-2/3"] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}"#;
        assert_eq!(error_detail(body), ": MANIFEST_UNKNOWN: manifest unknown");
        assert_eq!(error_detail(b"<html>oops</html>"), "");
        let long = format!(r#"{{"errors":[{{"code":"X","message":"{}\n"}}]}}"#, "m".repeat(2000));
        let detail = error_detail(long.as_bytes());
        assert!(detail.len() < MAX_ERROR_DETAIL + 10 && detail.ends_with("..."), "{detail}");
        let err = classify(StatusCode::NOT_FOUND, "blob x", error_detail(body));
        assert_eq!(err.to_string(), "blob x not found: MANIFEST_UNKNOWN: manifest unknown");
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, "x", String::new()).is_retryable());
        assert!(classify(StatusCode::TOO_MANY_REQUESTS, "x", String::new()).is_retryable());
        assert!(!classify(StatusCode::FORBIDDEN, "x", String::new()).is_retryable());
        assert!(matches!(classify(StatusCode::IM_A_TEAPOT, "x", String::new()), RegistryError::Protocol(_)));

        let mut headers = HeaderMap::new();
        assert_eq!(header_digest(&headers).unwrap(), None);
        headers.insert(DOCKER_CONTENT_DIGEST, HeaderValue::from_static("sha512:abcd"));
        assert_eq!(header_digest(&headers).unwrap(), None);
        headers.insert(DOCKER_CONTENT_DIGEST, HeaderValue::from_static("sha256:abcd"));
        assert!(matches!(header_digest(&headers), Err(RegistryError::Protocol(_))));
        headers.insert(DOCKER_CONTENT_DIGEST, HeaderValue::from_static(DIGEST));
        assert_eq!(header_digest(&headers).unwrap(), Some(DIGEST.parse().unwrap()));
    }
}
