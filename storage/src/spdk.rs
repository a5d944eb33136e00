//! SPDK in the storage data path (cargo feature `spdk`): SPDK bdevs as volumes, the agent's volumes as SPDK bdevs,
//! and SPDK's NVMe-oF target as a second engine for subsystems, reconciled from the same intent.
//!
//! - [`SpdkVolume`]: a [`Volume`] over an SPDK bdev (malloc, aio, user-space NVMe, or one from SPDK's JSON config),
//!   I/O through a descriptor on SPDK's application thread with DMA-able buffers.
//! - [`VolumeBdev`]: any of our volumes (file, lazy image layer, encrypted …) as a bdev of the Rust module `dpu`;
//!   its I/O runs on tokio and completes on the SPDK thread that submitted it.
//! - [`SpdkEngine::apply`]: subsystems with `engine = "spdk"`: transport, target listeners, subsystems with their
//!   hosts, namespaces (bdevs) and listeners, changed while paused, as SPDK requires.
//!
//! Bdevs of SPDK's own modules are created and deleted through SPDK's JSON-RPC server, on a Unix socket in the
//! data directory (SPDK does not export those modules' functions): the same methods an operator's `rpc.py` uses.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpu_spdk::bdev::{self, BdevIo, BlockDevice, Desc, DescOp, DmaBuf, IoType, Registered};
use dpu_spdk::nvmf::{Subsystem, Target, Transition};
use dpu_spdk::{Completion, Options, Spdk};

use crate::bdev::{BufResult, Geometry, IoFuture, IoKind, SharedVolume, Volume, VolumeError, VolumeStats};
use crate::model::{SpdkBdevSpec, SpdkConfig, SpdkCreate, VolumeSpec};

/// The SPDK runtime of the agent and what the storage reconciler made of it.
#[derive(Debug)]
pub struct SpdkEngine {
    spdk: Spdk,
    rpc_socket: PathBuf,
    runtime: tokio::runtime::Handle,
    state: tokio::sync::Mutex<State>,
    /// SPDK's own bdevs that SPDK's target serves, with the counters of their volumes ([`sample_iostat`]).
    sampled: Sampled,
    sampler: tokio::task::JoinHandle<()>,
}

impl Drop for SpdkEngine {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

/// Bdev name → the counters of the volume it is.
type Sampled = Arc<std::sync::Mutex<Vec<(String, Arc<VolumeStats>)>>>;

/// How often the counters of SPDK's own bdevs are read from SPDK.
const IOSTAT_EVERY: Duration = Duration::from_secs(1);

/// What the engine has applied to SPDK.
#[derive(Debug, Default)]
struct State {
    transport: bool,
    listening: BTreeSet<SocketAddr>,
    /// Our volumes registered as bdevs: volume id → (the volume, its bdev).
    exported: HashMap<String, (SharedVolume, Registered)>,
    subsystems: BTreeMap<String, SpdkSubsystem>,
    next_bdev: u64,
}

/// A subsystem as the SPDK engine serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpdkSubsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub hosts: BTreeSet<String>,
    /// nsid → (bdev name, UUID).
    pub namespaces: BTreeMap<u32, (String, [u8; 16])>,
    pub listeners: BTreeSet<SocketAddr>,
}

/// A namespace to serve: an SPDK bdev volume directly, any other volume through the Rust bdev module.
#[derive(Debug, Clone)]
pub struct SpdkNamespace {
    pub nsid: u32,
    pub volume_id: String,
    pub volume: SharedVolume,
    pub uuid: [u8; 16],
    pub stats: Arc<VolumeStats>,
}

/// A subsystem of the intent for the SPDK engine.
#[derive(Debug, Clone)]
pub struct WantedSubsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub hosts: BTreeSet<String>,
    pub namespaces: Vec<SpdkNamespace>,
    pub listeners: BTreeSet<SocketAddr>,
}

