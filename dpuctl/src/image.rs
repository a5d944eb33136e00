//! `dpuctl image`: container images the DPU serves lazily. `convert` turns an OCI image into the lazily loadable
//! form and pushes it to a registry, with a progress bar on a terminal; `create`, `get`, `list` and `delete` manage
//! the images the agent resolves; `export` / `unexport` put an image's layers into a subsystem as read-only
//! namespaces; `cache-stats` shows the chunk cache; `credential …` stores registry credentials, whose secrets are
//! read from stdin or a file, never from the command line.
//!
//! Images and credentials are named by a bare id or their full name (`images/ID`, `registryCredentials/ID`,
//! `subsystems/ID`); requests carry the full name.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Subcommand};
use dpu_proto::v1 as pb;
use dpu_proto::v1::convert_image_progress::Event;
use dpu_proto::v1::image_service_client::ImageServiceClient;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::{namespace_json, resource_state};

type Client = ImageServiceClient<Channel>;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Convert an OCI image into a lazily loadable one and push it to DST; shows progress on a terminal.
    Convert {
        /// A registry reference, or oci:DIR[:TAG] (an OCI image layout on the DPU).
        #[arg(value_name = "SRC")]
        source: String,
        /// Registry reference with a tag the converted image is pushed to.
        #[arg(value_name = "DST")]
        destination: String,
        /// Registry credential for SRC; default: anonymous.
        #[arg(long, value_name = "ID", value_parser = credential_name)]
        source_credentials: Option<ResourceName>,
        /// Registry credential for DST; default: anonymous.
        #[arg(long, value_name = "ID", value_parser = credential_name)]
        destination_credentials: Option<ResourceName>,
        /// Platform chosen when SRC is an index; default linux/amd64.
        #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = platform)]
        platform: Option<String>,
        /// Chunk size, a power of two from 4KiB to 4MiB, e.g. 64KiB; default: the agent's.
        #[arg(long, value_name = "BYTES", value_parser = chunk_size)]
        chunk_size: Option<u32>,
    },
    /// Create an image from a converted image's reference.
    Create {
        /// ID or images/ID.
        #[arg(value_name = "ID", value_parser = image_name)]
        id: ResourceName,
        /// The converted image, e.g. registry.example:5000/app:v1-lazy.
        #[arg(long = "ref", value_name = "REFERENCE")]
        reference: String,
        /// Registry credential; default: anonymous.
        #[arg(long, value_name = "ID", value_parser = credential_name)]
        credentials: Option<ResourceName>,
        /// Platform chosen when the reference names an index; default linux/amd64.
        #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = platform)]
        platform: Option<String>,
        /// Wait until the image is ready (default 300 seconds); exit 1 on an error or the timeout.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "300")]
        wait: Option<u64>,
    },
    /// One image with its layers, cache use and exports.
    Get {
        /// ID or images/ID.
        #[arg(value_name = "ID", value_parser = image_name)]
        id: ResourceName,
    },
    /// Every image.
    List,
    /// Delete an image; refused while one of its layers is exported.
    Delete {
        /// ID or images/ID.
        #[arg(value_name = "ID", value_parser = image_name)]
        id: ResourceName,
        #[arg(long)]
        allow_missing: bool,
    },
    /// Add one read-only namespace per layer of a ready image to a subsystem, bottom layer first.
    Export {
        /// ID or images/ID.
        #[arg(value_name = "ID", value_parser = image_name)]
        id: ResourceName,
        /// ID or subsystems/ID.
        #[arg(long, value_parser = subsystem_name)]
        subsystem: ResourceName,
    },
    /// Remove an image's layer namespaces from a subsystem (layers another exported image uses stay).
    Unexport {
        /// ID or images/ID.
        #[arg(value_name = "ID", value_parser = image_name)]
        id: ResourceName,
        /// ID or subsystems/ID.
        #[arg(long, value_parser = subsystem_name)]
        subsystem: ResourceName,
    },
    /// The DPU's chunk cache, shared by every image.
    CacheStats,
    /// Registry credentials (write-only secrets).
    #[command(subcommand)]
    Credential(CredentialCommand),
}

impl ImageCommand {
    /// Whether the command holds a stream open for as long as the agent works (minutes), so no per-request
    /// deadline may apply to it.
    pub fn is_streaming(&self) -> bool {
        matches!(self, Self::Convert { .. })
    }
}

#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Store a registry credential: a username with a password, or a bearer token, read from stdin or a file.
    #[command(group(ArgGroup::new("secret").required(true).args(["password_stdin", "password_file", "token_file"])))]
    Create {
        /// ID or registryCredentials/ID.
        #[arg(value_name = "ID", value_parser = credential_name)]
        id: ResourceName,
        /// Registry user name (needed with a password).
        #[arg(long)]
        username: Option<String>,
        /// Read the password from stdin.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Read the password from a file.
        #[arg(long, value_name = "PATH", requires = "username")]
        password_file: Option<PathBuf>,
        /// Read a bearer token, used as is instead of a username and password, from a file.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
    },
    /// One credential (never its secret).
    Get {
        /// ID or registryCredentials/ID.
        #[arg(value_name = "ID", value_parser = credential_name)]
        id: ResourceName,
    },
    /// Every credential.
    List,
    /// Delete a credential; refused while an image uses it.
    Delete {
        /// ID or registryCredentials/ID.
        #[arg(value_name = "ID", value_parser = credential_name)]
        id: ResourceName,
        #[arg(long)]
        allow_missing: bool,
    },
}

