//! Wiring of the running agent: intent store, reconcilers, the gRPC API, the admin listener and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use dpu_intent::Store;
use dpu_intent::reconcile::{Controller, ControllerConfig, StatusBoard, Trigger};
use dpu_proto::v1::agent_service_server::AgentServiceServer;
use dpu_proto::v1::crypto_service_server::CryptoServiceServer;
use dpu_proto::v1::fabric_service_server::FabricServiceServer;
use dpu_proto::v1::image_service_server::ImageServiceServer;
use dpu_proto::v1::mesh_service_server::MeshServiceServer;
use dpu_proto::v1::storage_service_server::StorageServiceServer;
use tokio::sync::watch;
use tonic::transport::Certificate;

use crate::api::agent::AgentApi;
use crate::api::auth::AuthLayer;
use crate::api::crypto::CryptoApi;
use crate::api::fabric::FabricApi;
use crate::api::image::ImageApi;
use crate::api::mesh::MeshApi;
use crate::api::storage::StorageApi;
use crate::config::Config;
use crate::logging::LogControl;
use crate::metrics::Metrics;
use crate::settings::SettingsReconciler;

/// Events of the change feed kept for watchers that reconnect (at ~300 bytes each, ~20 MiB at most).
const WATCH_EVENTS_KEPT: usize = 65_536;

/// How often capabilities and ports are re-read without a link event (a module loaded, hugepages reserved).
const MACHINE_RESYNC: Duration = Duration::from_secs(15);

/// Time for the API's connections to send GOAWAY once the server stops, before the watch streams end.
const GOAWAY_GRACE: Duration = Duration::from_millis(100);

/// How this process came to run, for upgrades.
#[derive(Debug, Default)]
pub struct Launch {
    /// The agent process this one takes over from (`--takeover`): its sockets are inherited, and it stops once
    /// this one serves.
    pub predecessor: Option<crate::upgrade::Predecessor>,
    /// The binary this process was started from (its path, which a package upgrade fills with the new binary)
    /// and its arguments: SIGHUP starts it with `--takeover`.
    pub exe: Option<std::path::PathBuf>,
    pub args: Vec<std::ffi::OsString>,
}