/// Outcome of one pass, per subsystem NQN: `Ok(changed)` or why it failed.
pub type Applied = BTreeMap<String, Result<bool, String>>;

fn spdk_error(e: dpu_spdk::Error) -> String {
    e.to_string()
}

impl SpdkEngine {
    /// Starts SPDK as `config` says, its JSON-RPC server at `<data_dir>/spdk.sock`.
    pub fn start(config: &SpdkConfig, data_dir: &Path) -> Result<SpdkEngine, String> {
        let rpc_socket = data_dir.join("spdk.sock");
        let _ = std::fs::remove_file(&rpc_socket);
        let options = Options {
            name: "dpu-agent".into(),
            cores: config.cores.clone(),
            mem_size_mib: config.mem_size_mib,
            no_huge: !config.hugepages,
            no_pci: !config.pci,
            json_config: config.json_config.clone(),
            rpc_socket: Some(rpc_socket.clone()),
        };
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| format!("no tokio runtime: {e}"))?;
        let spdk = Spdk::start(&options).map_err(spdk_error)?;
        let sampled = Sampled::default();
        let sampler = runtime.spawn(sample_iostat(rpc_socket.clone(), sampled.clone()));
        Ok(SpdkEngine { spdk, rpc_socket, runtime, state: tokio::sync::Mutex::new(State::default()), sampled, sampler })
    }

    pub fn spdk(&self) -> &Spdk {
        &self.spdk
    }

    /// Stops SPDK: hosts of its subsystems are disconnected, bdevs closed.
    pub fn stop(&self) {
        self.sampler.abort();
        self.spdk.stop();
    }

    /// Calls an SPDK JSON-RPC method (blocking, bounded by a timeout).
    pub fn rpc(&self, method: &str, params: serde_json::Value) -> Result<serde_json::Value, String> {
        rpc(&self.rpc_socket, method, params)
    }

    /// Opens (creating it first when the spec says how) the SPDK bdev of a volume.
    pub fn open_volume(&self, spec: &VolumeSpec, bdev: &SpdkBdevSpec) -> Result<SharedVolume, String> {
        let created = match &bdev.create {
            None => None,
            Some(create) => {
                let (method, params, delete) = match create {
                    SpdkCreate::Malloc => (
                        "bdev_malloc_create",
                        serde_json::json!({"name": bdev.bdev, "num_blocks": spec.blocks(), "block_size": spec.block_size}),
                        "bdev_malloc_delete",
                    ),
                    SpdkCreate::Aio { path } => (
                        "bdev_aio_create",
                        serde_json::json!({"name": bdev.bdev, "filename": path, "block_size": spec.block_size}),
                        "bdev_aio_delete",
                    ),
                    SpdkCreate::Nvme { traddr } => (
                        "bdev_nvme_attach_controller",
                        serde_json::json!({"name": bdev.bdev, "trtype": "PCIe", "traddr": traddr}),
                        "bdev_nvme_detach_controller",
                    ),
                };
                self.rpc(method, params).map_err(|e| format!("SPDK {method}: {e}"))?;
                Some((delete, bdev.bdev.clone()))
            }
        };
        let name = bdev.bdev_name();
        let opened = {
            let name = name.clone();
            self.spdk.run_blocking(move |on| Desc::open(on, &name, true)).map_err(spdk_error)
        };
        let fail = |reason: String| {
            if let Some((delete, bdev)) = &created {
                let _ = self.rpc(delete, serde_json::json!({ "name": bdev }));
            }
            Err(reason)
        };
        let desc = match opened {
            Ok(Ok(desc)) => desc,
            Ok(Err(e)) => return fail(format!("bdev {name}: {e}")),
            Err(e) => return fail(e),
        };
        let geometry = Geometry { block_size: spec.block_size, blocks: spec.blocks() };
        if desc.block_size() != spec.block_size || desc.num_blocks() < spec.blocks() {
            let reason = format!(
                "bdev {name} has {} blocks of {} bytes; the volume needs {} of {}",
                desc.num_blocks(),
                desc.block_size(),
                spec.blocks(),
                spec.block_size
            );
            let _ = self.spdk.run_blocking(move |on| desc.close(on));
            return fail(reason);
        }
        Ok(Arc::new(SpdkVolume {
            spdk: self.spdk.clone(),
            desc: Some(Arc::new(desc)),
            name,
            geometry,
            rpc_socket: self.rpc_socket.clone(),
            created,
        }))
    }

    /// Serves `wanted` (every subsystem with `engine = "spdk"`) and nothing else through SPDK's target.
    pub async fn apply(&self, wanted: Vec<WantedSubsystem>) -> Applied {
        let mut state = self.state.lock().await;
        let mut applied = Applied::new();
        if !state.transport && !wanted.is_empty() {
            match self
                .spdk
                .run_async(|on, done| match Target::get(on) {
                    Ok(target) => target.add_transport(on, "TCP", done),
                    Err(e) => done.complete(Err(e)),
                })
                .await
            {
                Ok(Ok(())) => state.transport = true,
                Ok(Err(e)) | Err(e) => {
                    let reason = format!("SPDK's TCP transport: {e}");
                    return wanted.into_iter().map(|w| (w.nqn, Err(reason.clone()))).collect();
                }
            }
        }

        // Bdevs for our volumes, registered before any namespace names them.
        let mut used_volumes = BTreeSet::new();
        let mut desired = Vec::new();
        let mut sampled = Vec::new();
        for w in wanted {
            let mut namespaces = BTreeMap::new();
            let mut failed = None;
            for ns in &w.namespaces {
                let bdev = match ns.volume.spdk_bdev() {
                    Some(name) => {
                        // Served by SPDK alone: its counters are SPDK's.
                        sampled.push((name.to_owned(), ns.stats.clone()));
                        name.to_owned()
                    }
                    None => {
                        used_volumes.insert(ns.volume_id.clone());
                        match self.export(&mut state, ns).await {
                            Ok(name) => name,
                            Err(e) => {
                                failed = Some(format!("namespace {}: {e}", ns.nsid));
                                break;
                            }
                        }
                    }
                };
                namespaces.insert(ns.nsid, (bdev, ns.uuid));
            }
            if let Some(reason) = failed {
                applied.insert(w.nqn.clone(), Err(reason));
                continue;
            }
            desired.push(SpdkSubsystem {
                nqn: w.nqn,
                serial: w.serial,
                model: w.model,
                allow_any_host: w.allow_any_host,
                hosts: w.hosts,
                namespaces,
                listeners: w.listeners,
            });
        }
        *self.sampled.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = sampled;

        // Subsystems no longer wanted go first (they may hold addresses and bdevs).
        let keep: BTreeSet<&str> = desired.iter().map(|d| d.nqn.as_str()).collect();
        let gone: Vec<String> = state.subsystems.keys().filter(|n| !keep.contains(n.as_str())).cloned().collect();
        for nqn in gone {
            if let Err(e) = self.destroy(&nqn).await {
                tracing::warn!(%nqn, error = %e, "cannot remove an SPDK subsystem");
            }
            state.subsystems.remove(&nqn);
        }

        // The target listens on every address some subsystem is exported on.
        let addresses: BTreeSet<SocketAddr> = desired.iter().flat_map(|d| d.listeners.iter().copied()).collect();
        let mut listen_failed = BTreeMap::new();
        for &address in addresses.difference(&state.listening.clone()) {
            match self.spdk.run(move |on| Target::get(on)?.listen(on, address)).await.and_then(|r| r) {
                Ok(()) => {
                    state.listening.insert(address);
                }
                Err(e) => {
                    listen_failed.insert(address, e.to_string());
                }
            }
        }

        for d in desired {
            let result = match listen_failed.iter().find(|(a, _)| d.listeners.contains(a)) {
                Some((address, e)) => Err(format!("listening on {address}: {e}")),
                None => {
                    let before = state.subsystems.get(&d.nqn).cloned();
                    if before.as_ref() == Some(&d) {
                        Ok(false)
                    } else {
                        match self.converge(before.as_ref(), &d).await {
                            Ok(()) => {
                                state.subsystems.insert(d.nqn.clone(), d.clone());
                                Ok(true)
                            }
                            Err(e) => {
                                // Whatever half-state SPDK is in is removed, and tried again next pass.
                                let _ = self.destroy(&d.nqn).await;
                                state.subsystems.remove(&d.nqn);
                                Err(e)
                            }
                        }
                    }
                }
            };
            applied.insert(d.nqn.clone(), result);
        }

        for &address in state.listening.clone().difference(&addresses) {
            match self.spdk.run(move |on| Target::get(on)?.stop_listen(on, address)).await.and_then(|r| r) {
                Ok(()) => {
                    state.listening.remove(&address);
                }
                Err(e) => tracing::warn!(%address, error = %e, "SPDK keeps listening"),
            }
        }

        // Bdevs of volumes no namespace serves any more.
        let stale: Vec<String> = state.exported.keys().filter(|id| !used_volumes.contains(*id)).cloned().collect();
        for id in stale {
            if let Some((_, registered)) = state.exported.remove(&id) {
                self.unregister(registered).await;
            }
        }
        applied
    }

    /// The bdev serving `ns`'s volume, registering it (again, under a new name, when the volume was reopened).
    async fn export(&self, state: &mut State, ns: &SpdkNamespace) -> Result<String, String> {
        if let Some((volume, registered)) = state.exported.get(&ns.volume_id)
            && Arc::ptr_eq(volume, &ns.volume)
        {
            return Ok(registered.name().to_owned());
        }
        state.next_bdev += 1;
        let name = format!("dpu-{}-{}", ns.volume_id, state.next_bdev);
        let device: Arc<dyn BlockDevice> =
            Arc::new(VolumeBdev { volume: ns.volume.clone(), runtime: self.runtime.clone(), stats: ns.stats.clone() });
        let bdev_name = name.clone();
        let uuid = ns.uuid;
        let registered = self
            .spdk
            .run(move |on| bdev::register(on, &bdev_name, "dpu-agent volume", Some(uuid), device))
            .await
            .and_then(|r| r)
            .map_err(spdk_error)?;
        // The previous bdev of a reopened volume goes once its namespaces moved (unregistered with the stale ones
        // at the end of the pass would miss it: the id is still in use), so it goes here, after the new one.
        if let Some((_, old)) = state.exported.insert(ns.volume_id.clone(), (ns.volume.clone(), registered)) {
            self.unregister(old).await;
        }
        Ok(name)
    }

    async fn unregister(&self, registered: Registered) {
        let name = registered.name().to_owned();
        match self.spdk.run_async(move |on, done| registered.unregister(on, done)).await.and_then(|r| r) {
            Ok(()) => tracing::info!(bdev = %name, "bdev unregistered"),
            Err(e) => tracing::warn!(bdev = %name, error = %e, "cannot unregister a bdev"),
        }
    }

    async fn transition(&self, nqn: &str, to: Transition) -> Result<(), String> {
        self.on_subsystem(nqn, move |on, s, done| s.transition(on, to, done)).await.map_err(|e| format!("{to:?}: {e}"))
    }

    /// Starts `f` on the subsystem `nqn` on SPDK's thread and waits for the completion it hands on.
    async fn on_subsystem(
        &self,
        nqn: &str,
        f: impl FnOnce(&dpu_spdk::OnSpdk, Subsystem, Completion<Result<(), dpu_spdk::Error>>) + Send + 'static,
    ) -> Result<(), dpu_spdk::Error> {
        let nqn = nqn.to_owned();
        self.spdk
            .run_async(move |on, done| match find_subsystem(on, &nqn) {
                Ok(s) => f(on, s, done),
                Err(e) => done.complete(Err(e)),
            })
            .await
            .and_then(|r| r)
    }

    /// Runs `f` with the subsystem `nqn` on SPDK's thread.
    async fn with_subsystem(
        &self,
        nqn: &str,
        f: impl FnOnce(&dpu_spdk::OnSpdk, Subsystem) -> Result<(), dpu_spdk::Error> + Send + 'static,
    ) -> Result<(), String> {
        let nqn = nqn.to_owned();
        self.spdk.run(move |on| f(on, find_subsystem(on, &nqn)?)).await.and_then(|r| r).map_err(spdk_error)
    }

    async fn add_listener(&self, nqn: &str, address: SocketAddr) -> Result<(), String> {
        self.on_subsystem(nqn, move |on, s, done| s.add_listener(on, address, done))
            .await
            .map_err(|e| format!("listener {address}: {e}"))
    }

    /// Brings SPDK's subsystem from `before` (what was applied; `None`: nothing) to `want`.
    async fn converge(&self, before: Option<&SpdkSubsystem>, want: &SpdkSubsystem) -> Result<(), String> {
        let before = match before {
            Some(b) if b.serial == want.serial && b.model == want.model => Some(b),
            Some(_) => {
                // Serial and model are fixed at creation.
                self.destroy(&want.nqn).await?;
                None
            }
            None => None,
        };
        let was = match before {
            Some(b) => {
                self.transition(&want.nqn, Transition::Pause).await?;
                b.clone()
            }
            None => {
                let (nqn, serial, model) = (want.nqn.clone(), want.serial.clone(), want.model.clone());
                self.spdk
                    .run(move |on| Target::get(on)?.create_subsystem(on, &nqn, &serial, &model).map(|_| ()))
                    .await
                    .and_then(|r| r)
                    .map_err(spdk_error)?;
                // A new subsystem has no hosts, namespaces or listeners yet.
                SpdkSubsystem {
                    hosts: BTreeSet::new(),
                    namespaces: BTreeMap::new(),
                    listeners: BTreeSet::new(),
                    ..want.clone()
                }
            }
        };

        let allow = want.allow_any_host;
        let removed_hosts: Vec<String> = was.hosts.difference(&want.hosts).cloned().collect();
        let added_hosts: Vec<String> = want.hosts.difference(&was.hosts).cloned().collect();
        let removed_ns: Vec<u32> = was
            .namespaces
            .iter()
            .filter(|(nsid, ns)| want.namespaces.get(nsid) != Some(ns))
            .map(|(nsid, _)| *nsid)
            .collect();
        let added_ns: Vec<(u32, (String, [u8; 16]))> = want
            .namespaces
            .iter()
            .filter(|(nsid, ns)| was.namespaces.get(nsid) != Some(ns))
            .map(|(nsid, ns)| (*nsid, ns.clone()))
            .collect();
        let removed_listeners: Vec<SocketAddr> = was.listeners.difference(&want.listeners).copied().collect();
        self.with_subsystem(&want.nqn, move |on, s| {
            s.set_allow_any_host(on, allow)?;
            for host in &removed_hosts {
                s.remove_host(on, host)?;
            }
            for host in &added_hosts {
                s.add_host(on, host)?;
            }
            for nsid in &removed_ns {
                s.remove_namespace(on, *nsid)?;
            }
            for (nsid, (bdev, uuid)) in &added_ns {
                s.add_namespace(on, *nsid, bdev, *uuid)?;
            }
            for address in &removed_listeners {
                s.remove_listener(on, *address)?;
            }
            Ok(())
        })
        .await?;
        for &address in want.listeners.difference(&was.listeners) {
            self.add_listener(&want.nqn, address).await?;
        }
        let to = if before.is_some() { Transition::Resume } else { Transition::Start };
        self.transition(&want.nqn, to).await
    }

    /// Stops and destroys the subsystem `nqn`, disconnecting its hosts.
    async fn destroy(&self, nqn: &str) -> Result<(), String> {
        // A subsystem that never started (or is stopped) refuses Stop; destroying it is what matters.
        let _ = self.transition(nqn, Transition::Stop).await;
        let present = {
            let nqn = nqn.to_owned();
            self.spdk.run(move |on| Target::get(on).map(|t| t.find(on, &nqn).is_some())).await.and_then(|r| r)
        };
        match present {
            Ok(false) => Ok(()),
            Ok(true) => self.on_subsystem(nqn, |on, s, done| s.destroy(on, done)).await.map_err(spdk_error),
            Err(e) => Err(spdk_error(e)),
        }
    }
}