/// A resource given as a bare id or as its full name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceName {
    collection: &'static str,
    id: String,
}

impl ResourceName {
    fn parse(collection: &'static str, text: &str) -> Result<Self, String> {
        let id = match text.split_once('/') {
            None => text,
            Some((prefix, id)) if prefix == collection => id,
            Some(_) => return Err(format!("{text:?} is neither an id nor a name like {collection}/ID")),
        };
        if id.is_empty() || id.contains('/') {
            return Err(format!("{text:?} is neither an id nor a name like {collection}/ID"));
        }
        Ok(Self { collection, id: id.to_owned() })
    }

    fn id(&self) -> &str {
        &self.id
    }

    /// The full name requests carry, e.g. `images/app`.
    fn name(&self) -> String {
        format!("{}/{}", self.collection, self.id)
    }
}

fn image_name(text: &str) -> Result<ResourceName, String> {
    ResourceName::parse("images", text)
}

fn credential_name(text: &str) -> Result<ResourceName, String> {
    ResourceName::parse("registryCredentials", text)
}

fn subsystem_name(text: &str) -> Result<ResourceName, String> {
    ResourceName::parse("subsystems", text)
}

/// `os/arch` or `os/arch/variant`, e.g. linux/arm64/v8.
fn platform(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split('/').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty() || p.contains(char::is_whitespace)) {
        return Err(format!("{text:?} is not a platform like linux/amd64 or linux/arm64/v8"));
    }
    Ok(text.to_owned())
}

const MIN_CHUNK: u64 = 4 << 10;
const MAX_CHUNK: u64 = 4 << 20;

/// A chunk size: a power of two from 4 KiB to 4 MiB, written like the other sizes (65536, 64KiB).
fn chunk_size(text: &str) -> Result<u32, String> {
    let bytes = crate::parse_size(text)?;
    if !bytes.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&bytes) {
        return Err(format!("{text:?} is not a power of two from 4KiB to 4MiB"));
    }
    u32::try_from(bytes).map_err(|_| format!("{text:?} is too large"))
}

/// A secret as read from a file or stdin, without one trailing newline (`\n` or `\r\n`).
fn trim_secret(mut text: String) -> anyhow::Result<String> {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        anyhow::bail!("the secret is empty");
    }
    Ok(text)
}

fn read_secret(stdin: bool, file: Option<&PathBuf>) -> anyhow::Result<String> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None if stdin => std::io::read_to_string(std::io::stdin()).context("reading the secret from stdin")?,
        None => anyhow::bail!("give --password-stdin, --password-file or --token-file"),
    };
    trim_secret(text).with_context(|| match file {
        Some(path) => format!("reading {}", path.display()),
        None => "reading stdin".to_owned(),
    })
}

/// Formats a byte count with binary units and one decimal, e.g. `12.3 MiB`; below 1 KiB in bytes.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Move up while the value would print as 1024.0 or more.
    while (value * 10.0).round() >= 10240.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `part` as a percentage of `whole` with one decimal, e.g. `12.5%`; `-` when `whole` is 0.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 { "-".to_owned() } else { format!("{:.1}%", part as f64 * 100.0 / whole as f64) }
}

/// The hex of a digest (`sha256:0123…`) cut to 12 digits, as image tools show them.
fn short_digest(digest: &str) -> String {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    hex.chars().take(12).collect()
}

/// Aligned columns under a header; the last column is not padded.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                _ = write!(line, "{cell:<width$}  ", width = widths.get(i).copied().unwrap_or(0));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Aligned `key  value` lines; an empty value shows as `-`, further lines of a value are indented under it.
fn pairs(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        if value.is_empty() {
            _ = writeln!(out, "{key:<width$}  -");
            continue;
        }
        for (i, line) in value.lines().enumerate() {
            _ = writeln!(out, "{:<width$}  {line}", if i == 0 { *key } else { "" });
        }
    }
    out
}

fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn u64_at(value: &Value, key: &str) -> u64 {
    value.get(key).and_then(Value::as_u64).unwrap_or_default()
}

fn array_at<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn or_dash(text: &str) -> String {
    if text.is_empty() { "-".to_owned() } else { text.to_owned() }
}

fn layer_json(l: pb::ImageLayer) -> Value {
    json!({ "source_digest": l.source_digest, "data_digest": l.data_digest, "size_bytes": l.size_bytes,
            "chunks": l.chunks, "cached_chunks": l.cached_chunks, "uuid": l.uuid })
}

fn image_status_json(s: pb::ImageStatus) -> Value {
    json!({ "manifest_digest": s.manifest_digest, "layers": s.layers.into_iter().map(layer_json).collect::<Vec<_>>(),
            "bytes_total": s.bytes_total, "bytes_cached": s.bytes_cached, "bytes_fetched": s.bytes_fetched,
            "fetches": s.fetches, "corrupt_chunks": s.corrupt_chunks, "failed_reads": s.failed_reads,
            "last_error": s.last_error, "exported_as": s.exported_as, "trace_chunks": s.trace_chunks,
            "prefetched_chunks": s.prefetched_chunks })
}