/// Runs the agent until SIGTERM or SIGINT (drains and returns) or until a new agent process took over (SIGHUP
/// starts one; see [`crate::upgrade`]).
pub async fn run(config: Config, log: Arc<LogControl>, started_at: Instant, launch: Launch) -> anyhow::Result<()> {
    let started = SystemTime::now() - started_at.elapsed();
    tracing::info!(
        version = crate::VERSION,
        revision = crate::GIT_REVISION,
        target = crate::TARGET,
        config = %serde_json::to_string(&config).unwrap_or_default(),
        "effective configuration"
    );
    if config.plaintext() && !config.api.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.api.listen, "control API is plaintext on a non-loopback address (insecure_plaintext)");
    }

    let mut signals = Signals::install().context("installing the SIGTERM/SIGINT/SIGHUP handlers")?;
    // Under systemd, its file-descriptor store keeps every listening socket, so a restart finds them open.
    if let Some(store) = crate::systemd::FdStore::from_env() {
        dpu_intent::listen::set_keeper(Box::new(store));
    }
    if let Some(interval) = crate::systemd::watchdog_interval() {
        crate::systemd::spawn_watchdog(interval);
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let store = Store::open(&config.data_dir)?;

    let mut proxy = None;
    let metrics = Metrics::with_data_paths(
        started.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        |registry| proxy = Some(dpu_proxy::Proxy::new(registry)),
    );
    let proxy = proxy.expect("registered above");
    let window = Duration::from_micros(config.mesh.poll_window_us);
    let pollers = proxy.start_polling(config.mesh.poll, window).context("starting poll mode")?;
    tracing::info!(pollers, policy = ?config.mesh.poll, window_us = config.mesh.poll_window_us, "poll mode");
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let drift = Duration::from_secs(config.reconcile.drift_seconds);

    // One feed of intent and status changes for WatchEvents.
    let events = dpu_intent::events::Events::new(WATCH_EVENTS_KEPT, store.revision());
    store.attach_events(events.clone());
    let status_board = StatusBoard::with_events(events.clone());
    let controller_config = ControllerConfig { resync_interval: drift, ..ControllerConfig::default() };
    let mut reconcilers = vec![
        Controller::new(
            // Without a stored log_filter the filter stays the one in force at start ([log] level, or RUST_LOG).
            SettingsReconciler::new(log.clone(), log.active()),
            store.clone(),
            status_board.clone(),
            controller_config,
        )
        .spawn(shutdown_rx.clone()),
    ];
    let target = dpu_storage::target::Target::new();
    // One io_uring engine (one ring thread) for file volumes and the image chunk cache.
    let uring = match dpu_storage::bdev::Uring::new() {
        Ok(ring) => Some(ring),
        Err(e) => {
            tracing::warn!(error = %e, "io_uring is unavailable: file volumes and cached image chunks use the blocking thread pool");
            None
        }
    };
    let images = dpu_storage::image::reconcile::Images::default();
    let encrypted_volumes = dpu_storage::bdev::EncryptedVolumes::default();
    // Keys in the intent log are wrapped with the key-encryption key, kept outside the data directory.
    let kek_file = config.crypto.kek_file(&config.data_dir);
    let keys = dpu_crypto::keys::Keys::open(&kek_file)
        .with_context(|| format!("loading the key-encryption key {}", kek_file.display()))?;
    match keys.kek_id() {
        Some(id) => tracing::info!(kek = %kek_file.display(), kek_id = %id, "key-encryption key loaded"),
        None => tracing::info!(kek = %kek_file.display(), "no key-encryption key yet: created with the first key"),
    }
    let storage_reconciler = dpu_storage::reconcile::StorageReconciler::with_images(
        target.clone(),
        config.storage.discovery_listen,
        images.clone(),
    )
    .with_uring(uring.clone())
    .with_keys(keys.clone(), encrypted_volumes.clone());
    // SPDK, when configured: up before the storage reconciler needs it, stopped after everything that uses it.
    #[cfg(feature = "spdk")]
    let spdk = match &config.storage.spdk {
        Some(spdk) => Some(std::sync::Arc::new(
            dpu_storage::spdk::SpdkEngine::start(spdk, &config.data_dir)
                .map_err(|e| anyhow::anyhow!("starting SPDK ([storage.spdk]): {e}"))?,
        )),
        None => None,
    };
    #[cfg(feature = "spdk")]
    let (storage_reconciler, no_spdk) = match &spdk {
        Some(engine) => (storage_reconciler.with_spdk(engine.clone()), None),
        None => (storage_reconciler, Some("SPDK is not configured ([storage.spdk] in the agent's config)".to_owned())),
    };
    #[cfg(not(feature = "spdk"))]
    let no_spdk = {
        if config.storage.spdk.is_some() {
            anyhow::bail!("[storage.spdk] is configured, but this agent was built without SPDK (cargo feature `spdk`)");
        }
        Some("this agent was built without SPDK (cargo feature `spdk`)".to_owned())
    };
    let storage_controller =
        Controller::new(storage_reconciler, store.clone(), status_board.clone(), controller_config);
    let storage_trigger = storage_controller.trigger();
    let storage_retrigger = storage_trigger.clone();
    reconcilers.push(storage_controller.spawn(shutdown_rx.clone()));

    // Images: converted images resolved in their registries; their layers are lazy volumes over one chunk cache.
    let image_paths = &config.images;
    let mut cache_config =
        dpu_storage::image::cache::CacheConfig::new(image_paths.cache_dir(&config.data_dir), image_paths.cache_bytes);
    // Open chunk files are the hot path's handles; they get an eighth of the descriptors, the proxy the rest.
    cache_config.max_open_files =
        usize::try_from(raise_open_files_limit() / 8).unwrap_or(usize::MAX).clamp(256, 65_536);
    cache_config.uring = uring.clone();
    let chunk_cache = dpu_storage::image::cache::ChunkCache::open(cache_config).with_context(|| {
        format!("opening the image chunk cache {}", image_paths.cache_dir(&config.data_dir).display())
    })?;
    let registry_client = Arc::new(registry_client(&config.images)?);
    let fetch_policy = dpu_storage::image::lazy::FetchPolicy {
        deadline: Duration::from_millis(config.images.fetch_deadline_ms),
        ..dpu_storage::image::lazy::FetchPolicy::default()
    };
    let image_reconciler = dpu_storage::image::reconcile::ImageReconciler::new(
        registry_client.clone(),
        chunk_cache.clone(),
        fetch_policy,
        images.clone(),
        storage_trigger,
    )
    .with_background(dpu_storage::image::reconcile::BackgroundPolicy {
        prefetch: config.images.prefetch,
        trace_window: Duration::from_secs(config.images.trace_window_seconds),
        fill_bytes_per_second: config.images.fill_bytes_per_second,
    });
    let image_retry = image_reconciler.retry_trigger();
    let image_controller = Controller::new(image_reconciler, store.clone(), status_board.clone(), controller_config);
    let _ = image_retry.set(image_controller.trigger());
    reconcilers.push(image_controller.spawn(shutdown_rx.clone()));

    // IPsec tunnels: xfrm states and policies, spawned before the fabric (NICs that offload IPsec want them in
    // place before the tc rules that steer into them).
    let ipsec_tunnels = dpu_fabric::ipsec::Tunnels::default();
    reconcilers.push(
        Controller::new(
            dpu_fabric::ipsec::IpsecReconciler::new(keys.clone(), ipsec_tunnels.clone()),
            store.clone(),
            status_board.clone(),
            controller_config,
        )
        .spawn(shutdown_rx.clone()),
    );

    // Fabric: the representor ports over rtnetlink; link events (representors appearing or going) trigger a pass.
    let fabric_switch: Arc<dyn dpu_fabric::switch::Switch> = Arc::new(
        dpu_fabric::switch::NetlinkSwitch::open(dpu_fabric::ports::InventoryConfig {
            mapping: config.fabric.mapping.clone(),
            source: config.fabric.inventory,
            ..dpu_fabric::ports::InventoryConfig::default()
        })
        .context("opening the fabric's netlink sockets")?,
    );
    let fabric_controller = Controller::new(
        dpu_fabric::reconcile::FabricReconciler::new(fabric_switch.clone()),
        store.clone(),
        status_board.clone(),
        controller_config,
    );
    if let Err(e) = dpu_fabric::reconcile::watch_links(fabric_controller.trigger()) {
        tracing::warn!(error = %e, "cannot watch link events: fabric drift is repaired on the periodic resync only");
    }
    reconcilers.push(fabric_controller.spawn(shutdown_rx.clone()));

    // What the machine offers (capabilities, ports), re-read on link events and every MACHINE_RESYNC: changes
    // reach the change feed as status events.
    let machine = Controller::new(
        crate::machine::MachineObserver::new(fabric_switch.clone()),
        store.clone(),
        status_board.clone(),
        ControllerConfig { resync_interval: MACHINE_RESYNC, ..controller_config },
    );
    if let Err(e) = dpu_fabric::reconcile::watch_links(machine.trigger()) {
        tracing::warn!(error = %e, "cannot watch link events: port changes are seen on the periodic pass only");
    }
    reconcilers.push(machine.spawn(shutdown_rx.clone()));

    // Mesh: the shared proxy, configured from intent (MeshService) and optionally from an xDS control plane.
    reconcilers.push(
        Controller::new(
            dpu_proxy::reconcile::MeshReconciler::new(proxy.clone()),
            store.clone(),
            status_board.clone(),
            controller_config,
        )
        .spawn(shutdown_rx.clone()),
    );
    if let Some(xds) = &config.mesh.xds {
        reconcilers.push(spawn_xds(xds, proxy.clone(), shutdown_rx.clone())?);
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dpu_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dpu_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the reflection service")?;
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let agent_api =
        AgentApi::new(store.clone(), status_board.clone(), events.clone(), stopping_rx.clone(), started, started_at);
    let storage_api = StorageApi::new(store.clone(), status_board.clone(), target.stats().clone(), no_spdk);
    let image_api = ImageApi::new(
        store.clone(),
        status_board.clone(),
        images.clone(),
        chunk_cache.clone(),
        registry_client,
        dpu_storage::image::convert::LayerOptions::new(config.images.work_dir(&config.data_dir)),
        storage_api.subsystem_writes(),
    );
    let crypto_api = CryptoApi::new(
        store.clone(),
        keys,
        storage_api.subsystem_writes(),
        status_board.clone(),
        ipsec_tunnels.clone(),
    );
    let mesh_api = MeshApi::new(store.clone(), status_board.clone(), proxy.clone());
    let fabric_api = FabricApi::new(store.clone(), status_board.clone(), fabric_switch);

    // mTLS handshakes run in the API's own accept loop (api::incoming), so a stop finishes those under way.
    let api_tls =
        config.api.tls.as_ref().map(crate::api::incoming::server_config).transpose().context("configuring TLS")?;
    let router = tonic::transport::Server::builder()
        .layer(AuthLayer::new(config.api.plaintext_role, metrics.clone()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentServiceServer::new(agent_api))
        .add_service(StorageServiceServer::new(storage_api))
        .add_service(CryptoServiceServer::new(crypto_api))
        .add_service(ImageServiceServer::new(image_api))
        .add_service(MeshServiceServer::new(mesh_api))
        .add_service(FabricServiceServer::new(fabric_api));

    let listener = bind(config.api.listen).await.context("binding the gRPC API")?;
    let api_addr = listener.local_addr()?;
    // Listed for a hand-over while served; dropped when this process stops serving.
    let mut registrations = vec![dpu_intent::listen::register(&listener).context("listing the API socket")?];
    health_reporter.set_serving::<AgentServiceServer<AgentApi>>().await;

    let ready = Arc::new(AtomicBool::new(false));
    let admin = if config.admin.enabled {
        let listener = bind(config.admin.listen).await.context("binding the admin listener")?;
        registrations.push(dpu_intent::listen::register(&listener).context("listing the admin socket")?);
        let board = status_board.clone();
        let scrape_metrics = metrics.clone();
        let storage_stats = target.stats().clone();
        let (scrape_images, scrape_cache) = (images.clone(), chunk_cache.clone());
        let scrape_encrypted = encrypted_volumes.clone();
        let scrape_tunnels = ipsec_tunnels.clone();
        let dump_proxy = proxy.clone();
        let state = crate::admin::AdminState {
            metrics: metrics.clone(),
            ready: ready.clone(),
            before_scrape: Arc::new(move || {
                for subsystem in board.subsystems() {
                    let c = board.counters(subsystem);
                    scrape_metrics.reconcile_totals(subsystem, c.passes, c.changes, c.errors);
                }
                for (volume, stats) in storage_stats.snapshot() {
                    scrape_metrics.storage_volume(&volume, &stats);
                }
                scrape_metrics.crypto_volumes(&scrape_encrypted);
                scrape_metrics.ipsec_tunnels(&scrape_tunnels);
                scrape_metrics.image_cache(&scrape_cache);
                for (id, image) in scrape_images.all() {
                    scrape_metrics.image_fetches(&id, &image.layers);
                }
            }),
            config_dump: Arc::new(move || dump_proxy.config_dump()),
        };
        tracing::info!(addr = %listener.local_addr()?, "admin listener (metrics, healthz, readyz)");
        Some(tokio::spawn(crate::admin::serve(listener, state, stopping_rx.clone())))
    } else {
        None
    };

    // Stopping the accept loop ends the incoming stream once the handshakes under way are done, and the end of the
    // stream starts the server's graceful drain.
    let (drain_tx, drain_rx) = watch::channel(false);
    let serve = match api_tls {
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(
            crate::api::incoming::tls(listener, tls, drain_rx),
            std::future::pending::<()>(),
        )),
        None => tokio::spawn(
            router
                .serve_with_incoming_shutdown(crate::api::incoming::plain(listener, drain_rx), std::future::pending()),
        ),
    };
    ready.store(true, Ordering::Release);
    tracing::info!(
        addr = %api_addr,
        tls = !config.plaintext(),
        startup_ms = started_at.elapsed().as_secs_f64() * 1000.0,
        "serving the control API"
    );

    if let Some(predecessor) = launch.predecessor {
        let subsystems = [
            crate::settings::SETTINGS_SUBSYSTEM,
            crate::api::storage::STORAGE_SUBSYSTEM,
            "images",
            dpu_fabric::ipsec::SUBSYSTEM,
            dpu_fabric::reconcile::SUBSYSTEM,
            dpu_proxy::reconcile::SUBSYSTEM,
        ];
        let served = first_passes(&status_board, &subsystems, &storage_retrigger, crate::upgrade::READY_TIMEOUT).await;
        if !served {
            tracing::warn!("not every data path finished its first pass in time: taking over regardless");
        }
        predecessor.ready().context("telling the previous agent process that this one serves")?;
        tracing::info!(
            predecessor = predecessor.pid,
            sockets = predecessor.sockets.len(),
            takeover_ms = started_at.elapsed().as_secs_f64() * 1000.0,
            "took over from the previous agent process"
        );
        drop(predecessor);
    } else {
        crate::systemd::notify("READY=1\nSTATUS=serving");
    }
    for addr in dpu_intent::listen::close_unclaimed() {
        tracing::info!(%addr, "inherited socket closed: the configuration no longer listens there");
    }
    let handover_path = crate::upgrade::socket_path(&config.data_dir);
    let mut handover = match crate::upgrade::Server::bind(&handover_path) {
        Ok(server) => Some(server),
        Err(e) => {
            tracing::warn!(path = %handover_path.display(), error = %e, "no hand-over socket: upgrades will interrupt service");
            None
        }
    };

    let stop = loop {
        tokio::select! {
            signal = signals.recv() => match signal {
                Signal::Hangup => {
                    crate::systemd::notify(&format!(
                        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=starting the new agent process",
                        crate::systemd::monotonic_usec()
                    ));
                    match (&launch.exe, handover.is_some()) {
                        (Some(exe), true) => match crate::upgrade::spawn_successor(exe, &launch.args) {
                            Ok(pid) => tracing::info!(pid, exe = %exe.display(), "SIGHUP: started the new agent process"),
                            Err(e) => {
                                tracing::error!(exe = %exe.display(), error = %e, "SIGHUP: cannot start the new agent process");
                                crate::systemd::notify(&format!("READY=1\nSTATUS=upgrade failed: {e}"));
                            }
                        },
                        _ => {
                            tracing::error!("SIGHUP: no binary path or hand-over socket: cannot hand over");
                            crate::systemd::notify("READY=1\nSTATUS=upgrade failed: no hand-over socket");
                        }
                    }
                }
                other => break Stop::Signal(other.name()),
            },
            Some(request) = next_request(handover.as_mut()) => {
                tracing::info!(pid = request.pid, version = %request.version, "a new agent process takes over");
                match request.hand_over(store.clone()).await {
                    Ok(pid) => break Stop::HandedOver(pid),
                    Err(reason) => {
                        tracing::error!(%reason, "hand-over failed: serving on");
                        crate::systemd::notify(&format!("READY=1\nSTATUS=upgrade failed: {reason}"));
                    }
                }
            }
        }
    };
    let drain = Duration::from_secs(config.api.drain_seconds);
    match stop {
        Stop::Signal(signal) => {
            tracing::info!(signal, "shutting down: refusing new requests, draining in-flight ones");
            crate::systemd::notify("STOPPING=1");
        }
        Stop::HandedOver(pid) => {
            tracing::info!(pid, "the new agent process serves: this one stops accepting and drains");
            crate::systemd::notify(&format!("MAINPID={pid}\nREADY=1\nSTATUS=handed over to process {pid}"));
        }
    }
    ready.store(false, Ordering::Release);
    health_reporter.set_not_serving::<AgentServiceServer<AgentApi>>().await;
    // The sockets stay with the service manager's store for the process after this one.
    dpu_intent::listen::keep_on_exit();
    drop(registrations);
    // The API stops taking connections and tells its clients (GOAWAY) before the watch streams end with a
    // bookmark: a client that resumes at once then opens a new connection, which the new process accepts, instead
    // of a new stream on this one. The admin listener stops with the streams.
    let _ = drain_tx.send(true);
    tokio::time::sleep(GOAWAY_GRACE).await;
    let _ = stopping_tx.send(true);
    let api = async {
        match tokio::time::timeout(drain, serve).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "gRPC server ended with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "gRPC server task failed"),
            Err(_) => tracing::warn!(seconds = drain.as_secs(), "in-flight requests did not finish in time"),
        }
    };
    // Each host's NVMe/TCP connection closes once its running commands completed; the host reconnects to the
    // process serving the socket next: the new one after a hand-over, the restarted one after a restart (the
    // socket waits in the service manager's store meanwhile).
    tokio::join!(api, proxy.shutdown(drain), target.stop_serving(drain));
    let _ = shutdown_tx.send(true);
    for reconciler in reconcilers {
        if let Err(e) = reconciler.await {
            tracing::error!(error = %e, "reconciler task failed");
        }
    }
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    // SPDK's target disconnects its hosts as it stops; they reconnect to whichever process serves next.
    #[cfg(feature = "spdk")]
    if let Some(engine) = spdk {
        let _ = tokio::task::spawn_blocking(move || engine.stop()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs the xDS client: every accepted update becomes the proxy's `xds` source.
/// Raises the soft limit of open files to the hard limit (connections of the proxy and the target, chunk files
/// of the image cache) and returns the limit in force.
fn raise_open_files_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "could not raise the open files limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// The registry client of the image data path, from `[images]`.
fn registry_client(
    images: &crate::config::ImagesConfig,
) -> anyhow::Result<dpu_storage::image::registry::RegistryClient> {
    let ca_pem = match &images.ca_file {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("reading images.ca_file {}", path.display()))?),
        None => None,
    };
    let config = dpu_storage::image::registry::RegistryConfig {
        ca_pem,
        plain_http_hosts: images.plain_http_hosts.clone(),
        ..dpu_storage::image::registry::RegistryConfig::default()
    };
    dpu_storage::image::registry::RegistryClient::new(config).context("setting up the registry client")
}

fn spawn_xds(
    xds: &crate::config::XdsConfig,
    proxy: dpu_proxy::Proxy,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut tls = None;
    if xds.server.starts_with("https://") {
        let ca = xds.ca.as_ref().context("mesh.xds.ca: required for an https server")?;
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        tls = Some(tonic::transport::ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)));
    }
    let config = dpu_proxy::xds::XdsConfig {
        server: xds.server.parse().context("mesh.xds.server")?,
        node_id: xds.node_id.clone(),
        node_cluster: xds.node_cluster.clone(),
        tls,
    };
    tracing::info!(server = %xds.server, node = %xds.node_id, "mesh configuration also comes from xDS");
    Ok(tokio::spawn(async move {
        let apply = |specs| {
            let proxy = proxy.clone();
            async move {
                let report = proxy.apply("xds", specs).await;
                match report.errors.as_slice() {
                    [] => Ok(()),
                    errors => Err(errors
                        .iter()
                        .map(|e| format!("{}/{}: {}: {}", e.kind, e.id, e.field, e.message))
                        .collect::<Vec<_>>()
                        .join("; ")),
                }
            }
        };
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(e) = dpu_proxy::xds::run(config, apply, stop).await {
            tracing::error!(error = %e, "xDS client stopped");
        }
    }))
}