/// The subsystem `nqn` of the framework's target.
fn find_subsystem(on: &dpu_spdk::OnSpdk, nqn: &str) -> Result<Subsystem, dpu_spdk::Error> {
    Target::get(on)?.find(on, nqn).ok_or_else(|| dpu_spdk::Error::Failed(format!("no subsystem {nqn}")))
}

/// Copies SPDK's I/O counters of the bdevs in `sampled` into their volumes' counters every [`IOSTAT_EVERY`]: I/O
/// that SPDK's target serves from its own bdevs passes no code of ours. SPDK counts every I/O of the bdev, the
/// agent's own through [`SpdkVolume`] included, so its totals replace ours. SPDK keeps no latency histogram by
/// default; the latency buckets stay what the agent measured on its own I/O.
async fn sample_iostat(socket: PathBuf, sampled: Sampled) {
    let mut every = tokio::time::interval(IOSTAT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let wanted = sampled.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if wanted.is_empty() {
            continue;
        }
        let socket = socket.clone();
        let answer = tokio::task::spawn_blocking(move || rpc(&socket, "bdev_get_iostat", serde_json::json!({}))).await;
        let iostat = match answer {
            Ok(Ok(iostat)) => iostat,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading SPDK's bdev counters failed");
                continue;
            }
            Err(_) => return,
        };
        let bdevs = iostat["bdevs"].as_array().map(Vec::as_slice).unwrap_or_default();
        for (name, stats) in &wanted {
            if let Some(b) = bdevs.iter().find(|b| b["name"].as_str() == Some(name.as_str())) {
                store_iostat(b, stats);
            }
        }
    }
}

