//! Storage through the real agent binary with a Rust NVMe/TCP initiator: intent restored after a restart, and
//! nothing acknowledged by a completed Flush lost when the agent is killed with SIGKILL.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Agent;
use dpu_proto::v1 as pb;
use dpu_proto::v1::storage_service_client::StorageServiceClient;
use dpu_storage::initiator::{ConnectOptions, Initiator};

const NQN: &str = "nqn.2026-11.io.dpu-agent:crash-test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Connects once the agent's reconciler has opened the listener (it runs just after the API starts serving).
async fn connect(addr: SocketAddr, hostnqn: &str) -> Initiator {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut opts = ConnectOptions::new(NQN);
        opts.hostnqn = hostnqn.to_owned();
        match Initiator::connect(addr, opts).await {
            Ok(initiator) => return initiator,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("connecting to {addr}: {e}"),
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_sigkill_and_intent_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let image = dir.path().join("volume.img");
    let nvme = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let hostnqn = "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-2fa1-41d2-883f-0016d3cca427";

    let agent = Agent::start(&["--data-dir", data]);
    let mut api = StorageServiceClient::new(agent.channel().await);
    let volume = pb::Volume {
        size_bytes: 64 << 20,
        backend: Some(pb::volume::Backend::File(pb::FileBackend { path: image.display().to_string() })),
        ..Default::default()
    };
    api.create_volume(pb::CreateVolumeRequest { volume_id: "disk".into(), volume: Some(volume) }).await.unwrap();
    let subsystem = pb::Subsystem { nqn: NQN.into(), allowed_hosts: vec![hostnqn.into()], ..Default::default() };
    api.create_subsystem(pb::CreateSubsystemRequest { subsystem_id: "crash".into(), subsystem: Some(subsystem) })
        .await
        .unwrap();
    let namespace = pb::Namespace { volume: "disk".into(), ..Default::default() };
    api.create_namespace(pb::CreateNamespaceRequest {
        parent: "subsystems/crash".into(),
        namespace_id: "ns1".into(),
        namespace: Some(namespace),
    })
    .await
    .unwrap();
    let listener = pb::Listener { address: nvme.to_string(), ..Default::default() };
    api.create_listener(pb::CreateListenerRequest {
        parent: "subsystems/crash".into(),
        listener_id: "tcp".into(),
        listener: Some(listener),
    })
    .await
    .unwrap();

    // Writes of both paths (4 KiB in-capsule, 128 KiB via R2T), then a Flush that completes.
    let host = connect(nvme, hostnqn).await;
    let queue = host.io_queue(0).unwrap();
    let writes = [(8u64, pattern(1, 4096)), (1024, pattern(2, 128 << 10)), (65000, pattern(3, 64 << 10))];
    for (lba, data) in &writes {
        let (_, result) = queue.write(1, *lba, data.clone()).await;
        result.unwrap();
    }
    queue.flush(1).await.unwrap();
    agent.kill();
    drop(host);

    // The restarted agent rebuilds volume, subsystem, namespace and listener from its intent store.
    let agent = Agent::start(&["--data-dir", data]);
    let host = connect(nvme, hostnqn).await;
    let queue = host.io_queue(0).unwrap();
    for (lba, data) in &writes {
        let (back, result) = queue.read(1, *lba, vec![0; data.len()]).await;
        result.unwrap();
        assert!(back == *data, "data at LBA {lba} lost or damaged across SIGKILL");
    }
    assert_eq!(host.namespace(1).map(|n| n.bytes()), Some(64 << 20));
    drop(host);
    let metrics = common::metrics(agent.admin).await;
    assert!(metrics.contains("dpu_storage_volume_ops{volume=\"disk\",op=\"read\"} 3"), "{metrics}");
    assert_eq!(agent.stop().await.code(), Some(0));
}