fn image_json(i: pb::Image) -> Value {
    json!({ "name": i.name, "reference": i.reference, "credentials": i.credentials, "platform": i.platform,
            "generation": i.generation, "status": resource_state(i.status.as_ref()),
            "image_status": i.image_status.map(image_status_json) })
}

fn credential_json(c: pb::RegistryCredential) -> Value {
    json!({ "name": c.name, "username": c.username, "has_secret": c.has_secret, "generation": c.generation })
}

fn cache_stats_json(s: &pb::ImageCacheStats) -> Value {
    json!({ "capacity_bytes": s.capacity_bytes, "used_bytes": s.used_bytes, "chunks": s.chunks, "hits": s.hits,
            "misses": s.misses, "evicted": s.evicted, "corrupt": s.corrupt, "inserted_bytes": s.inserted_bytes })
}

fn summary_json(s: &pb::ConvertSummary) -> Value {
    json!({ "reference": s.reference, "manifest_digest": s.manifest_digest, "layers": s.layers,
            "layers_reused": s.layers_reused, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "chunks": s.chunks,
            "chunks_reused": s.chunks_reused })
}

const IMAGE_HEADER: [&str; 6] = ["NAME", "STATE", "LAYERS", "CACHED", "FETCHED", "REFERENCE"];

/// One `IMAGE_HEADER` row of an image in its JSON form. The layer and byte columns show `-` until the image
/// was resolved.
fn image_row(image: &Value) -> Vec<String> {
    let state = image.get("status").map_or("", |s| str_at(s, "state"));
    let status = image.get("image_status").filter(|s| !str_at(s, "manifest_digest").is_empty());
    let (layers, cached, fetched) = match status {
        Some(s) => (
            array_at(s, "layers").len().to_string(),
            format!("{}/{}", human_bytes(u64_at(s, "bytes_cached")), human_bytes(u64_at(s, "bytes_total"))),
            human_bytes(u64_at(s, "bytes_fetched")),
        ),
        None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
    };
    vec![
        str_at(image, "name").to_owned(),
        or_dash(state),
        layers,
        cached,
        fetched,
        str_at(image, "reference").to_owned(),
    ]
}

/// `get`: the image's row, its details, and its layers bottom first.
fn image_text(image: &Value) -> String {
    let mut out = columns(&IMAGE_HEADER, &[image_row(image)]);
    let reason = image.get("status").map_or("", |s| str_at(s, "reason"));
    let mut details = Vec::new();
    if !reason.is_empty() {
        details.push(("reason", reason.to_owned()));
    }
    details.push(("platform", str_at(image, "platform").to_owned()));
    details.push(("credentials", str_at(image, "credentials").to_owned()));
    let empty = Value::Null;
    let status = image.get("image_status").unwrap_or(&empty);
    let exported: Vec<&str> = array_at(status, "exported_as").iter().filter_map(Value::as_str).collect();
    details.extend([
        ("manifest digest", str_at(status, "manifest_digest").to_owned()),
        ("exported as", exported.join("\n")),
        ("fetches", u64_at(status, "fetches").to_string()),
        ("corrupt chunks", u64_at(status, "corrupt_chunks").to_string()),
        ("failed reads", u64_at(status, "failed_reads").to_string()),
        ("last error", str_at(status, "last_error").to_owned()),
        ("trace chunks", u64_at(status, "trace_chunks").to_string()),
        ("prefetched chunks", u64_at(status, "prefetched_chunks").to_string()),
    ]);
    out.push('\n');
    out.push_str(&pairs(&details));
    let layers: Vec<Vec<String>> = array_at(status, "layers")
        .iter()
        .map(|l| {
            vec![
                short_digest(str_at(l, "source_digest")),
                human_bytes(u64_at(l, "size_bytes")),
                u64_at(l, "chunks").to_string(),
                u64_at(l, "cached_chunks").to_string(),
                or_dash(str_at(l, "uuid")),
            ]
        })
        .collect();
    if !layers.is_empty() {
        out.push('\n');
        out.push_str(&columns(&["LAYER", "SIZE", "CHUNKS", "CACHED", "UUID"], &layers));
    }
    out
}

fn credentials_text(credentials: &[Value]) -> String {
    let rows: Vec<Vec<String>> = credentials
        .iter()
        .map(|c| {
            let secret = if c.get("has_secret").and_then(Value::as_bool).unwrap_or(false) { "yes" } else { "no" };
            vec![str_at(c, "name").to_owned(), or_dash(str_at(c, "username")), secret.to_owned()]
        })
        .collect();
    columns(&["NAME", "USERNAME", "SECRET"], &rows)
}

fn cache_stats_text(stats: &Value) -> String {
    let (capacity, used) = (u64_at(stats, "capacity_bytes"), u64_at(stats, "used_bytes"));
    let (hits, misses) = (u64_at(stats, "hits"), u64_at(stats, "misses"));
    let used =
        if capacity == 0 { human_bytes(used) } else { format!("{} ({})", human_bytes(used), percent(used, capacity)) };
    pairs(&[
        ("capacity", human_bytes(capacity)),
        ("used", used),
        ("chunks", u64_at(stats, "chunks").to_string()),
        ("hits", hits.to_string()),
        ("misses", misses.to_string()),
        ("hit ratio", percent(hits, hits.saturating_add(misses))),
        ("evicted", u64_at(stats, "evicted").to_string()),
        ("corrupt", u64_at(stats, "corrupt").to_string()),
    ])
}