/// One bdev's entry of `bdev_get_iostat` into a volume's counters.
fn store_iostat(bdev: &serde_json::Value, stats: &VolumeStats) {
    use std::sync::atomic::Ordering::Relaxed;
    let field = |name: &str| bdev[name].as_u64();
    for (counter, name) in [
        (&stats.reads, "num_read_ops"),
        (&stats.writes, "num_write_ops"),
        (&stats.read_bytes, "bytes_read"),
        (&stats.written_bytes, "bytes_written"),
        (&stats.discards, "num_unmap_ops"),
    ] {
        if let Some(v) = field(name) {
            counter.store(v, Relaxed);
        }
    }
}

/// How long an SPDK JSON-RPC call may take (attaching an NVMe controller resets it).
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// One JSON-RPC 2.0 call on SPDK's Unix socket.
fn rpc(socket: &Path, method: &str, params: serde_json::Value) -> Result<serde_json::Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(RPC_TIMEOUT)).map_err(|e| e.to_string())?;
    let request = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    stream.write_all(request.to_string().as_bytes()).map_err(|e| format!("sending {method}: {e}"))?;
    let deadline = Instant::now() + RPC_TIMEOUT;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).map_err(|e| format!("reading the answer to {method}: {e}"))?;
        if n == 0 {
            return Err(format!("SPDK closed the RPC connection before answering {method}"));
        }
        reply.extend_from_slice(&chunk[..n]);
        match serde_json::from_slice::<serde_json::Value>(&reply) {
            Ok(answer) => {
                if let Some(error) = answer.get("error") {
                    let message = error.get("message").and_then(|m| m.as_str()).unwrap_or("no message");
                    return Err(message.to_owned());
                }
                return Ok(answer.get("result").cloned().unwrap_or(serde_json::Value::Null));
            }
            Err(e) if e.is_eof() && Instant::now() < deadline => continue,
            Err(e) => return Err(format!("SPDK's answer to {method} is not JSON: {e}")),
        }
    }
}

