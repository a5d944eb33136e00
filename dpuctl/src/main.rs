//! `dpuctl`: drive a dpu-agent from the host.
//!
//! Exit codes: see [`output::exit`] (0 success, 2 bad arguments, 3–8 by the agent's gRPC status).

#![allow(clippy::print_stdout)] // Printing results is this program's job.

mod crypto;
mod fabric;
mod image;
mod mesh;
mod output;
mod verbs;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dpu_proto::v1 as pb;
use dpu_proto::v1::agent_service_client::AgentServiceClient;
use dpu_proto::v1::storage_service_client::StorageServiceClient;
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Parser)]
#[command(name = "dpuctl", version, about = "Control a dpu-agent from the host", after_help = output::exit::HELP)]
struct Cli {
    /// Agent address: http://HOST:PORT for loopback plaintext, https://HOST:PORT for mTLS.
    #[arg(long, env = "DPUCTL_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    addr: String,
    /// CA certificate (PEM) that signed the agent's server certificate; implies TLS.
    #[arg(long, env = "DPUCTL_CA", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM); its subject OU carries the role (viewer, operator).
    #[arg(long, env = "DPUCTL_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "DPUCTL_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// Server name to verify instead of the host in --addr.
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 10, global = true)]
    timeout: u64,
    /// Output format: table (lists with a header; one object as fields), wide (every field), json, yaml.
    #[arg(long, short = 'o', value_enum, default_value_t = output::Format::Table, global = true)]
    output: output::Format,
    /// Same as `-o json`.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show one object, or every object of KIND: `dpuctl get volumes`, `dpuctl get volume db -o yaml`.
    #[command(next_help_heading = "Objects", display_order = 1)]
    Get {
        /// volume, subsystem, namespace, nvme-listener, image, registry-credential, crypto-key, ipsec-tunnel,
        /// attachment, service, port, fabric, settings, mesh-workload, mesh-certificate, mesh-cluster,
        /// mesh-route-table, mesh-listener, mesh-policy (plurals and the API's collection names work too).
        kind: String,
        /// ID (namespaces and nvme-listeners: SUBSYSTEM/ID); without it, every object of KIND.
        name: Option<String>,
        /// After the objects, follow their changes as they happen.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// Every object of KIND (namespaces and nvme-listeners: those of SUBSYSTEM).
    #[command(display_order = 2)]
    List {
        kind: String,
        /// The subsystem, for namespaces and nvme-listeners.
        subsystem: Option<String>,
        /// After the objects, follow their changes as they happen.
        #[arg(long, short = 'w')]
        watch: bool,
    },
    /// One object in full: its spec, its status and its recent events.
    #[command(display_order = 3)]
    Describe { kind: String, name: String },
    /// Create an object: KIND, NAME, then the kind's flags (`dpuctl create volume db --malloc --size 1GiB`;
    /// `dpuctl create volume -- --help` lists them).
    #[command(display_order = 4)]
    Create {
        kind: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "NAME AND FLAGS")]
        args: Vec<String>,
    },
    /// Change an object: KIND, NAME, then the flags to change (`dpuctl update service web --backend …`).
    #[command(display_order = 5)]
    Update {
        kind: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "NAME AND FLAGS")]
        args: Vec<String>,
    },
    /// Delete objects of KIND.
    #[command(display_order = 6)]
    Delete {
        kind: String,
        #[arg(required = true)]
        names: Vec<String>,
        /// Succeed when an object does not exist.
        #[arg(long)]
        allow_missing: bool,
    },
    /// Create or update every mesh object in FILE (JSON, the MeshSpecs shape; see `dpuctl mesh apply`).
    #[command(display_order = 7)]
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Also delete the mesh objects the file does not name.
        #[arg(long)]
        prune: bool,
    },
    /// Agent build, platform and probed capabilities.
    Info,
    /// gRPC health of the agent (or of one service).
    Health {
        /// Service name, e.g. dpu.v1.AgentService; empty for the whole server.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Agent run-time settings.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// NVMe-oF target: volumes, subsystems, namespaces, listeners, stats.
    #[command(subcommand)]
    Storage(StorageCommand),
    /// Shared service-mesh proxy: apply a spec file, get/list/delete objects, dump the running config.
    #[command(subcommand)]
    Mesh(mesh::MeshCommand),
    /// eSwitch fabric: ports, settings, pod attachments (attach/detach), rule stats.
    #[command(subcommand)]
    Fabric(fabric::FabricCommand),
    /// Container images served lazily: convert, create/list/get/delete, export to a subsystem, cache stats.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Crypto: the capability registry (hardware offloads) and keys (write-only).
    #[command(subcommand)]
    Crypto(crypto::CryptoCommand),
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell), e.g.
    /// `dpuctl completion bash > /usr/share/bash-completion/completions/dpuctl`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Follow every change of intent and status as it happens (a line per event) until interrupted; reconnects
    /// and resumes where it stopped when the agent restarts or is upgraded.
    Watch(watch::WatchArgs),
}

