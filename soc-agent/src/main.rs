//! `dpu-agent` binary: parse arguments and config, then run the agent or a helper command.
//!
//! Exit codes: 0 clean stop, 1 runtime failure (including a refused intent store), 2 bad arguments or config.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use dpu_agent::config::{Config, DEFAULT_CONFIG_PATH, LogFormat};
use dpu_agent::logging::LogControl;
use dpu_proxy::poll::Policy;

#[derive(Debug, Parser)]
#[command(name = "dpu-agent", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("DPU_AGENT_GIT_REVISION"), ")"))]
#[command(about = "DPU agent: shared mesh proxy, NVMe-oF target, representor forwarding and crypto offload")]
struct Cli {
    /// Configuration file. Default: /etc/dpu-agent/config.toml when it exists, else the built-in loopback default.
    #[arg(long, short, env = "DPU_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Override `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override `api.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `admin.listen`.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Allow a plaintext API on a non-loopback address (logged as a warning).
    #[arg(long)]
    insecure_plaintext: bool,
    /// Override `mesh.poll`: off, in_flight or always.
    #[arg(long, value_parser = parse_poll)]
    poll: Option<Policy>,
    /// Override `mesh.poll_window_us`.
    #[arg(long)]
    poll_window_us: Option<u64>,
    /// Override `log.format`.
    #[arg(long, value_parser = parse_format)]
    log_format: Option<LogFormat>,
    /// Take over from the agent running on the same data directory without interrupting service: its listening
    /// sockets and intent store pass to this process, which serves before the old one drains and exits. Starts
    /// normally when no agent runs there. The running agent does this itself on SIGHUP (`systemctl reload`).
    #[arg(long, env = "DPU_AGENT_TAKEOVER", value_parser = clap::builder::FalseyValueParser::new())]
    takeover: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration and print the effective values as JSON.
    CheckConfig,
    /// Generate a development PKI: CA, server certificate and operator/viewer client certificates.
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// DNS names or IP addresses for the server certificate (repeatable).
        #[arg(long = "san", default_values = ["localhost", "127.0.0.1", "::1"])]
        sans: Vec<String>,
    },
}

fn parse_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "pretty" => Ok(LogFormat::Pretty),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("{s:?} is not a log format (pretty, json)")),
    }
}

fn parse_poll(s: &str) -> Result<Policy, String> {
    match s {
        "off" => Ok(Policy::Off),
        "in_flight" => Ok(Policy::InFlight),
        "always" => Ok(Policy::Always),
        _ => Err(format!("{s:?} is not a poll mode (off, in_flight, always)")),
    }
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    let default_path = Path::new(DEFAULT_CONFIG_PATH);
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None if default_path.exists() => Config::load(default_path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(dir) = &cli.data_dir {
        config.data_dir.clone_from(dir);
    }
    if let Some(listen) = cli.listen {
        config.api.listen = listen;
    }
    if let Some(policy) = cli.poll {
        config.mesh.poll = policy;
    }
    if let Some(us) = cli.poll_window_us {
        config.mesh.poll_window_us = us;
    }
    if let Some(listen) = cli.admin_listen {
        config.admin.listen = listen;
    }
    if cli.insecure_plaintext {
        config.api.insecure_plaintext = true;
    }
    if let Some(format) = cli.log_format {
        config.log.format = format;
    }
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn main() -> ExitCode {
    let started_at = Instant::now();
    // Listening sockets systemd's file-descriptor store kept across a restart, before anything opens a descriptor.
    let stored = dpu_agent::systemd::listen_fds();
    // Where this process was started from, before a package upgrade puts another binary there: SIGHUP starts that.
    let exe = std::env::current_exe().ok();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let cli = Cli::parse();

    if let Some(Command::Certs { out, sans }) = &cli.command {
        return match dpu_agent::pki::DevPki::generate(sans)
            .map_err(|e| e.to_string())
            .and_then(|pki| pki.write(out).map_err(|e| format!("writing {}: {e}", out.display())))
        {
            Ok(()) => {
                eprintln!("wrote development PKI to {} (server names: {})", out.display(), sans.join(", "));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dpu-agent: generating certificates: {e}");
                ExitCode::FAILURE
            }
        };
    }

    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dpu-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::CheckConfig) = cli.command {
        #[allow(clippy::print_stdout)] // The command's output is the effective configuration.
        match serde_json::to_string_pretty(&config) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("dpu-agent: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }

    let log = match LogControl::init(config.log.format, &config.log.level) {
        Ok(log) => Arc::new(log),
        Err(e) => {
            eprintln!("dpu-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if !stored.is_empty() {
        let (kept, refused) = dpu_intent::listen::inherit(stored);
        tracing::info!(sockets = ?kept, "listening sockets kept by the service manager across the restart");
        for r in refused {
            tracing::warn!(reason = %r, "a descriptor from the service manager dropped");
        }
    }
    let mut launch = dpu_agent::agent::Launch { predecessor: None, exe, args };
    if cli.takeover {
        let path = dpu_agent::upgrade::socket_path(&config.data_dir);
        match dpu_agent::upgrade::take_over(&path) {
            Ok(Some(predecessor)) => {
                tracing::info!(
                    predecessor = predecessor.pid,
                    sockets = predecessor.sockets.len(),
                    "the running agent handed its sockets and intent store over"
                );
                launch.predecessor = Some(predecessor);
            }
            Ok(None) => tracing::info!(path = %path.display(), "no running agent to take over from: starting"),
            Err(e) => {
                tracing::error!(error = %e, "taking over from the running agent failed");
                eprintln!("dpu-agent: taking over from the running agent: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("dpu-agent").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dpu-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dpu_agent::agent::run(config, log, started_at, launch)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            eprintln!("dpu-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