/// A volume over an SPDK bdev.
#[derive(Debug)]
pub struct SpdkVolume {
    spdk: Spdk,
    /// Taken by drop, to be closed on SPDK's thread.
    desc: Option<Arc<Desc>>,
    name: String,
    geometry: Geometry,
    rpc_socket: PathBuf,
    /// The RPC method and name that delete the bdev, when the agent created it.
    created: Option<(&'static str, String)>,
}

impl SpdkVolume {
    fn desc(&self) -> Arc<Desc> {
        self.desc.clone().expect("open until dropped")
    }

    async fn transfer(&self, write: bool, lba: u64, mut buf: Vec<u8>) -> BufResult {
        if let Err(e) = self.geometry.check(lba, buf.len()) {
            return (buf, Err(e));
        }
        let mut dma = match DmaBuf::zeroed(buf.len()) {
            Ok(d) => d,
            Err(e) => return (buf, Err(VolumeError::Unavailable(e.to_string()))),
        };
        if write {
            dma.as_mut_slice().copy_from_slice(&buf);
        }
        let desc = self.desc();
        let outcome = self
            .spdk
            .run_async(move |on, done: Completion<(DmaBuf, bool)>| {
                let finish = move |_: &dpu_spdk::OnSpdk, dma, ok| done.complete((dma, ok));
                if write { desc.write(on, lba, dma, finish) } else { desc.read(on, lba, dma, finish) }
            })
            .await;
        match outcome {
            Ok((dma, true)) => {
                if !write {
                    buf.copy_from_slice(dma.as_slice());
                }
                (buf, Ok(()))
            }
            Ok((_, false)) => (buf, Err(io_error(&self.name))),
            Err(e) => (buf, Err(VolumeError::Unavailable(e.to_string()))),
        }
    }

