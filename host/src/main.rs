//! `dpu-snapshotter`: containerd's snapshots service on a unix socket, for use as a proxy plugin.
//!
//! Exit codes: 0 clean stop (SIGTERM, SIGINT), 1 runtime failure, 2 bad arguments or configuration.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use dpu_host::config::Config;
use dpu_host::dpu::DpuLayers;
use dpu_host::server;
use dpu_host::snapshot::{NoRemoteLayers, RemoteLayerSource, Snapshotter};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// How long a stop waits for open requests and connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often remounting the recorded remote layers is retried at start while it fails.
const SYNC_RETRY: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(name = "dpu-snapshotter", version)]
#[command(about = "containerd snapshotter (proxy plugin): overlayfs snapshots served over gRPC on a unix socket")]
struct Cli {
    /// Configuration file (TOML: `socket`, `root`, `[dpu]`). Without it, the defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override `socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Override `root`.
    #[arg(long)]
    root: Option<PathBuf>,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(socket) = &cli.socket {
        config.socket.clone_from(socket);
    }
    if let Some(root) = &cli.root {
        config.root.clone_from(root);
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dpu-snapshotter: {e:#}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("dpu-snapshotter").build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dpu-snapshotter: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "dpu-snapshotter failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        socket = %config.socket.display(),
        root = %config.root.display(),
        version = env!("CARGO_PKG_VERSION"),
        "dpu-snapshotter starting"
    );
    let (remote, remote_name): (Arc<dyn RemoteLayerSource>, String) = match &config.dpu {
        Some(dpu) => {
            let source = DpuLayers::new(dpu.clone(), &config.root).context("the [dpu] configuration")?;
            (Arc::new(source), format!("dpu {} {}", dpu.api, dpu.subsystem_name()))
        }
        None => (Arc::new(NoRemoteLayers), "none".to_owned()),
    };
    let root = config.root.clone();
    let snapshotter = tokio::task::spawn_blocking(move || Snapshotter::open(root, remote))
        .await
        .context("opening the snapshot root")?
        .with_context(|| format!("opening {}", config.root.display()))?;
    tracing::info!(snapshots = snapshotter.len()?, remote_layers = %remote_name, "snapshots loaded");
    if config.dpu.is_some() {
        // Layers recorded before a reboot or restart are mounted again; containerd's requests need not wait.
        let snapshotter = snapshotter.clone();
        tokio::spawn(async move {
            loop {
                match snapshotter.sync_remote().await {
                    Ok(()) => break,
                    Err(e) => tracing::warn!(error = %e, retry_seconds = SYNC_RETRY.as_secs(), "remote layers"),
                }
                tokio::time::sleep(SYNC_RETRY).await;
            }
        });
    }

    let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let listener = server::bind(&config.socket).with_context(|| format!("listening on {}", config.socket.display()))?;
    tracing::info!(socket = %config.socket.display(), "serving containerd.services.snapshots.v1.Snapshots");

    // Graceful stop: no new connections, requests in flight finish; a client that keeps its connection
    // open past the grace period does not hold the process.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(server::serve(listener, snapshotter, async {
        let _ = stopped.await;
    }));
    let served = tokio::select! {
        served = &mut server => Some(served),
        _ = terminate.recv() => { tracing::info!(signal = "SIGTERM", "stopping"); None }
        _ = interrupt.recv() => { tracing::info!(signal = "SIGINT", "stopping"); None }
    };
    let served = match served {
        Some(served) => served,
        None => {
            let _ = stop.send(());
            match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
                Ok(served) => served,
                Err(_) => {
                    tracing::warn!(grace_seconds = SHUTDOWN_GRACE.as_secs(), "connections still open; exiting");
                    Ok(Ok(()))
                }
            }
        }
    };
    if let Err(e) = std::fs::remove_file(&config.socket) {
        tracing::warn!(socket = %config.socket.display(), error = %e, "removing the socket");
    }
    served.context("the server task failed")?.context("serving")?;
    tracing::info!("stopped");
    Ok(())
}