fn summary_text(summary: &Value) -> String {
    pairs(&[
        ("reference", str_at(summary, "reference").to_owned()),
        ("manifest digest", str_at(summary, "manifest_digest").to_owned()),
        ("layers", format!("{} ({} reused)", u64_at(summary, "layers"), u64_at(summary, "layers_reused"))),
        ("bytes in", human_bytes(u64_at(summary, "bytes_in"))),
        ("bytes out", human_bytes(u64_at(summary, "bytes_out"))),
        ("chunks", format!("{} ({} reused)", u64_at(summary, "chunks"), u64_at(summary, "chunks_reused"))),
    ])
}

fn namespaces_text(export: &Value) -> String {
    let rows: Vec<Vec<String>> = array_at(export, "namespaces")
        .iter()
        .map(|n| vec![u64_at(n, "nsid").to_string(), str_at(n, "name").to_owned(), or_dash(str_at(n, "uuid"))])
        .collect();
    columns(&["NSID", "NAME", "UUID"], &rows)
}

/// The table form of what [`image`] returned for `command`.
pub fn text(command: &ImageCommand, value: &Value) -> String {
    match command {
        ImageCommand::Convert { .. } => summary_text(value),
        ImageCommand::Create { .. } | ImageCommand::Get { .. } => image_text(value),
        ImageCommand::List => {
            let rows: Vec<Vec<String>> = array_at(value, "images").iter().map(image_row).collect();
            columns(&IMAGE_HEADER, &rows)
        }
        ImageCommand::Export { .. } => namespaces_text(value),
        ImageCommand::CacheStats => cache_stats_text(value),
        ImageCommand::Credential(CredentialCommand::Create { .. } | CredentialCommand::Get { .. }) => {
            credentials_text(std::slice::from_ref(value))
        }
        ImageCommand::Credential(CredentialCommand::List) => credentials_text(array_at(value, "credentials")),
        ImageCommand::Delete { .. }
        | ImageCommand::Unexport { .. }
        | ImageCommand::Credential(CredentialCommand::Delete { .. }) => crate::table(value),
    }
}

/// What the conversion's progress display shows, folded from the stream's events.
#[derive(Debug, Default, Clone, PartialEq)]
struct ConvertProgress {
    /// Compressed source bytes and layer count, once the source manifest was read.
    source_bytes: Option<u64>,
    layers: Option<u32>,
    bytes_in: u64,
    layers_done: u32,
    /// Whether the layer finished last was reused from an earlier conversion.
    last_reused: bool,
    summary: Option<pb::ConvertSummary>,
}

impl ConvertProgress {
    fn apply(&mut self, event: Event) {
        match event {
            Event::Started(started) => {
                self.source_bytes = Some(started.source_bytes);
                self.layers = Some(started.layers);
            }
            Event::BytesIn(bytes) => self.bytes_in = self.bytes_in.max(bytes),
            Event::LayerDone(done) => {
                self.layers_done = self.layers_done.saturating_add(1);
                self.last_reused = done.reused;
            }
            Event::Summary(summary) => self.summary = Some(summary),
        }
    }

    /// The text beside the bar, e.g. `layer 2/5 (reused)`.
    fn message(&self) -> String {
        let Some(layers) = self.layers else { return "reading the source manifest".to_owned() };
        let reused = if self.layers_done > 0 && self.last_reused { " (reused)" } else { "" };
        format!("layer {}/{layers}{reused}", self.layers_done)
    }
}

const SPINNER_TEMPLATE: &str = "{spinner} {elapsed:>4} {msg}";
/// The message is padded so that the bar keeps its width when it changes.
const BAR_TEMPLATE: &str = "{spinner} {elapsed:>4} [{wide_bar}] {done_bytes}/{source_bytes} {msg:<22}";

/// The progress bar on stderr; absent when stderr is not a terminal. Dropping it clears it.
#[derive(Debug)]
struct Bar(Option<ProgressBar>);

impl Bar {
    fn new(visible: bool) -> Self {
        if !visible {
            return Self(None);
        }
        let bar = ProgressBar::no_length();
        bar.set_style(ProgressStyle::with_template(SPINNER_TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar()));
        bar.enable_steady_tick(Duration::from_millis(120));
        Self(Some(bar))
    }

    fn show(&self, progress: &ConvertProgress) {
        let Some(bar) = &self.0 else { return };
        if let Some(total) = progress.source_bytes
            && bar.length() != Some(total)
        {
            bar.set_style(bar_style());
            bar.set_length(total);
        }
        bar.set_position(progress.bytes_in);
        bar.set_message(progress.message());
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(BAR_TEMPLATE)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key("done_bytes", |s: &ProgressState, w: &mut dyn std::fmt::Write| _ = w.write_str(&human_bytes(s.pos())))
        .with_key("source_bytes", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            _ = w.write_str(&human_bytes(s.len().unwrap_or_default()));
        })
        .progress_chars("=> ")
}