/// Binds `addr`, or takes the socket the previous agent process served on there. A socket kept for another
/// address on the same port is released by `take`; until the service manager closed its copy the bind answers
/// EADDRINUSE, so it is retried for a few seconds.
async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{addr}: {e}"));
    if let Some(listener) = dpu_intent::listen::take(addr) {
        listener.set_nonblocking(true).map_err(named)?;
        return tokio::net::TcpListener::from_std(listener).map_err(named);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            bound => return bound.map_err(named),
        }
    }
}

/// Waits until every one of `subsystems` finished a pass, then for one more storage pass (image layers resolved
/// in the images' first pass are served from the next storage pass). `false` when `limit` passed first.
async fn first_passes(board: &StatusBoard, subsystems: &[&str], storage: &Trigger, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !subsystems.iter().all(|s| board.counters(s).passes > 0) {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let storage_name = crate::api::storage::STORAGE_SUBSYSTEM;
    let before = board.counters(storage_name).passes;
    storage.fire("a new agent process takes over");
    while board.counters(storage_name).passes <= before {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

async fn next_request(server: Option<&mut crate::upgrade::Server>) -> Option<crate::upgrade::Request> {
    match server {
        Some(server) => server.next().await,
        None => std::future::pending().await,
    }
}

/// Why the agent stops.
enum Stop {
    Signal(&'static str),
    /// A new agent process (this pid) serves.
    HandedOver(u32),
}

/// SIGTERM, SIGINT and SIGHUP handlers. Installed before the agent announces that it serves, so a stop request
/// that arrives right after start-up is a graceful stop rather than the default (immediate) termination.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[derive(Debug, Clone, Copy)]
enum Signal {
    Terminate,
    Interrupt,
    /// Start the binary at this process's path and hand over to it.
    Hangup,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Hangup => "SIGHUP",
        }
    }
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}