impl Command {
    /// Whether the command only reads (safe to send again).
    fn is_read(&self) -> bool {
        matches!(
            self,
            Command::Info
                | Command::Health { .. }
                | Command::Get { watch: false, .. }
                | Command::List { watch: false, .. }
                | Command::Describe { .. }
        )
    }

    /// Whether the command streams for as long as the agent works, which may be minutes.
    fn is_streaming(&self) -> bool {
        matches!(self, Command::Watch(_) | Command::Get { watch: true, .. } | Command::List { watch: true, .. })
            || matches!(self, Command::Image(command) if command.is_streaming())
    }
}

/// A verb of the one grammar as the data path's command, parsed with its own flags; `None` for the other
/// commands. A wrong flag prints clap's message and exits 2, as for any command.
fn resolve(command: &Command) -> Result<Option<Command>, String> {
    use verbs::Verb;
    let (verb, kind, args): (Verb, &str, Vec<String>) = match command {
        Command::Get { kind, name: Some(name), .. } => (Verb::Get, kind, vec![name.clone()]),
        Command::Get { kind, name: None, .. } => {
            let k = verbs::kind(kind)?;
            (if k.singleton() { Verb::Get } else { Verb::List }, kind, vec![])
        }
        Command::List { kind, subsystem, .. } => (Verb::List, kind, subsystem.iter().cloned().collect()),
        Command::Describe { kind, name } => (Verb::Get, kind, vec![name.clone()]),
        Command::Create { kind, args } => (Verb::Create, kind, args.clone()),
        Command::Update { kind, args } => (Verb::Update, kind, args.clone()),
        Command::Apply { file, prune } => {
            return Ok(Some(Command::Mesh(mesh::MeshCommand::Apply { file: file.clone(), prune: *prune })));
        }
        _ => return Ok(None),
    };
    let words = verbs::command_line(verb, verbs::kind(kind)?, &args)?;
    let argv = std::iter::once("dpuctl".to_string()).chain(words);
    match Cli::try_parse_from(argv) {
        Ok(parsed) => Ok(Some(parsed.command)),
        Err(e) => e.exit(),
    }
}