async fn convert(c: &mut Client, request: pb::ConvertImageRequest) -> anyhow::Result<Value> {
    let mut progress = ConvertProgress::default();
    let bar = Bar::new(std::io::stderr().is_terminal());
    bar.show(&progress);
    let mut stream = c.convert_image(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        if let Some(event) = message.event {
            progress.apply(event);
            bar.show(&progress);
        }
    }
    drop(bar);
    let summary = progress.summary.context("the agent ended the conversion without a summary")?;
    Ok(summary_json(&summary))
}

/// Where an image stands for `create --wait`.
#[derive(Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    Failed(String),
    Pending(String),
}

fn readiness(image: &pb::Image) -> Readiness {
    let Some(status) = &image.status else { return Readiness::Pending(String::new()) };
    match pb::ResourceState::try_from(status.state) {
        Ok(pb::ResourceState::Ready) => Readiness::Ready,
        Ok(pb::ResourceState::Error) if status.reason.is_empty() => Readiness::Failed("no reason given".to_owned()),
        Ok(pb::ResourceState::Error) => Readiness::Failed(status.reason.clone()),
        _ => Readiness::Pending(status.reason.clone()),
    }
}

/// How often `create --wait` asks for the image's state.
const POLL: Duration = Duration::from_secs(1);

/// Polls the image until it is ready; an error state or the deadline is an error.
async fn wait_ready(c: &mut Client, mut image: pb::Image, name: &str, seconds: u64) -> anyhow::Result<pb::Image> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        match readiness(&image) {
            Readiness::Ready => return Ok(image),
            Readiness::Failed(reason) => anyhow::bail!("{name} failed: {reason}"),
            Readiness::Pending(reason) => {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    let why = if reason.is_empty() { String::new() } else { format!(": {reason}") };
                    anyhow::bail!("{name} is not ready after {seconds} s{why}");
                }
                tokio::time::sleep(POLL.min(deadline - now)).await;
            }
        }
        image = c.get_image(pb::GetImageRequest { name: name.to_owned() }).await?.into_inner();
    }
}