    async fn op(&self, op: DescOp, lba: u64, blocks: u64) -> Result<(), VolumeError> {
        if op != DescOp::Flush {
            let len = usize::try_from(blocks * u64::from(self.geometry.block_size)).unwrap_or(usize::MAX);
            self.geometry.check(lba, len)?;
        }
        let desc = self.desc();
        let ok = self
            .spdk
            .run_async(move |on, done: Completion<bool>| {
                if op == DescOp::Flush && !desc.supports(on, op) {
                    // A bdev without a volatile cache (malloc) has nothing to flush.
                    return done.complete(true);
                }
                desc.submit(on, op, lba, blocks, move |_, ok| done.complete(ok))
            })
            .await
            .map_err(|e| VolumeError::Unavailable(e.to_string()))?;
        if ok { Ok(()) } else { Err(io_error(&self.name)) }
    }
}

fn io_error(bdev: &str) -> VolumeError {
    VolumeError::Io(std::io::Error::other(format!("SPDK bdev {bdev} failed the I/O")))
}

impl Volume for SpdkVolume {
    fn kind(&self) -> &'static str {
        "spdk"
    }

    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        Box::pin(self.transfer(false, lba, buf))
    }

    fn write(&self, lba: u64, buf: Vec<u8>) -> IoFuture<'_, BufResult> {
        Box::pin(self.transfer(true, lba, buf))
    }

    fn flush(&self) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(self.op(DescOp::Flush, 0, self.geometry.blocks))
    }

    fn discard(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(self.op(DescOp::Unmap, lba, blocks))
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), VolumeError>> {
        Box::pin(self.op(DescOp::WriteZeroes, lba, blocks))
    }

    fn spdk_bdev(&self) -> Option<&str> {
        Some(&self.name)
    }
}

