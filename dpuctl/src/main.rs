//! `dpuctl`: drive a dpu-agent from the host.
//!
//! Exit codes: 0 success, 1 the agent answered with an error or could not be reached, 2 bad arguments.

#![allow(clippy::print_stdout)] // Printing results is this program's job.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dpu_proto::v1 as pb;
use dpu_proto::v1::agent_service_client::AgentServiceClient;
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Parser)]
#[command(name = "dpuctl", version, about = "Control a dpu-agent from the host")]
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
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

async fn connect(cli: &Cli) -> anyhow::Result<Channel> {
    let tls = cli.ca.is_some() || cli.addr.starts_with("https://");
    let addr = if tls && cli.addr.starts_with("http://") {
        anyhow::bail!("--addr {} is plaintext but TLS options were given; use https://", cli.addr);
    } else {
        cli.addr.clone()
    };
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .with_context(|| format!("--addr {addr:?} is not a URL like https://127.0.0.1:50051"))?
        .connect_timeout(Duration::from_secs(cli.timeout))
        .timeout(Duration::from_secs(cli.timeout));
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
    json!({ "state": state, "reason": status.reason, "observed_generation": status.observed_generation })
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

fn settings_json(s: pb::AgentSettings) -> Value {
    json!({
        "name": s.name,
        "log_filter": s.log_filter,
        "labels": s.labels.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "generation": s.generation,
        "status": resource_state(s.status.as_ref()),
    })
}

/// A JSON value as table text: strings without quotes.
fn plain(value: &Value) -> String {
    value.as_str().map_or_else(|| value.to_string(), str::to_owned)
}

/// Prints a JSON object as aligned `key  value` lines; nested arrays of objects become indented rows.
fn print_table(value: &Value) {
    let Value::Object(map) = value else {
        println!("{value}");
        return;
    };
    let width = map.keys().map(String::len).max().unwrap_or(0);
    for (key, v) in map {
        match v {
            Value::Array(rows) if rows.iter().all(Value::is_object) => {
                println!("{key}:");
                let cell = |row: &Value, k: &str| row.get(k).map_or_else(String::new, plain);
                for row in rows {
                    let rest: Vec<String> = row
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| !matches!(k.as_str(), "name" | "state"))
                        .map(|(_, c)| plain(c))
                        .collect();
                    println!("  {:<12} {:<12} {}", cell(row, "name"), cell(row, "state"), rest.join(" "));
                }
            }
            Value::Object(inner) => {
                let text: Vec<String> = inner.iter().map(|(k, c)| format!("{k}={}", plain(c))).collect();
                println!("{key:<width$}  {}", text.join(" "));
            }
            Value::String(s) => println!("{key:<width$}  {s}"),
            Value::Null => println!("{key:<width$}  -"),
            other => println!("{key:<width$}  {other}"),
        }
    }
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

async fn execute(cli: &Cli) -> anyhow::Result<Value> {
    let channel = connect(cli).await?;
    let mut agent = AgentServiceClient::new(channel.clone());
    Ok(match &cli.command {
        Command::Info => info_json(agent.get_agent_info(pb::GetAgentInfoRequest {}).await?.into_inner()),
        Command::Health { service } => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let response =
                health.check(tonic_health::pb::HealthCheckRequest { service: service.clone() }).await?.into_inner();
            let status = tonic_health::pb::health_check_response::ServingStatus::try_from(response.status)
                .map_or("UNKNOWN", |s| s.as_str_name());
            json!({ "service": service, "status": status })
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dpuctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(&cli)) {
        Ok(value) => {
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
            } else {
                print_table(&value);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("dpuctl: {:?}: {}", status.code(), status.message()),
                None => eprintln!("dpuctl: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