#[derive(Debug, Subcommand)]
enum StorageCommand {
    /// Volumes (block devices the target can export).
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Subsystems (NQNs hosts connect to).
    #[command(subcommand)]
    Subsystem(SubsystemCommand),
    /// Namespaces of a subsystem.
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// NVMe/TCP listeners of a subsystem.
    #[command(subcommand)]
    Listener(ListenerCommand),
    /// I/O counters and latency histograms per volume.
    Stats,
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume: exactly one of --malloc, --file PATH, --null, --encrypted BASE, --spdk-bdev NAME.
    Create {
        id: String,
        #[arg(long, group = "backend")]
        malloc: bool,
        /// A bdev of the agent's SPDK (from its JSON config, or created with --spdk-create).
        #[arg(long, group = "backend", value_name = "NAME")]
        spdk_bdev: Option<String>,
        /// Create the bdev: malloc, aio:PATH or nvme:PCI-ADDRESS (deleted with the volume).
        #[arg(long, value_name = "MODULE", requires = "spdk_bdev")]
        spdk_create: Option<String>,
        #[arg(long, group = "backend", value_name = "PATH")]
        file: Option<String>,
        #[arg(long, group = "backend")]
        null: bool,
        /// AES-256-XTS over the volume BASE (dm-crypt plain aes-xts-plain64 layout); size and block size are
        /// the base's.
        #[arg(long, group = "backend", value_name = "BASE", requires = "encryption_key")]
        encrypted: Option<String>,
        /// The encrypted volume's key (ID or cryptoKeys/ID, an aes-256-xts key).
        #[arg(long, value_name = "KEY", requires = "encrypted")]
        encryption_key: Option<String>,
        /// Bytes per XTS data unit of an encrypted volume: 512 or 4096 (default: the block size).
        #[arg(long, value_name = "BYTES", requires = "encrypted")]
        data_unit: Option<u32>,
        /// Where an encrypted volume's crypto may run: require-hardware, prefer-hardware, software.
        #[arg(long, value_parser = ["require-hardware", "prefer-hardware", "software"], requires = "encrypted")]
        policy: Option<String>,
        /// Capacity, e.g. 256MiB, 10GiB, 4096 (required except for --encrypted).
        #[arg(long, value_parser = parse_size, required_unless_present = "encrypted")]
        size: Option<u64>,
        /// 512 or 4096 (default 512; an encrypted volume's is its base's).
        #[arg(long)]
        block_size: Option<u32>,
    },
    Get {
        id: String,
    },
    List,
    Delete {
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SubsystemCommand {
    Create {
        id: String,
        #[arg(long)]
        nqn: String,
        #[arg(long, default_value = "")]
        serial: String,
        #[arg(long, default_value = "")]
        model: String,
        /// Allow every host.
        #[arg(long)]
        allow_any_host: bool,
        /// Allowed host NQN (repeatable).
        #[arg(long = "host", value_name = "NQN")]
        hosts: Vec<String>,
        /// What serves it: native (the agent's NVMe/TCP target) or spdk (SPDK's NVMe-oF target in the agent).
        #[arg(long, value_parser = ["native", "spdk"], default_value = "native")]
        engine: String,
    },
    Get {
        id: String,
    },
    List,
    Delete {
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NamespaceCommand {
    Create {
        subsystem: String,
        id: String,
        #[arg(long)]
        volume: String,
        /// Namespace id; default: the lowest free one.
        #[arg(long, default_value_t = 0)]
        nsid: u32,
        #[arg(long, default_value = "")]
        uuid: String,
    },
    Get {
        subsystem: String,
        id: String,
    },
    List {
        subsystem: String,
    },
    Delete {
        subsystem: String,
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ListenerCommand {
    Create {
        subsystem: String,
        id: String,
        /// IP:PORT, e.g. 0.0.0.0:4420.
        #[arg(long)]
        address: String,
    },
    Get {
        subsystem: String,
        id: String,
    },
    List {
        subsystem: String,
    },
    Delete {
        subsystem: String,
        id: String,
        #[arg(long)]
        allow_missing: bool,
    },
}

/// Parses sizes like 4096, 64KiB, 256MiB, 10GiB (also K/M/G/T, KB/MB/GB as powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size like 256MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, Subcommand)]
enum SettingsCommand {
    /// Show the settings and whether they are applied.
    Get,
    /// Change settings; only the options given are changed.
    Set {
        /// Log filter directive overriding the config file, e.g. "debug" or "info,dpu_agent=trace".
        #[arg(long, conflicts_with = "clear_log_filter")]
        log_filter: Option<String>,
        /// Return to the config file's log level.
        #[arg(long)]
        clear_log_filter: bool,
        /// Replace all labels with these KEY=VALUE pairs (repeatable; pass --label "" alone to clear).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Option<Vec<String>>,
        /// Apply only if the settings are still at this generation.
        #[arg(long)]
        expected_generation: Option<i64>,
    },
}

/// How often a streaming command pings the agent.
const STREAM_KEEPALIVE: Duration = Duration::from_secs(30);

async fn connect(cli: &Cli) -> anyhow::Result<Channel> {
    let tls = cli.ca.is_some() || cli.addr.starts_with("https://");
    let addr = if tls && cli.addr.starts_with("http://") {
        anyhow::bail!("--addr {} is plaintext but TLS options were given; use https://", cli.addr);
    } else {
        cli.addr.clone()
    };
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .with_context(|| format!("--addr {addr:?} is not a URL like https://127.0.0.1:50051"))?
        .connect_timeout(Duration::from_secs(cli.timeout));
    endpoint = if cli.command.is_streaming() {
        // No deadline for a stream that runs as long as the agent works; HTTP/2 pings notice an agent that is gone.
        endpoint.http2_keep_alive_interval(STREAM_KEEPALIVE).keep_alive_timeout(Duration::from_secs(cli.timeout))
    } else {
        endpoint.timeout(Duration::from_secs(cli.timeout))
    };
    if tls {
        let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut config = ClientTlsConfig::new();
        match &cli.ca {
            Some(ca) => config = config.ca_certificate(Certificate::from_pem(read(ca)?)),
            None => anyhow::bail!("https needs --ca (the CA that signed the agent's certificate)"),
        }
        if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &cli.server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint.tls_config(config).context("TLS configuration")?;
    }
    endpoint.connect().await.with_context(|| format!("connecting to {addr}"))
}

fn timestamp(ts: Option<prost_types::Timestamp>) -> Value {
    ts.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok())
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

fn capability_state(state: i32) -> &'static str {
    match pb::CapabilityState::try_from(state) {
        Ok(pb::CapabilityState::Available) => "available",
        Ok(pb::CapabilityState::Unavailable) => "unavailable",
        Ok(pb::CapabilityState::Loadable) => "loadable",
        _ => "unknown",
    }
}

fn resource_state(status: Option<&pb::ResourceStatus>) -> Value {
    let Some(status) = status else { return Value::Null };
    let state = match pb::ResourceState::try_from(status.state) {
        Ok(pb::ResourceState::Pending) => "pending",
        Ok(pb::ResourceState::Ready) => "ready",
        Ok(pb::ResourceState::Error) => "error",
        _ => "unknown",
    };
    let mut out = json!({ "state": state, "reason": status.reason, "observed_generation": status.observed_generation });
    for (key, time) in [("create_time", status.create_time), ("update_time", status.update_time)] {
        if time.is_some() {
            out[key] = timestamp(time);
        }
    }
    out
}

/// The stable JSON form of `AgentInfo`.
fn info_json(info: pb::AgentInfo) -> Value {
    let uptime = info.uptime.map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
    json!({
        "version": info.version,
        "git_revision": info.git_revision,
        "arch": info.target_arch,
        "target": info.target,
        "kernel": info.kernel_release,
        "hostname": info.hostname,
        "board": info.board.map(|b| json!({
            "source": b.source, "vendor": b.vendor, "model": b.model, "bluefield": b.bluefield, "detail": b.detail,
        })),
        "start_time": timestamp(info.start_time),
        "uptime_seconds": uptime,
        "capabilities": info.capabilities.into_iter().map(|c| json!({
            "name": c.name, "state": capability_state(c.state), "detail": c.detail,
        })).collect::<Vec<_>>(),
    })
}

fn status_json(status: Option<&pb::ResourceStatus>, generation: i64) -> (Value, i64) {
    (resource_state(status), generation)
}

fn volume_json(v: pb::Volume) -> Value {
    let backend = match v.backend {
        Some(pb::volume::Backend::Malloc(_)) => json!({ "malloc": {} }),
        Some(pb::volume::Backend::File(f)) => json!({ "file": { "path": f.path } }),
        Some(pb::volume::Backend::Null(_)) => json!({ "null": {} }),
        Some(pb::volume::Backend::Spdk(b)) => json!({ "spdk": { "bdev": b.bdev, "create": match b.create {
            Some(pb::spdk_backend::Create::Malloc(_)) => json!("malloc"),
            Some(pb::spdk_backend::Create::Aio(a)) => json!(format!("aio:{}", a.path)),
            Some(pb::spdk_backend::Create::Nvme(n)) => json!(format!("nvme:{}", n.traddr)),
            None => Value::Null,
        } } }),
        Some(pb::volume::Backend::Encrypted(e)) => json!({ "encrypted": {
            "base": e.base, "key": e.key, "data_unit_size": e.data_unit_size, "policy": policy_name(e.policy),
        } }),
        None => Value::Null,
    };
    let (status, generation) = status_json(v.status.as_ref(), v.generation);
    let mut out = json!({ "name": v.name, "block_size": v.block_size, "size_bytes": v.size_bytes, "backend": backend,
            "generation": generation, "status": status });
    if let Some(p) = v.crypto {
        out["crypto"] = placement_json(&p);
    }
    out
}

fn placement_json(p: &pb::CryptoPlacement) -> Value {
    json!({ "policy": policy_name(p.policy), "hardware": p.hardware, "engine": p.engine, "reason": p.reason })
}

fn policy_name(value: i32) -> &'static str {
    match pb::CryptoPolicy::try_from(value) {
        Ok(pb::CryptoPolicy::RequireHardware) => "require-hardware",
        Ok(pb::CryptoPolicy::Software) => "software",
        _ => "prefer-hardware",
    }
}

fn policy_value(name: Option<&str>) -> pb::CryptoPolicy {
    match name {
        Some("require-hardware") => pb::CryptoPolicy::RequireHardware,
        Some("software") => pb::CryptoPolicy::Software,
        _ => pb::CryptoPolicy::PreferHardware,
    }
}

fn subsystem_json(s: pb::Subsystem) -> Value {
    let (status, generation) = status_json(s.status.as_ref(), s.generation);
    json!({ "name": s.name, "nqn": s.nqn, "serial": s.serial, "model": s.model, "allow_any_host": s.allow_any_host,
            "allowed_hosts": s.allowed_hosts, "engine": s.engine, "generation": generation, "status": status })
}

/// `--spdk-create`: malloc, aio:PATH or nvme:PCI-ADDRESS.
fn spdk_create_value(text: &str) -> anyhow::Result<pb::spdk_backend::Create> {
    Ok(match text.split_once(':') {
        None if text == "malloc" => pb::spdk_backend::Create::Malloc(pb::SpdkMalloc {}),
        Some(("aio", path)) => pb::spdk_backend::Create::Aio(pb::SpdkAio { path: path.into() }),
        Some(("nvme", traddr)) => pb::spdk_backend::Create::Nvme(pb::SpdkNvme { traddr: traddr.into() }),
        _ => anyhow::bail!("--spdk-create {text:?}: give malloc, aio:PATH or nvme:PCI-ADDRESS"),
    })
}

fn namespace_json(n: pb::Namespace) -> Value {
    let (status, generation) = status_json(n.status.as_ref(), n.generation);
    json!({ "name": n.name, "nsid": n.nsid, "volume": n.volume, "uuid": n.uuid, "generation": generation,
            "status": status })
}

fn listener_json(l: pb::Listener) -> Value {
    let (status, generation) = status_json(l.status.as_ref(), l.generation);
    json!({ "name": l.name, "address": l.address, "generation": generation, "status": status })
}

async fn storage(channel: Channel, command: &StorageCommand) -> anyhow::Result<Value> {
    let mut c = StorageServiceClient::new(channel);
    let sub = |s: &str| format!("subsystems/{s}");
    let deleted = |name: String| json!({ "deleted": name });
    Ok(match command {
        StorageCommand::Volume(VolumeCommand::Create {
            id,
            malloc: _,
            spdk_bdev,
            spdk_create,
            file,
            null,
            encrypted,
            encryption_key,
            data_unit,
            policy,
            size,
            block_size,
        }) => {
            let backend = match (file, null, encrypted) {
                _ if spdk_bdev.is_some() => pb::volume::Backend::Spdk(pb::SpdkBackend {
                    bdev: spdk_bdev.clone().unwrap_or_default(),
                    create: spdk_create.as_deref().map(spdk_create_value).transpose()?,
                }),
                (Some(path), _, _) => pb::volume::Backend::File(pb::FileBackend { path: path.clone() }),
                (None, true, _) => pb::volume::Backend::Null(pb::NullBackend {}),
                (None, false, Some(base)) => pb::volume::Backend::Encrypted(pb::EncryptedBackend {
                    base: format!("volumes/{}", base.strip_prefix("volumes/").unwrap_or(base)),
                    key: format!(
                        "cryptoKeys/{}",
                        encryption_key.as_deref().unwrap_or_default().trim_start_matches("cryptoKeys/")
                    ),
                    data_unit_size: data_unit.unwrap_or(0),
                    policy: policy_value(policy.as_deref()) as i32,
                }),
                (None, false, None) => pb::volume::Backend::Malloc(pb::MallocBackend {}),
            };
            let default_block = if encrypted.is_some() { 0 } else { 512 };
            let volume = pb::Volume {
                block_size: block_size.unwrap_or(default_block),
                size_bytes: size.unwrap_or(0),
                backend: Some(backend),
                ..Default::default()
            };
            volume_json(
                c.create_volume(pb::CreateVolumeRequest { volume_id: id.clone(), volume: Some(volume) })
                    .await?
                    .into_inner(),
            )
        }
        StorageCommand::Volume(VolumeCommand::Get { id }) => {
            volume_json(c.get_volume(pb::GetVolumeRequest { name: format!("volumes/{id}") }).await?.into_inner())
        }
        StorageCommand::Volume(VolumeCommand::List) => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = c.list_volumes(pb::ListVolumesRequest { page_size: 0, page_token }).await?.into_inner();
                all.extend(page.volumes.into_iter().map(volume_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "volumes": all })
        }
        StorageCommand::Volume(VolumeCommand::Delete { id, allow_missing }) => {
            let name = format!("volumes/{id}");
            c.delete_volume(pb::DeleteVolumeRequest { name: name.clone(), allow_missing: *allow_missing }).await?;
            deleted(name)
        }
        StorageCommand::Subsystem(SubsystemCommand::Create {
            id,
            nqn,
            serial,
            model,
            allow_any_host,
            hosts,
            engine,
        }) => {
            let subsystem = pb::Subsystem {
                nqn: nqn.clone(),
                serial: serial.clone(),
                model: model.clone(),
                allow_any_host: *allow_any_host,
                allowed_hosts: hosts.clone(),
                engine: engine.clone(),
                ..Default::default()
            };
            let request = pb::CreateSubsystemRequest { subsystem_id: id.clone(), subsystem: Some(subsystem) };
            subsystem_json(c.create_subsystem(request).await?.into_inner())
        }
        StorageCommand::Subsystem(SubsystemCommand::Get { id }) => {
            subsystem_json(c.get_subsystem(pb::GetSubsystemRequest { name: sub(id) }).await?.into_inner())
        }
        StorageCommand::Subsystem(SubsystemCommand::List) => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page =
                    c.list_subsystems(pb::ListSubsystemsRequest { page_size: 0, page_token }).await?.into_inner();
                all.extend(page.subsystems.into_iter().map(subsystem_json));
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            json!({ "subsystems": all })
        }
        StorageCommand::Subsystem(SubsystemCommand::Delete { id, allow_missing }) => {
            c.delete_subsystem(pb::DeleteSubsystemRequest { name: sub(id), allow_missing: *allow_missing }).await?;
            deleted(sub(id))
        }
        StorageCommand::Namespace(NamespaceCommand::Create { subsystem, id, volume, nsid, uuid }) => {
            let namespace =
                pb::Namespace { nsid: *nsid, volume: volume.clone(), uuid: uuid.clone(), ..Default::default() };
            let request = pb::CreateNamespaceRequest {
                parent: sub(subsystem),
                namespace_id: id.clone(),
                namespace: Some(namespace),
            };
            namespace_json(c.create_namespace(request).await?.into_inner())
        }
        StorageCommand::Namespace(NamespaceCommand::Get { subsystem, id }) => {
            let name = format!("{}/namespaces/{id}", sub(subsystem));
            namespace_json(c.get_namespace(pb::GetNamespaceRequest { name }).await?.into_inner())
        }
        StorageCommand::Namespace(NamespaceCommand::List { subsystem }) => {
            let page =
                c.list_namespaces(pb::ListNamespacesRequest { parent: sub(subsystem), ..Default::default() }).await?;
            json!({ "namespaces": page.into_inner().namespaces.into_iter().map(namespace_json).collect::<Vec<_>>() })
        }
        StorageCommand::Namespace(NamespaceCommand::Delete { subsystem, id, allow_missing }) => {
            let name = format!("{}/namespaces/{id}", sub(subsystem));
            c.delete_namespace(pb::DeleteNamespaceRequest { name: name.clone(), allow_missing: *allow_missing })
                .await?;
            deleted(name)
        }
        StorageCommand::Listener(ListenerCommand::Create { subsystem, id, address }) => {
            let listener = pb::Listener { address: address.clone(), ..Default::default() };
            let request =
                pb::CreateListenerRequest { parent: sub(subsystem), listener_id: id.clone(), listener: Some(listener) };
            listener_json(c.create_listener(request).await?.into_inner())
        }
        StorageCommand::Listener(ListenerCommand::Get { subsystem, id }) => {
            let name = format!("{}/listeners/{id}", sub(subsystem));
            listener_json(c.get_listener(pb::GetListenerRequest { name }).await?.into_inner())
        }
        StorageCommand::Listener(ListenerCommand::List { subsystem }) => {
            let page =
                c.list_listeners(pb::ListListenersRequest { parent: sub(subsystem), ..Default::default() }).await?;
            json!({ "listeners": page.into_inner().listeners.into_iter().map(listener_json).collect::<Vec<_>>() })
        }
        StorageCommand::Listener(ListenerCommand::Delete { subsystem, id, allow_missing }) => {
            let name = format!("{}/listeners/{id}", sub(subsystem));
            c.delete_listener(pb::DeleteListenerRequest { name: name.clone(), allow_missing: *allow_missing }).await?;
            deleted(name)
        }
        StorageCommand::Stats => {
            let stats = c.get_storage_stats(pb::GetStorageStatsRequest {}).await?.into_inner();
            json!({ "volumes": stats.volumes.into_iter().map(|v| json!({
                "volume": v.volume, "reads": v.reads, "writes": v.writes, "read_bytes": v.read_bytes,
                "written_bytes": v.written_bytes, "flushes": v.flushes, "discards": v.discards, "errors": v.errors,
                "latency_p50_us": latency_quantile(&v.latency_us_buckets, 0.5),
                "latency_p99_us": latency_quantile(&v.latency_us_buckets, 0.99),
                "latency_us_buckets": v.latency_us_buckets,
            })).collect::<Vec<_>>() })
        }
    })
}

/// The upper bound in µs of the bucket holding quantile `q` (bucket i: under 2^i µs); `None` without I/O.
fn latency_quantile(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    let rank = (total as f64 * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    (total > 0).then_some(())?;
    buckets
        .iter()
        .position(|&n| {
            seen += n;
            seen >= rank
        })
        .map(|i| 1u64 << i.min(63))
}

fn settings_json(s: pb::AgentSettings) -> Value {
    json!({
        "name": s.name,
        "log_filter": s.log_filter,
        "labels": s.labels.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "generation": s.generation,
        "status": resource_state(s.status.as_ref()),
    })
}

/// A JSON answer as the default table text.
fn table(value: &Value) -> String {
    output::render(value, output::Format::Table)
}

fn parse_labels(labels: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    labels
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').with_context(|| format!("--label {l:?} is not KEY=VALUE"))?;
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Runs the command; a read whose connection closed under it (the agent restarting, or handing over to a new
/// process) or that the agent answered UNAVAILABLE is tried again on a new connection, twice at most.
async fn execute_retrying_reads(cli: &Cli) -> anyhow::Result<Value> {
    let mut delay = std::time::Duration::from_millis(200);
    let mut tries = 0;
    loop {
        match execute(cli).await {
            Err(e) if tries < 2 && cli.command.is_read() && connection_lost(&e) => {
                tries += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            done => return done,
        }
    }
}

/// Whether `e` says the request may not have reached the agent, or the agent asked for a retry.
fn connection_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<tonic::transport::Error>().is_some())
        || e.downcast_ref::<tonic::Status>().is_some_and(|s| {
            s.code() == tonic::Code::Unavailable
                // A status made on this side from a failed connection carries its cause; the agent's do not.
                || (s.code() == tonic::Code::Unknown && std::error::Error::source(s).is_some())
        })
}

async fn execute(cli: &Cli) -> anyhow::Result<Value> {
    let channel = connect(cli).await?;
    match &cli.command {
        Command::Delete { kind, names, allow_missing } => {
            let kind = verbs::kind(kind).map_err(usage)?;
            let mut deleted = Vec::new();
            for name in names {
                let mut args = vec![name.clone()];
                if *allow_missing {
                    args.push("--allow-missing".into());
                }
                let words = verbs::command_line(verbs::Verb::Delete, kind, &args).map_err(usage)?;
                let command = match Cli::try_parse_from(std::iter::once("dpuctl".to_string()).chain(words)) {
                    Ok(parsed) => parsed.command,
                    Err(e) => e.exit(),
                };
                deleted.push(run(cli, channel.clone(), &command).await?);
            }
            return Ok(
                json!({ "deleted": deleted.iter().map(|d| d.get("deleted").cloned().unwrap_or_else(|| d.clone())).collect::<Vec<_>>() }),
            );
        }
        Command::Describe { kind, name } => {
            let kind = verbs::kind(kind).map_err(usage)?;
            let command = resolve(&cli.command).map_err(usage)?.context("describe resolves to get")?;
            let object = run(cli, channel.clone(), &command).await?;
            let events = watch::history(channel, &verbs::feed_name(kind, name)).await?;
            return Ok(json!({ "object": object, "events": events }));
        }
        _ => {}
    }
    let resolved = resolve(&cli.command).map_err(usage)?;
    let command = resolved.as_ref().unwrap_or(&cli.command);
    let value = run(cli, channel.clone(), command).await?;
    if let Command::Get { kind, watch: true, .. } | Command::List { kind, watch: true, .. } = &cli.command {
        let kind = verbs::kind(kind).map_err(usage)?;
        print!("{}", render(cli, command, &value));
        let args = watch::WatchArgs::of_kind(kind.collection);
        watch::watch(channel, || connect(cli), &args, cli.format() == output::Format::Json).await?;
        return Ok(Value::Null);
    }
    Ok(value)
}

/// A command line the agent was never asked about: an unknown kind, a verb the kind does not have.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn usage(message: String) -> anyhow::Error {
    anyhow::Error::new(Usage(message))
}

/// The text of a command's answer in the format asked for.
fn render(cli: &Cli, command: &Command, value: &Value) -> String {
    let format = cli.format();
    match command {
        Command::Watch(_) => String::new(),
        Command::Image(command) if format == output::Format::Table => image::text(command, value),
        _ => output::render(value, format),
    }
}

/// Runs one command of a data path (or of the agent) and returns its answer.
async fn run(cli: &Cli, channel: Channel, command: &Command) -> anyhow::Result<Value> {
    let mut agent = AgentServiceClient::new(channel.clone());
    Ok(match command {
        Command::Info => info_json(agent.get_agent_info(pb::GetAgentInfoRequest {}).await?.into_inner()),
        Command::Health { service } => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let response =
                health.check(tonic_health::pb::HealthCheckRequest { service: service.clone() }).await?.into_inner();
            let status = tonic_health::pb::health_check_response::ServingStatus::try_from(response.status)
                .map_or("UNKNOWN", |s| s.as_str_name());
            json!({ "service": service, "status": status })
        }
        Command::Storage(command) => storage(channel, command).await?,
        Command::Mesh(command) => mesh::mesh(channel, command).await?,
        Command::Fabric(command) => fabric::fabric(channel, command).await?,
        Command::Image(command) => image::image(channel, command).await?,
        Command::Crypto(command) => crypto::crypto(channel, command).await?,
        // Printed by main without the agent; the verbs of the one grammar are resolved by execute.
        Command::Completion { .. }
        | Command::Get { .. }
        | Command::List { .. }
        | Command::Describe { .. }
        | Command::Create { .. }
        | Command::Update { .. }
        | Command::Delete { .. }
        | Command::Apply { .. } => Value::Null,
        Command::Watch(args) => {
            let reconnect = || connect(cli);
            watch::watch(channel, reconnect, args, cli.format() == output::Format::Json).await?;
            Value::Null
        }
        Command::Settings(SettingsCommand::Get) => settings_json(
            agent.get_agent_settings(pb::GetAgentSettingsRequest { name: "settings".into() }).await?.into_inner(),
        ),
        Command::Settings(SettingsCommand::Set { log_filter, clear_log_filter, labels, expected_generation }) => {
            let mut paths = Vec::new();
            let mut settings = pb::AgentSettings { name: "settings".into(), ..Default::default() };
            if let Some(filter) = log_filter {
                settings.log_filter.clone_from(filter);
                paths.push("log_filter".to_owned());
            } else if *clear_log_filter {
                paths.push("log_filter".to_owned());
            }
            if let Some(labels) = labels {
                settings.labels = parse_labels(labels)?;
                paths.push("labels".to_owned());
            }
            if paths.is_empty() {
                anyhow::bail!("nothing to change: give --log-filter, --clear-log-filter or --label");
            }
            let request = pb::UpdateAgentSettingsRequest {
                settings: Some(settings),
                update_mask: Some(prost_types::FieldMask { paths }),
                expected_generation: expected_generation.unwrap_or(0),
            };
            settings_json(agent.update_agent_settings(request).await?.into_inner())
        }
    })
}

impl Cli {
    fn format(&self) -> output::Format {
        if self.json { output::Format::Json } else { self.output }
    }
}

/// `describe` as text: the object's fields, then its recent events as a table.
fn describe_text(value: &Value) -> String {
    use std::fmt::Write as _;
    let mut text = output::render(&value["object"], output::Format::Table);
    text.push_str("\nevents:\n");
    let events = value["events"].as_array().map(Vec::as_slice).unwrap_or_default();
    if events.is_empty() {
        text.push_str("  none kept since the agent started\n");
        return text;
    }
    let cell = |e: &Value, k: &str| {
        e.get(k).map_or_else(String::new, |v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
    };
    let _ = writeln!(text, "  {:<12}  {:<8}  {:>4}  {:<8}  REASON", "TIME", "EVENT", "GEN", "STATE");
    for e in events {
        let line = format!(
            "  {:<12}  {:<8}  {:>4}  {:<8}  {}",
            cell(e, "time"),
            cell(e, "event"),
            cell(e, "generation"),
            cell(e, "state"),
            cell(e, "reason")
        );
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion { shell } = &cli.command {
        let mut command = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut command, "dpuctl", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dpuctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute_retrying_reads(&cli)) {
        Ok(value) => {
            let format = cli.format();
            let text = match &cli.command {
                // Printed as it streamed.
                Command::Watch(_) | Command::Get { watch: true, .. } | Command::List { watch: true, .. } => {
                    String::new()
                }
                Command::Describe { .. } if format == output::Format::Table => describe_text(&value),
                command => match resolve(command) {
                    Ok(Some(resolved)) => render(&cli, &resolved, &value),
                    _ => render(&cli, command, &value),
                },
            };
            // A reader that stops early (`| grep -q`, `| head`) is not an error of the command.
            match std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    eprintln!("dpuctl: writing the output: {e}");
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => {
            let code = match e.downcast_ref::<tonic::Status>() {
                Some(status) => {
                    eprintln!("dpuctl: {:?}: {}", status.code(), status.message());
                    output::exit::of(status.code())
                }
                None if e.downcast_ref::<Usage>().is_some() => {
                    eprintln!("dpuctl: {e}");
                    output::exit::USAGE
                }
                None if e.chain().any(|c| c.downcast_ref::<tonic::transport::Error>().is_some()) => {
                    eprintln!("dpuctl: cannot reach the agent at {}: {e:#}", cli.addr);
                    output::exit::UNAVAILABLE
                }
                None => {
                    eprintln!("dpuctl: {e:#}");
                    output::exit::FAILURE
                }
            };
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser as _};

    use super::{Cli, Command, StorageCommand, VolumeCommand, latency_quantile, parse_size};

    #[test]
    fn encrypted_volumes_parse_beside_the_global_tls_options() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "dpuctl",
            "--key",
            "/k.pem",
            "--cert",
            "/c.pem",
            "storage",
            "volume",
            "create",
            "db",
            "--encrypted",
            "base",
            "--encryption-key",
            "disk",
            "--data-unit",
            "4096",
            "--policy",
            "software",
        ])
        .unwrap();
        let Command::Storage(StorageCommand::Volume(VolumeCommand::Create {
            encrypted,
            encryption_key,
            data_unit,
            policy,
            size,
            ..
        })) = cli.command
        else {
            panic!("not a volume create: {cli:?}");
        };
        assert_eq!((encrypted.as_deref(), encryption_key.as_deref()), (Some("base"), Some("disk")));
        assert_eq!((data_unit, policy.as_deref(), size), (Some(4096), Some("software"), None));
        assert!(Cli::try_parse_from(["dpuctl", "storage", "volume", "create", "x", "--encrypted", "b"]).is_err());
        assert!(Cli::try_parse_from(["dpuctl", "storage", "volume", "create", "x", "--malloc"]).is_err(), "no size");
        let cli = Cli::try_parse_from([
            "dpuctl",
            "crypto",
            "key",
            "create",
            "disk",
            "--algorithm",
            "aes-256-xts",
            "--material-file",
            "/k",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
    }

    #[test]
    fn latency_quantiles_come_from_the_buckets() {
        assert_eq!(latency_quantile(&[0, 0, 0], 0.5), None);
        // 90 I/Os under 8 µs (bucket 3), 10 under 1024 µs (bucket 10).
        let mut buckets = vec![0u64; 12];
        buckets[3] = 90;
        buckets[10] = 10;
        assert_eq!(latency_quantile(&buckets, 0.5), Some(8));
        assert_eq!(latency_quantile(&buckets, 0.99), Some(1024));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("12parsecs").is_err());
    }
}