impl Drop for SpdkVolume {
    fn drop(&mut self) {
        let Some(desc) = self.desc.take() else { return };
        // Closed on SPDK's thread once no I/O holds it; deleting a bdev the agent created waits for that close.
        close_when_idle(self.spdk.clone(), desc);
        if let Some((method, name)) = self.created.take() {
            let socket = self.rpc_socket.clone();
            std::thread::spawn(move || match rpc(&socket, method, serde_json::json!({ "name": name })) {
                Ok(_) => tracing::info!(bdev = %name, "SPDK bdev deleted"),
                Err(e) => tracing::warn!(bdev = %name, error = %e, "cannot delete an SPDK bdev"),
            });
        }
    }
}

/// Closes `desc` on SPDK's thread after the I/O still holding it completed (completions run on that thread too).
fn close_when_idle(spdk: Spdk, desc: Arc<Desc>) {
    let again = spdk.clone();
    let _ = spdk.post(move |on| match Arc::try_unwrap(desc) {
        Ok(desc) => desc.close(on),
        Err(desc) => close_when_idle(again, desc),
    });
}

/// One of our volumes as an SPDK bdev: I/O runs on tokio, completes on the submitting SPDK thread.
#[derive(Debug)]
pub struct VolumeBdev {
    volume: SharedVolume,
    runtime: tokio::runtime::Handle,
    stats: Arc<VolumeStats>,
}

