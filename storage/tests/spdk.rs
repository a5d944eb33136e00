//! SPDK as a storage engine (feature `spdk`, needs an installed SPDK): a subsystem with `engine = "spdk"` built
//! from intent by the storage reconciler and served by SPDK's NVMe-oF target, with one namespace on a bdev SPDK's
//! malloc module created and one on the agent's own volume through the Rust bdev module; the crate's initiator
//! drives it over TCP. (The Linux kernel initiator is exercised by `tests/guest.sh spdk-engine`.)
#![cfg(feature = "spdk")]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use dpu_intent::Store;
use dpu_intent::reconcile::{ObjectState, Reconciler};
use dpu_storage::bdev::Volume;
use dpu_storage::initiator::{ConnectOptions, Initiator};
use dpu_storage::model::{
    Backend, Engine, ListenerSpec, NamespaceSpec, SpdkBdevSpec, SpdkConfig, SpdkCreate, SubsystemSpec, VolumeSpec,
};
use dpu_storage::reconcile::StorageReconciler;
use dpu_storage::spdk::SpdkEngine;
use dpu_storage::target::Target;

const SUBNQN: &str = "nqn.2026-12.io.dpu-agent:spdk";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:7d1a2c3e-0000-4000-8000-00000000c003";
const BLOCK: u32 = 512;
const BYTES: u64 = 16 << 20;

fn subsystem(addr: SocketAddr, namespaces: &[(&str, u32)]) -> SubsystemSpec {
    SubsystemSpec {
        nqn: SUBNQN.into(),
        serial: "SPDK0001".into(),
        model: "dpu-agent spdk".into(),
        allow_any_host: false,
        allowed_hosts: BTreeSet::from([HOSTNQN.to_owned()]),
        engine: Engine::Spdk,
        namespaces: namespaces
            .iter()
            .map(|(volume, nsid)| {
                let ns = NamespaceSpec { nsid: *nsid, volume: (*volume).into(), uuid: [*nsid as u8; 16], layer: None };
                (format!("ns{nsid}"), ns)
            })
            .collect::<BTreeMap<_, _>>(),
        listeners: BTreeMap::from([("tcp".into(), ListenerSpec { address: addr })]),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect()
}

async fn pass(reconciler: &StorageReconciler, store: &Store) -> usize {
    let pass = reconciler.reconcile(store).await.expect("reconcile");
    for (key, status) in &pass.statuses {
        assert_eq!(status.state, ObjectState::Ready, "{key}: {}", status.reason);
    }
    pass.changes
}

async fn connect(addr: SocketAddr, hostnqn: &str) -> Result<Initiator, dpu_storage::initiator::Error> {
    let opts = ConnectOptions { hostnqn: hostnqn.into(), io_queues: 1, ..ConnectOptions::new(SUBNQN) };
    Initiator::connect(addr, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spdk_engine_serves_spdk_bdevs_and_our_volumes() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = SpdkConfig { mem_size_mib: 512, ..SpdkConfig::default() };
    let engine = Arc::new(SpdkEngine::start(&config, dir.path()).expect("SPDK starts without hugepages"));
    let store = Store::open(dir.path().join("intent")).expect("intent store");
    let target = Target::new();
    let reconciler = StorageReconciler::new(target.clone(), None).with_spdk(engine.clone());

    // Ours: a malloc volume of the agent. SPDK's: a bdev its malloc module creates for the volume.
    store.create("ours", VolumeSpec { block_size: BLOCK, size_bytes: BYTES, backend: Backend::Malloc }).expect("ours");
    let spdk_volume = SpdkBdevSpec { bdev: "SpdkMalloc0".into(), create: Some(SpdkCreate::Malloc) };
    store
        .create("theirs", VolumeSpec { block_size: BLOCK, size_bytes: BYTES, backend: Backend::Spdk(spdk_volume) })
        .expect("theirs");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
    store.create("sub", subsystem(addr, &[("ours", 1), ("theirs", 2)])).expect("sub");
    assert!(pass(&reconciler, &store).await > 0);
    assert_eq!(pass(&reconciler, &store).await, 0, "an unchanged intent changes nothing");

    let host = connect(addr, HOSTNQN).await.expect("connect to SPDK's target");
    let q = host.io_queue(0).expect("I/O queue");
    for (nsid, seed) in [(1u32, 7u8), (2, 99)] {
        let data = pattern(64 * 1024, seed);
        let (_, r) = q.write(nsid, 8, data.clone()).await;
        r.expect("write");
        let (back, r) = q.read(nsid, 8, vec![0; data.len()]).await;
        r.expect("read");
        assert!(back == data, "namespace {nsid} read back what was written");
    }
    // The agent's volume holds what the host wrote through SPDK, and its counters saw it.
    let stats = target.stats().for_volume("ours");
    assert!(stats.writes.load(Ordering::Relaxed) >= 1 && stats.reads.load(Ordering::Relaxed) >= 1);
    // SPDK's own bdev: its volume's counters are SPDK's, read within a second or two.
    let theirs = target.stats().for_volume("theirs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while theirs.read_bytes.load(Ordering::Relaxed) < 64 * 1024
        || theirs.written_bytes.load(Ordering::Relaxed) < 64 * 1024
    {
        assert!(std::time::Instant::now() < deadline, "SPDK's counters of its bdev did not reach the volume's");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(theirs.reads.load(Ordering::Relaxed) >= 1 && theirs.writes.load(Ordering::Relaxed) >= 1);

    // A host not on the list is refused by SPDK.
    let other = "nqn.2014-08.org.nvmexpress:uuid:7d1a2c3e-0000-4000-8000-00000000d004";
    assert!(connect(addr, other).await.is_err(), "a host outside the allow list connects");
    drop(host);

    // Namespace changes go through pause/resume: the SPDK namespace leaves, the subsystem keeps serving.
    store.update("sub", subsystem(addr, &[("ours", 1)]), None).expect("update");
    assert!(pass(&reconciler, &store).await > 0);
    let host = connect(addr, HOSTNQN).await.expect("reconnect");
    let q = host.io_queue(0).expect("I/O queue");
    let (back, r) = q.read(1, 8, vec![0; 64 * 1024]).await;
    r.expect("read after the update");
    assert!(back == pattern(64 * 1024, 7));
    let (_, r) = q.read(2, 8, vec![0; 4096]).await;
    assert!(r.is_err(), "namespace 2 is gone");
    drop(host);

    // Deleting the subsystem and the volumes leaves nothing in SPDK.
    store.delete::<SubsystemSpec>("sub", false).expect("delete sub");
    store.delete::<VolumeSpec>("theirs", false).expect("delete theirs");
    pass(&reconciler, &store).await;
    assert!(connect(addr, HOSTNQN).await.is_err(), "the subsystem is gone");
    let bdevs = engine.rpc("bdev_get_bdevs", serde_json::json!({})).expect("bdev_get_bdevs");
    let names: Vec<&str> = bdevs.as_array().expect("list").iter().filter_map(|b| b["name"].as_str()).collect();
    // The deletion of SPDK's malloc bdev runs in the background after its descriptor closed.
    assert!(!names.iter().any(|n| n.starts_with("dpu-ours")), "our volume's bdev is unregistered: {names:?}");

    let ours: Arc<dyn Volume> = Arc::new(dpu_storage::bdev::MallocVolume::new(BLOCK, 8));
    assert!(ours.spdk_bdev().is_none());
    drop(reconciler);
    let engine = Arc::try_unwrap(engine).expect("the reconciler let go of the engine");
    tokio::task::spawn_blocking(move || engine.stop()).await.expect("stop");
}