pub async fn image(channel: Channel, command: &ImageCommand) -> anyhow::Result<Value> {
    let mut c = ImageServiceClient::new(channel);
    let full = |name: &Option<ResourceName>| name.as_ref().map(ResourceName::name).unwrap_or_default();
    Ok(match command {
        ImageCommand::Convert {
            source,
            destination,
            source_credentials,
            destination_credentials,
            platform,
            chunk_size,
        } => {
            let request = pb::ConvertImageRequest {
                source: source.clone(),
                destination: destination.clone(),
                source_credentials: full(source_credentials),
                destination_credentials: full(destination_credentials),
                platform: platform.clone().unwrap_or_default(),
                chunk_size: chunk_size.unwrap_or_default(),
            };
            convert(&mut c, request).await?
        }
        ImageCommand::Create { id, reference, credentials, platform, wait } => {
            let image = pb::Image {
                reference: reference.clone(),
                credentials: full(credentials),
                platform: platform.clone().unwrap_or_default(),
                ..Default::default()
            };
            let request = pb::CreateImageRequest { image_id: id.id().to_owned(), image: Some(image) };
            let mut image = c.create_image(request).await?.into_inner();
            if let Some(seconds) = wait {
                image = wait_ready(&mut c, image, &id.name(), *seconds).await?;
            }
            image_json(image)
        }
        ImageCommand::Get { id } => {
            image_json(c.get_image(pb::GetImageRequest { name: id.name() }).await?.into_inner())
        }
        ImageCommand::List => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = c.list_images(pb::ListImagesRequest { page_size: 0, page_token }).await?.into_inner();
                all.extend(page.images.into_iter().map(image_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "images": all })
        }
        ImageCommand::Delete { id, allow_missing } => {
            c.delete_image(pb::DeleteImageRequest { name: id.name(), allow_missing: *allow_missing }).await?;
            json!({ "deleted": id.name() })
        }
        ImageCommand::Export { id, subsystem } => {
            let request = pb::ExportImageRequest { image: id.name(), subsystem: subsystem.name() };
            let namespaces = c.export_image(request).await?.into_inner().namespaces;
            json!({ "image": id.name(), "subsystem": subsystem.name(),
                    "namespaces": namespaces.into_iter().map(namespace_json).collect::<Vec<_>>() })
        }
        ImageCommand::Unexport { id, subsystem } => {
            c.unexport_image(pb::UnexportImageRequest { image: id.name(), subsystem: subsystem.name() }).await?;
            json!({ "unexported": id.name(), "subsystem": subsystem.name() })
        }
        ImageCommand::CacheStats => {
            cache_stats_json(&c.get_image_cache_stats(pb::GetImageCacheStatsRequest {}).await?.into_inner())
        }
        ImageCommand::Credential(CredentialCommand::Create {
            id,
            username,
            password_stdin,
            password_file,
            token_file,
        }) => {
            let mut credential =
                pb::RegistryCredential { username: username.clone().unwrap_or_default(), ..Default::default() };
            match token_file {
                Some(path) => credential.token = read_secret(false, Some(path))?,
                None => credential.password = read_secret(*password_stdin, password_file.as_ref())?,
            }
            let request =
                pb::CreateRegistryCredentialRequest { credential_id: id.id().to_owned(), credential: Some(credential) };
            credential_json(c.create_registry_credential(request).await?.into_inner())
        }
        ImageCommand::Credential(CredentialCommand::Get { id }) => credential_json(
            c.get_registry_credential(pb::GetRegistryCredentialRequest { name: id.name() }).await?.into_inner(),
        ),
        ImageCommand::Credential(CredentialCommand::List) => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let request = pb::ListRegistryCredentialsRequest { page_size: 0, page_token };
                let page = c.list_registry_credentials(request).await?.into_inner();
                all.extend(page.credentials.into_iter().map(credential_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "credentials": all })
        }
        ImageCommand::Credential(CredentialCommand::Delete { id, allow_missing }) => {
            let request = pb::DeleteRegistryCredentialRequest { name: id.name(), allow_missing: *allow_missing };
            c.delete_registry_credential(request).await?;
            json!({ "deleted": id.name() })
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// `dpuctl image …` as the top-level parser sees it.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ImageCommand,
    }

    fn parse(args: &[&str]) -> Result<ImageCommand, clap::Error> {
        Cli::try_parse_from(std::iter::once("image").chain(args.iter().copied())).map(|c| c.command)
    }

    #[test]
    fn names_are_ids_or_full_names() {
        assert_eq!(image_name("app").unwrap().name(), "images/app");
        assert_eq!(image_name("images/app").unwrap().name(), "images/app");
        assert_eq!(image_name("images/app").unwrap().id(), "app");
        assert_eq!(credential_name("registryCredentials/ghcr").unwrap().name(), "registryCredentials/ghcr");
        assert_eq!(subsystem_name("nvme0").unwrap().name(), "subsystems/nvme0");
        for bad in ["", "images/", "volumes/app", "images/a/b", "registryCredentials/x"] {
            assert!(image_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn platforms_and_chunk_sizes() {
        assert_eq!(platform("linux/arm64/v8").as_deref(), Ok("linux/arm64/v8"));
        assert_eq!(platform("linux/amd64").as_deref(), Ok("linux/amd64"));
        for bad in ["amd64", "linux/", "linux//v8", "a/b/c/d", "linux/amd 64"] {
            assert!(platform(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(chunk_size("64KiB"), Ok(64 << 10));
        assert_eq!(chunk_size("4096"), Ok(4096));
        assert_eq!(chunk_size("4MiB"), Ok(4 << 20));
        for bad in ["2048", "8MiB", "65535", "100KiB", "lots"] {
            assert!(chunk_size(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn arguments() {
        let ImageCommand::Convert { source, destination, source_credentials, platform, chunk_size, .. } = parse(&[
            "convert",
            "docker.io/library/nginx:1.27",
            "reg:5000/nginx:1.27-lazy",
            "--source-credentials",
            "hub",
            "--platform",
            "linux/arm64",
            "--chunk-size",
            "1MiB",
        ])
        .unwrap() else {
            panic!("not convert")
        };
        assert_eq!(
            (source.as_str(), destination.as_str()),
            ("docker.io/library/nginx:1.27", "reg:5000/nginx:1.27-lazy")
        );
        assert_eq!(source_credentials.unwrap().name(), "registryCredentials/hub");
        assert_eq!((platform.as_deref(), chunk_size), (Some("linux/arm64"), Some(1 << 20)));

        let wait = |args: &[&str]| match parse(args).unwrap() {
            ImageCommand::Create { wait, .. } => wait,
            other => panic!("{other:?}"),
        };
        assert_eq!(wait(&["create", "app", "--ref", "r/app:v1"]), None);
        assert_eq!(wait(&["create", "app", "--ref", "r/app:v1", "--wait"]), Some(300));
        assert_eq!(wait(&["create", "app", "--wait", "--ref", "r/app:v1"]), Some(300));
        assert_eq!(wait(&["create", "app", "--ref", "r/app:v1", "--wait", "20"]), Some(20));
        assert!(parse(&["create", "app"]).is_err(), "--ref is required");
        assert!(parse(&["convert", "a", "b", "--chunk-size", "3000"]).is_err());
        assert!(parse(&["export", "app"]).is_err(), "--subsystem is required");
        assert!(parse(&["get", "volumes/app"]).is_err());
    }

    #[test]
    fn credential_secrets_never_come_from_argv() {
        assert!(parse(&["credential", "create", "hub", "--username", "u"]).is_err(), "a secret source is required");
        assert!(parse(&["credential", "create", "hub", "--password-stdin"]).is_err(), "a password needs a username");
        assert!(parse(&["credential", "create", "hub", "--username", "u", "--password", "p"]).is_err());
        assert!(
            parse(&["credential", "create", "hub", "--username", "u", "--password-stdin", "--token-file", "t"])
                .is_err()
        );
        assert!(parse(&["credential", "create", "hub", "--token-file", "/run/token"]).is_ok());
        assert!(parse(&["credential", "create", "hub", "--username", "u", "--password-file", "/run/pw"]).is_ok());
        assert!(matches!(
            parse(&["credential", "delete", "registryCredentials/hub", "--allow-missing"]).unwrap(),
            ImageCommand::Credential(CredentialCommand::Delete { allow_missing: true, .. })
        ));
    }

    #[test]
    fn secrets_lose_one_trailing_newline() {
        assert_eq!(trim_secret("hunter2\n".into()).unwrap(), "hunter2");
        assert_eq!(trim_secret("hunter2\r\n".into()).unwrap(), "hunter2");
        assert_eq!(trim_secret("hunter2\n\n".into()).unwrap(), "hunter2\n");
        assert_eq!(trim_secret(" spaced ".into()).unwrap(), " spaced ");
        assert!(trim_secret("\n".into()).is_err());
        assert!(trim_secret(String::new()).is_err());

        let dir = std::env::temp_dir().join(format!("dpuctl-secret-{}", std::process::id()));
        std::fs::write(&dir, "token-value\n").unwrap();
        let read = read_secret(false, Some(&dir));
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(read.unwrap(), "token-value");
        assert!(read_secret(false, Some(&PathBuf::from("/nonexistent/secret"))).is_err());
    }

    #[test]
    fn sizes_and_ratios() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12_897_485), "12.3 MiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.0 MiB", "rounding up to 1024.0 KiB moves to the next unit");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(percent(1, 8), "12.5%");
        assert_eq!(percent(5, 0), "-");
        assert_eq!(short_digest("sha256:0123456789abcdef0123"), "0123456789ab");
        assert_eq!(short_digest("abc"), "abc");
    }

    #[test]
    fn columns_align_and_last_column_is_not_padded() {
        let rows = vec![vec!["images/a".into(), "ready".into(), "x".into()], vec!["b".into(), "-".into(), "".into()]];
        assert_eq!(
            columns(&["NAME", "STATE", "REF"], &rows),
            "NAME      STATE  REF\nimages/a  ready  x\nb         -\n"
        );
        assert_eq!(
            pairs(&[("a", "1".into()), ("long key", String::new()), ("b", "x\ny".into())]),
            concat!("a         1\n", "long key  -\n", "b         x\n", "          y\n",)
        );
    }

    fn sample_image() -> pb::Image {
        pb::Image {
            name: "images/app".into(),
            reference: "reg:5000/app:v1-lazy".into(),
            credentials: "registryCredentials/hub".into(),
            platform: "linux/amd64".into(),
            generation: 1,
            status: Some(pb::ResourceStatus {
                state: pb::ResourceState::Ready.into(),
                reason: String::new(),
                observed_generation: 1,
                ..pb::ResourceStatus::default()
            }),
            image_status: Some(pb::ImageStatus {
                manifest_digest: "sha256:feedface".into(),
                layers: vec![pb::ImageLayer {
                    source_digest: "sha256:0123456789abcdef".into(),
                    data_digest: "sha256:99".into(),
                    size_bytes: 4 << 20,
                    chunks: 64,
                    cached_chunks: 16,
                    uuid: "0b7e4a8e-3c1d-5f00-8a2b-112233445566".into(),
                }],
                bytes_total: 4 << 20,
                bytes_cached: 1 << 20,
                bytes_fetched: 1 << 20,
                fetches: 16,
                exported_as: vec!["subsystems/s/namespaces/n1".into(), "subsystems/t/namespaces/n1".into()],
                trace_chunks: 12,
                prefetched_chunks: 10,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn image_tables() {
        let image = image_json(sample_image());
        assert_eq!(image["status"]["state"], "ready");
        assert_eq!(image["image_status"]["layers"][0]["chunks"], 64);
        let list = text(&ImageCommand::List, &json!({ "images": [image.clone()] }));
        assert_eq!(
            list,
            concat!(
                "NAME        STATE  LAYERS  CACHED           FETCHED  REFERENCE\n",
                "images/app  ready  1       1.0 MiB/4.0 MiB  1.0 MiB  reg:5000/app:v1-lazy\n",
            )
        );
        let get = image_text(&image);
        assert!(get.starts_with(&list), "{get}");
        for line in [
            "manifest digest    sha256:feedface\n",
            "exported as        subsystems/s/namespaces/n1\n                   subsystems/t/namespaces/n1\n",
            "last error         -\n",
            "trace chunks       12\n",
            "prefetched chunks  10\n",
            "LAYER         SIZE     CHUNKS  CACHED  UUID\n",
            "0123456789ab  4.0 MiB  64      16      0b7e4a8e-3c1d-5f00-8a2b-112233445566\n",
        ] {
            assert!(get.contains(line), "{line:?} missing in\n{get}");
        }

        let pending = pb::Image {
            status: Some(pb::ResourceStatus {
                state: pb::ResourceState::Pending.into(),
                reason: "registry unavailable".into(),
                observed_generation: 1,
                ..pb::ResourceStatus::default()
            }),
            image_status: Some(pb::ImageStatus::default()),
            ..sample_image()
        };
        let pending = image_json(pending);
        assert_eq!(image_row(&pending)[1..5], ["pending", "-", "-", "-"]);
        assert!(image_text(&pending).contains("reason             registry unavailable\n"));
        assert!(!image_text(&pending).contains("\nLAYER "), "no layer table before the image is resolved");
    }

    #[test]
    fn other_tables() {
        let stats = pb::ImageCacheStats {
            capacity_bytes: 8 << 30,
            used_bytes: 1 << 30,
            chunks: 4096,
            hits: 750,
            misses: 250,
            evicted: 3,
            corrupt: 1,
            inserted_bytes: 2 << 30,
        };
        assert_eq!(
            text(&ImageCommand::CacheStats, &cache_stats_json(&stats)),
            concat!(
                "capacity   8.0 GiB\n",
                "used       1.0 GiB (12.5%)\n",
                "chunks     4096\n",
                "hits       750\n",
                "misses     250\n",
                "hit ratio  75.0%\n",
                "evicted    3\n",
                "corrupt    1\n",
            )
        );
        assert!(cache_stats_text(&cache_stats_json(&pb::ImageCacheStats::default())).contains("hit ratio  -\n"));

        let credentials = json!({ "credentials": [
            credential_json(pb::RegistryCredential { name: "registryCredentials/hub".into(), username: "bot".into(),
                has_secret: true, ..Default::default() }),
            credential_json(pb::RegistryCredential { name: "registryCredentials/anon".into(), ..Default::default() }),
        ] });
        assert_eq!(
            text(&ImageCommand::Credential(CredentialCommand::List), &credentials),
            concat!(
                "NAME                      USERNAME  SECRET\n",
                "registryCredentials/hub   bot       yes\n",
                "registryCredentials/anon  -         no\n",
            )
        );

        let export = json!({ "namespaces": [namespace_json(pb::Namespace { name: "subsystems/s/namespaces/l0".into(),
            nsid: 3, uuid: "u-0".into(), ..Default::default() })] });
        let command = parse(&["export", "app", "--subsystem", "s"]).unwrap();
        assert_eq!(
            text(&command, &export),
            "NSID  NAME                        UUID\n3     subsystems/s/namespaces/l0  u-0\n"
        );

        let summary = pb::ConvertSummary {
            reference: "reg:5000/app:v1-lazy".into(),
            manifest_digest: "sha256:abc".into(),
            layers: 5,
            layers_reused: 2,
            bytes_in: 12_897_485,
            bytes_out: 14 << 20,
            chunks: 230,
            chunks_reused: 90,
        };
        let summary = summary_json(&summary);
        assert_eq!(summary["bytes_in"], 12_897_485);
        assert_eq!(
            text(&parse(&["convert", "a", "b"]).unwrap(), &summary),
            concat!(
                "reference        reg:5000/app:v1-lazy\n",
                "manifest digest  sha256:abc\n",
                "layers           5 (2 reused)\n",
                "bytes in         12.3 MiB\n",
                "bytes out        14.0 MiB\n",
                "chunks           230 (90 reused)\n",
            )
        );
    }

    #[test]
    fn progress_follows_the_events() {
        let mut p = ConvertProgress::default();
        assert_eq!(p.message(), "reading the source manifest");
        assert_eq!(p.source_bytes, None);
        p.apply(Event::Started(pb::ConvertStarted { layers: 5, source_bytes: 100 << 20 }));
        assert_eq!((p.source_bytes, p.message().as_str()), (Some(100 << 20), "layer 0/5"));
        p.apply(Event::BytesIn(10 << 20));
        p.apply(Event::LayerDone(pb::ConvertLayerDone { layer: 0, reused: false, chunks: 10, stored_bytes: 1 }));
        assert_eq!((p.bytes_in, p.message().as_str()), (10 << 20, "layer 1/5"));
        p.apply(Event::LayerDone(pb::ConvertLayerDone { layer: 1, reused: true, chunks: 10, stored_bytes: 0 }));
        assert_eq!(p.message(), "layer 2/5 (reused)");
        p.apply(Event::BytesIn(5 << 20));
        assert_eq!(p.bytes_in, 10 << 20, "the position never goes back");
        p.apply(Event::LayerDone(pb::ConvertLayerDone { layer: 2, reused: false, chunks: 10, stored_bytes: 1 }));
        assert_eq!(p.message(), "layer 3/5");
        assert!(p.summary.is_none());
        p.apply(Event::Summary(pb::ConvertSummary { layers: 5, ..Default::default() }));
        assert_eq!(p.summary.map(|s| s.layers), Some(5));
    }

    #[test]
    fn progress_templates_parse() {
        assert!(ProgressStyle::with_template(SPINNER_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
        let hidden = Bar(Some(ProgressBar::hidden()));
        let mut p = ConvertProgress::default();
        p.apply(Event::Started(pb::ConvertStarted { layers: 2, source_bytes: 1000 }));
        p.apply(Event::BytesIn(400));
        hidden.show(&p);
        let bar = hidden.0.as_ref().unwrap();
        assert_eq!((bar.length(), bar.position(), bar.message()), (Some(1000), 400, "layer 0/2".to_owned()));
        Bar(None).show(&p);
    }

    #[test]
    fn waiting_reads_the_state() {
        let with = |state: pb::ResourceState, reason: &str| pb::Image {
            status: Some(pb::ResourceStatus {
                state: state.into(),
                reason: reason.into(),
                observed_generation: 1,
                ..pb::ResourceStatus::default()
            }),
            ..sample_image()
        };
        assert_eq!(readiness(&with(pb::ResourceState::Ready, "")), Readiness::Ready);
        assert_eq!(readiness(&with(pb::ResourceState::Error, "no such tag")), Readiness::Failed("no such tag".into()));
        assert_eq!(readiness(&with(pb::ResourceState::Error, "")), Readiness::Failed("no reason given".into()));
        assert_eq!(readiness(&with(pb::ResourceState::Pending, "retrying")), Readiness::Pending("retrying".into()));
        assert_eq!(readiness(&pb::Image::default()), Readiness::Pending(String::new()));
    }
}