impl BlockDevice for VolumeBdev {
    fn block_size(&self) -> u32 {
        self.volume.geometry().block_size
    }

    fn num_blocks(&self) -> u64 {
        self.volume.geometry().blocks
    }

    fn write_cache(&self) -> bool {
        self.volume.volatile_write_cache()
    }

    fn supports(&self, io: IoType) -> bool {
        match io {
            IoType::Read | IoType::Flush | IoType::Reset => true,
            IoType::Write | IoType::Unmap | IoType::WriteZeroes => !self.volume.read_only(),
            IoType::Other(_) => false,
        }
    }

    fn submit(&self, io: BdevIo) {
        let volume = self.volume.clone();
        let stats = self.stats.clone();
        self.runtime.spawn(async move {
            let start = Instant::now();
            let block_size = u64::from(volume.geometry().block_size);
            let (lba, blocks) = (io.offset_blocks(), io.num_blocks());
            let bytes = blocks * block_size;
            let (kind, ok) = match io.kind() {
                IoType::Read => {
                    let (data, r) = volume.read(lba, vec![0; bytes as usize]).await;
                    let ok = r.is_ok();
                    let mut io = io;
                    if ok {
                        io.scatter(&data);
                    }
                    (Some((IoKind::Read, io)), ok)
                }
                IoType::Write => {
                    let mut data = vec![0; bytes as usize];
                    io.gather(&mut data);
                    let (_, r) = volume.write(lba, data).await;
                    (Some((IoKind::Write, io)), r.is_ok())
                }
                IoType::Flush => {
                    let r = volume.flush().await;
                    (Some((IoKind::Flush, io)), r.is_ok())
                }
                IoType::Unmap => {
                    let r = volume.discard(lba, blocks).await;
                    (Some((IoKind::Discard, io)), r.is_ok())
                }
                IoType::WriteZeroes => {
                    let r = volume.write_zeroes(lba, blocks).await;
                    (Some((IoKind::Discard, io)), r.is_ok())
                }
                // Nothing is queued inside the volume that a reset could abort.
                IoType::Reset => {
                    io.complete(true);
                    (None, true)
                }
                IoType::Other(_) => {
                    io.complete(false);
                    (None, false)
                }
            };
            if let Some((kind, io)) = kind {
                let moved = if matches!(kind, IoKind::Read | IoKind::Write) { bytes } else { 0 };
                stats.record(kind, moved, start.elapsed().as_micros() as u64, ok);
                io.complete(ok);
            }
        });
    }
}
