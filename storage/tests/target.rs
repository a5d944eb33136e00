//! The NVMe/TCP target run in-process, built from intent by the storage reconciler, driven by the crate's own
//! initiator and by hand-made PDUs on raw sockets. (The Linux kernel initiator is exercised by
//! `tests/guest.sh nvme-initiator`.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dpu_intent::Store;
use dpu_intent::reconcile::{ObjectState, Reconciler};
use dpu_nvme::spec::command::io_opcode;
use dpu_nvme::spec::fabrics::{
    CNTLID_DYNAMIC, ConnectCommand, ConnectData, DISCOVERY_NQN, connect_command_offset, connect_data_offset,
    connect_ipo_iattr,
};
use dpu_nvme::spec::features::{aer_notice, aer_type, fid, number_of_queues};
use dpu_nvme::spec::identify::{self, oaes};
use dpu_nvme::spec::log::{adrfam, lid, trtype};
use dpu_nvme::spec::{SglDescriptor, Sqe, Status};
use dpu_nvme::tcp::{
    self, DataPdu, Decoded, Decoder, Direction, FatalErrorStatus, PduHeader, TxOptions, data_digest, encode_capsule_cmd,
};
use dpu_storage::initiator::{
    AsyncEvent, ConnectOptions, ConnectParams, Error, Initiator, IoQueue, NamespaceInfo, Queue, QueueConfig, Transfer,
};
use dpu_storage::model::{Backend, ListenerSpec, NamespaceSpec, SubsystemSpec, VolumeSpec};
use dpu_storage::reconcile::StorageReconciler;
use dpu_storage::target::Target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use zerocopy::IntoBytes;

const SUBNQN: &str = "nqn.2026-11.io.dpu-agent:test";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:7d1a2c3e-0000-4000-8000-00000000a001";
const OTHER_HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:7d1a2c3e-0000-4000-8000-00000000b002";
const HOSTID: [u8; 16] = [0x7d, 0x1a, 0x2c, 0x3e, 0, 0, 0x40, 0, 0x80, 0, 0, 0, 0, 0, 0xa0, 0x01];
const SERIAL: &str = "DPU0042";
const MODEL: &str = "dpu-agent integration";
const BLOCK: u32 = 512;
const VOLUME_BYTES: u64 = 64 << 20;
const BLOCKS: u64 = VOLUME_BYTES / BLOCK as u64;
/// Generous bound for anything that should happen "soon".
const SOON: Duration = Duration::from_secs(10);

/// A target with one subsystem ([`SUBNQN`], namespace 1 = `vol1`, host [`HOSTNQN`] allowed) on a free
/// loopback port, plus a second volume `vol2` not exported yet.
struct Harness {
    _dir: tempfile::TempDir,
    store: Store,
    reconciler: StorageReconciler,
    addr: SocketAddr,
}

fn volume() -> VolumeSpec {
    VolumeSpec { block_size: BLOCK, size_bytes: VOLUME_BYTES, backend: Backend::Malloc }
}

fn subsystem(addr: SocketAddr) -> SubsystemSpec {
    SubsystemSpec {
        nqn: SUBNQN.into(),
        serial: SERIAL.into(),
        model: MODEL.into(),
        allow_any_host: false,
        allowed_hosts: BTreeSet::from([HOSTNQN.to_owned()]),
        engine: Default::default(),
        namespaces: BTreeMap::from([(
            "ns1".into(),
            NamespaceSpec { nsid: 1, volume: "vol1".into(), uuid: [1; 16], layer: None },
        )]),
        listeners: BTreeMap::from([("tcp".into(), ListenerSpec { address: addr })]),
    }
}

/// A loopback address whose port was free a moment ago.
fn free_addr() -> SocketAddr {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a probe socket");
    probe.local_addr().expect("probe address")
}

impl Harness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(dir.path()).expect("opening the intent store");
        store.create("vol1", volume()).expect("vol1");
        store.create("vol2", volume()).expect("vol2");
        let reconciler = StorageReconciler::new(Target::new(), None);
        // The target cannot report the port it bound, so pick a free one; retry if someone takes it first.
        for attempt in 0.. {
            let addr = free_addr();
            if attempt == 0 {
                store.create("sub1", subsystem(addr)).expect("sub1");
            } else {
                store.update("sub1", subsystem(addr), None).expect("sub1");
            }
            let pass = reconciler.reconcile(&store).await.expect("reconcile");
            let failed = pass.statuses.iter().find(|(key, s)| key.kind == "listeners" && s.state == ObjectState::Error);
            match failed {
                None => return Self { _dir: dir, store, reconciler, addr },
                Some((_, s)) if attempt < 5 => eprintln!("listener on {addr} failed ({}), retrying", s.reason),
                Some((_, s)) => panic!("no listener could be bound: {}", s.reason),
            }
        }
        unreachable!("the loop returns or panics")
    }

    async fn reconcile(&self) {
        let pass = self.reconciler.reconcile(&self.store).await.expect("reconcile");
        for (key, status) in &pass.statuses {
            assert_eq!(status.state, ObjectState::Ready, "{key}: {}", status.reason);
        }
    }

    fn options(&self) -> ConnectOptions {
        ConnectOptions { hostnqn: HOSTNQN.into(), hostid: HOSTID, io_queues: 2, ..ConnectOptions::new(SUBNQN) }
    }

    async fn connect(&self) -> Initiator {
        self.connect_with(|_| {}).await
    }

    async fn connect_with(&self, adjust: impl FnOnce(&mut ConnectOptions)) -> Initiator {
        let mut opts = self.options();
        adjust(&mut opts);
        Initiator::connect(self.addr, opts).await.expect("connecting the initiator")
    }
}

/// Bytes that identify their offset and a seed, so misplaced or stale data shows.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed.wrapping_mul(7919)) % 251) as u8).collect()
}

async fn write(q: &IoQueue, nsid: u32, lba: u64, data: Vec<u8>) {
    let (_, result) = q.write(nsid, lba, data).await;
    result.expect("write");
}

async fn read(q: &IoQueue, nsid: u32, lba: u64, len: usize) -> Vec<u8> {
    let (buf, result) = q.read(nsid, lba, vec![0xee; len]).await;
    result.expect("read");
    buf
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, Error>, expected: Status) -> Error {
    match result {
        Err(e) => {
            assert_eq!(e.status(), Some(expected), "{e}");
            e
        }
        Ok(v) => panic!("expected {expected:?}, got success: {v:?}"),
    }
}

#[tokio::test]
async fn connect_and_identify() {
    let h = Harness::start().await;
    let host = h.connect().await;
    let id = host.controller();
    assert_eq!(id.mn(), Some(MODEL));
    assert_eq!(id.sn(), Some(SERIAL));
    assert_eq!(id.subnqn(), Some(SUBNQN));
    assert_eq!(id.nn.get(), dpu_storage::model::MAX_NSID);
    assert_eq!(id.mdts, 6);
    assert_eq!(id.cntrltype, identify::cntrltype::IO);
    assert_eq!(id.cntlid.get(), host.cntlid());
    assert_eq!(id.ioccsz.get(), (64 + 8192) / 16, "8 KiB of in-capsule data");
    assert_ne!(id.oncs.get() & identify::oncs::WRITE_ZEROES, 0);
    assert_ne!(id.oncs.get() & identify::oncs::DATASET_MANAGEMENT, 0);
    assert_eq!(host.capabilities().mqes, 127);
    assert_eq!(host.io_queues().len(), 2);
    assert_eq!(host.io_queues().iter().map(IoQueue::qid).collect::<Vec<_>>(), [1, 2]);

    // Identify again over the wire, and the namespace.
    assert_eq!(host.identify_controller().await.expect("identify").sn(), Some(SERIAL));
    assert_eq!(host.active_namespaces().await.expect("active list"), [1]);
    let ns = host.identify_namespace(1).await.expect("identify namespace");
    assert_eq!((ns.nsze.get(), ns.ncap.get(), ns.block_size()), (BLOCKS, BLOCKS, Some(BLOCK)));
    assert_eq!(ns.nguid, [1; 16]);
    assert_eq!(host.namespace(1), Some(NamespaceInfo { nsid: 1, block_size: BLOCK, blocks: BLOCKS }));
    let inactive = host.identify_namespace(2).await.expect("identify an inactive namespace");
    assert_eq!(inactive.nsze.get(), 0, "an inactive namespace identifies as zeroes");
    assert_eq!(host.get_features(fid::NUMBER_OF_QUEUES).await.expect("get features"), number_of_queues(1, 1));

    // A controller shutdown completes, and the queues close.
    let io = host.io_queue(0).expect("queue 1").clone();
    host.shutdown().await.expect("shutdown");
    timeout(SOON, io.queue().closed()).await.expect("the I/O queue closes with the association");
}

#[tokio::test]
async fn discovery_lists_the_subsystem() {
    let h = Harness::start().await;
    let opts = ConnectOptions { hostnqn: HOSTNQN.into(), ..ConnectOptions::new(DISCOVERY_NQN) };
    let discovery = Initiator::connect(h.addr, opts).await.expect("connecting to discovery");
    assert_eq!(discovery.controller().cntrltype, identify::cntrltype::DISCOVERY);
    assert!(discovery.io_queues().is_empty());
    let log = discovery.discovery_log().await.expect("discovery log");
    assert_eq!(log.len(), 1, "{log:?}");
    let entry = &log[0];
    assert_eq!((entry.trtype, entry.adrfam), (trtype::TCP, adrfam::IPV4));
    assert_eq!(entry.subnqn(), Some(SUBNQN));
    assert_eq!(entry.traddr(), Some("127.0.0.1"));
    assert_eq!(entry.trsvcid(), Some(h.addr.port().to_string().as_str()));

    // A host that is not allowed sees nothing.
    let opts = ConnectOptions { hostnqn: OTHER_HOSTNQN.into(), ..ConnectOptions::new(DISCOVERY_NQN) };
    let other = Initiator::connect(h.addr, opts).await.expect("connecting to discovery");
    assert!(other.discovery_log().await.expect("discovery log").is_empty());
}

/// Writes in-capsule and via R2T, reads back, flushes, zeroes and deallocates on queue 1 and 2.
async fn round_trip(host: &Initiator, expect_digests: (bool, bool)) {
    let in_capsule = host.controller().ioccsz.get() as usize * 16 - 64;
    assert!((4096..128 * 1024).contains(&in_capsule), "4 KiB goes in-capsule, 128 KiB after an R2T");
    for (i, q) in host.io_queues().iter().enumerate() {
        assert_eq!(q.queue().digests(), expect_digests);
        let base = 2048 * i as u64;
        let small = pattern(4096, 1 + i as u64);
        write(q, 1, base + 8, small.clone()).await;
        assert_eq!(read(q, 1, base + 8, 4096).await, small);

        let large = pattern(128 * 1024, 2 + i as u64);
        write(q, 1, base + 1024, large.clone()).await;
        assert_eq!(read(q, 1, base + 1024, large.len()).await, large);

        q.flush(1).await.expect("flush");
        q.flush(u32::MAX).await.expect("flush of every namespace");

        // Zero the first 32 KiB of the large write, deallocate the next 32 KiB; the rest stays.
        q.write_zeroes(1, base + 1024, 64).await.expect("write zeroes");
        q.deallocate(1, &[(base + 1024 + 64, 64)]).await.expect("deallocate");
        let back = read(q, 1, base + 1024, large.len()).await;
        assert!(back[..64 * 1024].iter().all(|&b| b == 0), "zeroed and deallocated blocks read as zeroes");
        assert_eq!(back[64 * 1024..], large[64 * 1024..]);
        // The small write is untouched.
        assert_eq!(read(q, 1, base + 8, 4096).await, small);
    }
}

#[tokio::test]
async fn round_trip_without_digests() {
    let h = Harness::start().await;
    round_trip(&h.connect().await, (false, false)).await;
}

#[tokio::test]
async fn round_trip_with_header_and_data_digests() {
    let h = Harness::start().await;
    let host = h.connect_with(|o| (o.header_digest, o.data_digest) = (true, true)).await;
    assert_eq!(host.admin().digests(), (true, true));
    round_trip(&host, (true, true)).await;
}

#[tokio::test]
async fn round_trip_with_sq_flow_control_disabled() {
    // The controller then completes successful reads with the C2HData SUCCESS flag and no CapsuleResp.
    let h = Harness::start().await;
    let host = h.connect_with(|o| (o.disable_sq_flow_control, o.data_digest) = (true, true)).await;
    round_trip(&host, (false, true)).await;
}

#[tokio::test]
async fn round_trip_with_a_busy_polling_host() {
    let h = Harness::start().await;
    let host = h.connect_with(|o| o.busy_poll = Some(Duration::from_millis(2))).await;
    round_trip(&host, (false, false)).await;
}

#[tokio::test]
async fn many_commands_in_flight_on_every_queue() {
    let h = Harness::start().await;
    let host = h.connect_with(|o| o.queue_depth = 32).await;
    let queues = host.io_queues();
    assert!(queues.iter().all(|q| q.depth() == 32));
    // 256 writes of 4 to 64 KiB, more than the queues hold at once, then the reads, all concurrent.
    let jobs: Vec<(usize, u64, usize)> =
        (0..256).map(|i| (i % queues.len(), i as u64 * 128, 4096 << (i % 5))).collect();
    let writes = jobs.iter().map(|&(q, lba, len)| write(&queues[q], 1, lba, pattern(len, lba)));
    futures_util::future::join_all(writes).await;
    let reads =
        jobs.iter().map(|&(q, lba, len)| async move { (lba, len, read(&queues[(q + 1) % 2], 1, lba, len).await) });
    for (lba, len, data) in futures_util::future::join_all(reads).await {
        assert!(data == pattern(len, lba), "data at block {lba} ({len} bytes) differs");
    }
}

#[tokio::test]
async fn reads_from_memory_stay_exact_while_writes_land_beside_them() {
    // A RAM volume's reads leave straight from its memory, and a block range being written just then is read
    // into a buffer instead: reads of one 1 MiB region race writes to other blocks of it, from two queues.
    let h = Harness::start().await;
    let host = h.connect_with(|o| (o.queue_depth, o.disable_sq_flow_control) = (32, true)).await;
    let queues = host.io_queues();
    // Every 64 KiB: 4 to 32 KiB of fixed data at its start, and a block written over and over at 48 KiB.
    let fixed: Vec<(u64, usize)> = (0..64).map(|i| (i * 128, 4096 << (i % 4))).collect();
    for &(lba, len) in &fixed {
        write(&queues[0], 1, lba, pattern(len, lba)).await;
    }
    let writer = async {
        for round in 0..64u64 {
            let lba = 96 + (round % 64) * 128;
            write(&queues[1], 1, lba, pattern(4096, round)).await;
        }
    };
    let readers = async {
        for _ in 0..4 {
            let reads = fixed.iter().map(|&(lba, len)| async move { (lba, len, read(&queues[0], 1, lba, len).await) });
            for (lba, len, data) in futures_util::future::join_all(reads).await {
                assert!(data == pattern(len, lba), "data at block {lba} ({len} bytes) differs");
            }
        }
    };
    tokio::join!(writer, readers);
}

#[tokio::test]
async fn unknown_namespace_is_invalid_namespace() {
    let h = Harness::start().await;
    let host = h.connect().await;
    let q = host.io_queue(0).expect("queue 1");
    // The host refuses I/O to a namespace it has not identified...
    let (_, result) = q.read(7, 0, vec![0; 512]).await;
    assert!(matches!(result, Err(Error::UnknownNamespace { nsid: 7 })), "{result:?}");
    // ...so send the commands raw.
    let mut sqe = Sqe::new(io_opcode::READ, 0);
    sqe.set_nsid(7).set_cdws([0, 0, 0, 0, 0, 0]);
    let (_, result) = q.queue().submit(sqe, Transfer::FromController(vec![0; 512])).await;
    assert_status(result, Status::INVALID_NAMESPACE.with_dnr());
    let mut sqe = Sqe::new(io_opcode::WRITE, 0);
    sqe.set_nsid(7).set_cdws([0, 0, 0, 0, 0, 0]);
    let (_, result) = q.queue().submit(sqe, Transfer::ToController(vec![0; 512])).await;
    assert_status(result, Status::INVALID_NAMESPACE.with_dnr());
    // The queue is still fine.
    write(q, 1, 0, pattern(512, 9)).await;
}

#[tokio::test]
async fn lba_beyond_capacity_is_out_of_range() {
    let h = Harness::start().await;
    let host = h.connect().await;
    let q = host.io_queue(0).expect("queue 1");
    let (_, result) = q.read(1, BLOCKS - 1, vec![0; 1024]).await;
    assert_status(result, Status::LBA_OUT_OF_RANGE.with_dnr());
    let (_, result) = q.write(1, BLOCKS, vec![0; 512]).await;
    assert_status(result, Status::LBA_OUT_OF_RANGE.with_dnr());
    let (_, result) = q.write(1, BLOCKS - 8, vec![0; 64 * 1024]).await;
    assert_status(result, Status::LBA_OUT_OF_RANGE.with_dnr());
    assert_status(q.write_zeroes(1, u64::MAX - 1, 8).await, Status::LBA_OUT_OF_RANGE.with_dnr());
    // The last block itself is fine.
    write(q, 1, BLOCKS - 1, pattern(512, 3)).await;
    assert_eq!(read(q, 1, BLOCKS - 1, 512).await, pattern(512, 3));
}

#[tokio::test]
async fn connect_to_an_unknown_subsystem_is_refused() {
    let h = Harness::start().await;
    let opts = ConnectOptions { subnqn: "nqn.2026-11.io.dpu-agent:missing".into(), ..h.options() };
    let e = assert_status(Initiator::connect(h.addr, opts).await, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert!(
        matches!(e, Error::Command { dw0, .. } if dw0 == connect_ipo_iattr(connect_data_offset::SUBNQN, true)),
        "{e:?}"
    );
}

#[tokio::test]
async fn connect_from_a_host_not_allowed_is_refused() {
    let h = Harness::start().await;
    let opts = ConnectOptions { hostnqn: OTHER_HOSTNQN.into(), ..h.options() };
    assert_status(Initiator::connect(h.addr, opts).await, Status::CONNECT_INVALID_HOST.with_dnr());
    // Allowing every host lets it in.
    let mut spec = subsystem(h.addr);
    spec.allow_any_host = true;
    h.store.update("sub1", spec, None).expect("update sub1");
    h.reconcile().await;
    let opts = ConnectOptions { hostnqn: OTHER_HOSTNQN.into(), ..h.options() };
    Initiator::connect(h.addr, opts).await.expect("any host may connect now");
}

#[tokio::test]
async fn io_queue_connect_needs_the_right_controller() {
    let h = Harness::start().await;
    let host = h.connect_with(|o| o.io_queues = 1).await;
    // Grant one more I/O queue, then connect qid 2 by hand.
    host.set_features(fid::NUMBER_OF_QUEUES, number_of_queues(1, 1)).await.expect("number of queues");
    let config = QueueConfig {
        depth: 8,
        header_digest: false,
        data_digest: false,
        in_capsule_data: 8192,
        max_transfer: 256 * 1024,
        timeout: SOON,
        busy_poll: None,
    };
    let params = |qid, cntlid| ConnectParams {
        qid,
        sqsize: 7,
        cattr: 0,
        kato_ms: 0,
        hostid: HOSTID,
        cntlid,
        subnqn: SUBNQN,
        hostnqn: HOSTNQN,
    };
    let wrong = host.cntlid().wrapping_add(100);
    let queue = Queue::open(h.addr, &config).await.expect("open");
    let e = assert_status(queue.connect(&params(2, wrong)).await, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert!(
        matches!(e, Error::Command { dw0, .. } if dw0 == connect_ipo_iattr(connect_data_offset::CNTLID, true)),
        "{e:?}"
    );
    let e =
        assert_status(queue.connect(&params(2, CNTLID_DYNAMIC)).await, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert!(matches!(e, Error::Command { dw0, .. } if dw0 & 0xffff == u32::from(connect_data_offset::CNTLID)));
    // A queue id beyond what was granted, and one already connected.
    let e =
        assert_status(queue.connect(&params(3, host.cntlid())).await, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert!(matches!(e, Error::Command { dw0, .. } if dw0 == connect_ipo_iattr(connect_command_offset::QID, false)));
    assert_status(queue.connect(&params(1, host.cntlid())).await, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    // The right controller id works.
    assert_eq!(queue.connect(&params(2, host.cntlid())).await.expect("connect qid 2"), host.cntlid());
}

/// I/O running on its own queue while a test abuses other connections: counts verified round trips and
/// stops at the first failure.
struct Background {
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Background {
    fn start(q: IoQueue) -> Self {
        let (done, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (count, halt) = (done.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !halt.load(Ordering::Relaxed) {
                let lba = 8192 + (n % 64) * 16;
                let data = pattern(8192, n);
                let (_, w) = q.write(1, lba, data.clone()).await;
                w.map_err(|e| format!("background write {n}: {e}"))?;
                let (back, r) = q.read(1, lba, vec![0; 8192]).await;
                r.map_err(|e| format!("background read {n}: {e}"))?;
                if back != data {
                    return Err(format!("background read {n} returned other data"));
                }
                n += 1;
                count.store(n, Ordering::Relaxed);
            }
            Ok(())
        });
        Self { done, stop, task }
    }

    /// Waits until `more` further round trips completed.
    async fn progress(&self, more: u64) {
        let target = self.done.load(Ordering::Relaxed) + more;
        let deadline = Instant::now() + SOON;
        while self.done.load(Ordering::Relaxed) < target {
            assert!(!self.task.is_finished(), "background I/O stopped");
            assert!(Instant::now() < deadline, "background I/O made no progress");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let result = timeout(SOON, self.task).await.expect("background I/O ends").expect("background task");
        result.expect("background I/O");
    }
}

/// A hand-driven NVMe/TCP connection.
struct Raw {
    stream: TcpStream,
    decoder: Decoder,
    tx: TxOptions,
    buf: Vec<u8>,
}

impl Raw {
    async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("raw connection");
        Self {
            stream,
            decoder: Decoder::new(Direction::ControllerToHost, 1 << 20),
            tx: TxOptions::default(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw send");
    }

    /// ICReq/ICResp with the digests given.
    async fn initialize(&mut self, header_digest: bool, data_digest: bool) {
        let mut out = Vec::new();
        tcp::encode_ic_req(&mut out, 0, header_digest, data_digest, 0);
        self.send(&out).await;
        match self.recv().await {
            (PduHeader::IcResp(resp), _) => {
                assert_eq!((resp.header_digest(), resp.data_digest()), (header_digest, data_digest));
                self.decoder.header_digest = header_digest;
                self.decoder.data_digest = data_digest;
                self.tx = TxOptions { header_digest, data_digest, pda: resp.cpda() };
            }
            (other, _) => panic!("expected an ICResp, got {other:?}"),
        }
    }

    /// The next PDU and its data.
    async fn recv(&mut self) -> (PduHeader, Vec<u8>) {
        let deadline = Instant::now() + SOON;
        loop {
            match self.decoder.decode(&self.buf).expect("a well-formed PDU from the target") {
                Decoded::Frame { header, data, len } => {
                    let data = self.buf[data].to_vec();
                    self.buf.drain(..len);
                    return (header, data);
                }
                Decoded::NeedMore(_) => {
                    self.buf.reserve(64 * 1024);
                    let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                        .await
                        .expect("a PDU from the target in time")
                        .expect("raw read");
                    assert_ne!(n, 0, "the target closed the connection");
                }
            }
        }
    }

    /// Expects a C2HTermReq with `fes`/`fei`, then the connection to close.
    async fn expect_termination(&mut self, fes: FatalErrorStatus, fei: u32) {
        match self.recv().await {
            (PduHeader::C2HTermReq(t), _) => assert_eq!((t.fatal_error_status(), t.fei()), (Some(fes), fei)),
            (other, _) => panic!("expected a C2HTermReq, got {other:?}"),
        }
        let mut rest = [0u8; 1024];
        let n = timeout(SOON, self.stream.read(&mut rest)).await.expect("the target closes in time");
        assert!(matches!(n, Ok(0) | Err(_)), "the target closes the connection after its C2HTermReq: {n:?}");
    }

    /// Sends a command; `corrupt_digest` flips a bit of its data digest.
    async fn command(&mut self, sqe: &Sqe, data: &[u8], corrupt_digest: bool) {
        let mut out = Vec::new();
        encode_capsule_cmd(&mut out, sqe, data, self.tx);
        if corrupt_digest {
            let last = out.len() - 1;
            out[last] ^= 0x40;
        }
        self.send(&out).await;
    }

    /// The completion of `cid`.
    async fn completion(&mut self, cid: u16) -> Status {
        match self.recv().await {
            (PduHeader::CapsuleResp(resp), _) => {
                assert_eq!(resp.cqe().cid(), cid);
                resp.cqe().status()
            }
            (other, _) => panic!("expected a CapsuleResp, got {other:?}"),
        }
    }
}

/// A CapsuleCmd carrying a harmless Keep Alive, as a host would send it before breaking something.
fn keep_alive_pdu(opts: TxOptions) -> Vec<u8> {
    let mut out = Vec::new();
    encode_capsule_cmd(&mut out, &Sqe::new(dpu_nvme::spec::command::admin_opcode::KEEP_ALIVE, 1), &[], opts);
    out
}

/// Runs `abuse` against the target while another connection does verified I/O; `abuse` must end with the
/// target's C2HTermReq and close.
async fn only_the_bad_connection_ends(setup: impl AsyncFnOnce(&mut Raw), fes: FatalErrorStatus, fei: u32) {
    let h = Harness::start().await;
    let host = h.connect().await;
    let background = Background::start(host.io_queue(0).expect("queue 1").clone());
    background.progress(5).await;
    let mut raw = Raw::open(h.addr).await;
    setup(&mut raw).await;
    raw.expect_termination(fes, fei).await;
    // The healthy host keeps going, and new connections work.
    background.progress(20).await;
    background.finish().await;
    let q = host.io_queue(1).expect("queue 2");
    write(q, 1, 0, pattern(4096, 77)).await;
    assert_eq!(read(q, 1, 0, 4096).await, pattern(4096, 77));
    let again = h.connect().await;
    assert_eq!(read(again.io_queue(0).expect("queue 1"), 1, 0, 4096).await, pattern(4096, 77));
}

#[tokio::test]
async fn pdu_before_icreq_is_a_sequence_error() {
    only_the_bad_connection_ends(
        async |raw| raw.send(&keep_alive_pdu(TxOptions::default())).await,
        FatalErrorStatus::PduSequenceError,
        0,
    )
    .await;
}

#[tokio::test]
async fn pdu_of_the_wrong_direction_is_an_invalid_type() {
    only_the_bad_connection_ends(
        async |raw| {
            raw.initialize(false, false).await;
            let mut pdu = keep_alive_pdu(raw.tx);
            pdu[0] = tcp::PduType::CapsuleResp as u8;
            raw.send(&pdu).await;
        },
        FatalErrorStatus::InvalidHeaderField,
        tcp::ch_offset::TYPE,
    )
    .await;
}

#[tokio::test]
async fn reserved_pdu_type_is_an_invalid_type() {
    only_the_bad_connection_ends(
        async |raw| {
            raw.initialize(false, false).await;
            let mut pdu = keep_alive_pdu(raw.tx);
            pdu[0] = 0x08;
            raw.send(&pdu).await;
        },
        FatalErrorStatus::InvalidHeaderField,
        tcp::ch_offset::TYPE,
    )
    .await;
}

#[tokio::test]
async fn wrong_header_length_is_an_invalid_field() {
    only_the_bad_connection_ends(
        async |raw| {
            raw.initialize(false, false).await;
            let mut pdu = keep_alive_pdu(raw.tx);
            pdu[2] = 70;
            raw.send(&pdu).await;
        },
        FatalErrorStatus::InvalidHeaderField,
        tcp::ch_offset::HLEN,
    )
    .await;
}

#[tokio::test]
async fn header_digest_mismatch_terminates() {
    only_the_bad_connection_ends(
        async |raw| {
            raw.initialize(true, false).await;
            let mut pdu = keep_alive_pdu(raw.tx);
            assert_eq!(pdu.len(), 72 + 4);
            pdu[73] ^= 0x01;
            raw.send(&pdu).await;
        },
        FatalErrorStatus::HeaderDigestError,
        0,
    )
    .await;
}

#[tokio::test]
async fn oversized_pdu_length_exceeds_the_limit() {
    only_the_bad_connection_ends(
        async |raw| {
            raw.initialize(false, false).await;
            let mut pdu = keep_alive_pdu(raw.tx);
            pdu[3] = 72; // PDO: data follows the header...
            pdu[4..8].copy_from_slice(&(64u32 << 20).to_le_bytes()); // ...64 MiB of it.
            raw.send(&pdu).await;
        },
        FatalErrorStatus::DataTransferLimitExceeded,
        0,
    )
    .await;
}

#[tokio::test]
async fn data_digest_mismatch_fails_only_that_write() {
    let h = Harness::start().await;
    let host = h.connect_with(|o| o.io_queues = 1).await;
    let q = host.io_queue(0).expect("queue 1");
    let background = Background::start(q.clone());
    // Grant a second I/O queue and connect it by hand, with data digests.
    host.set_features(fid::NUMBER_OF_QUEUES, number_of_queues(1, 1)).await.expect("number of queues");
    let mut raw = Raw::open(h.addr).await;
    raw.initialize(false, true).await;
    let connect = ConnectCommand::new(1, 2, 31, 0, 0, SglDescriptor::in_capsule(0, 1024));
    let data = ConnectData::new(HOSTID, host.cntlid(), SUBNQN, HOSTNQN).expect("connect data");
    raw.command(connect.as_sqe(), data.as_bytes(), false).await;
    assert_eq!(raw.completion(1).await, Status::SUCCESS);

    let write_sqe = |cid: u16, lba: u32, len: u32, sgl: SglDescriptor| {
        let mut sqe = Sqe::new(io_opcode::WRITE, cid);
        sqe.set_nsid(1).set_cdws([lba, 0, len / BLOCK - 1, 0, 0, 0]).set_sgl(sgl);
        sqe
    };
    // In-capsule write with a bad data digest.
    let bad = pattern(4096, 5);
    raw.command(&write_sqe(2, 100, 4096, SglDescriptor::in_capsule(0, 4096)), &bad, true).await;
    assert_eq!(raw.completion(2).await, Status::DATA_TRANSFER_ERROR);
    // R2T write whose H2CData has a bad data digest.
    raw.command(&write_sqe(3, 200, 16384, SglDescriptor::transport(16384)), &[], false).await;
    let r2t = match raw.recv().await {
        (PduHeader::R2T(r2t), _) => r2t,
        (other, _) => panic!("expected an R2T, got {other:?}"),
    };
    assert_eq!((r2t.cccid(), r2t.r2to(), r2t.r2tl()), (3, 0, 16384));
    let data = pattern(16384, 6);
    let mut out = Vec::new();
    let pdu = DataPdu { cccid: 3, ttag: r2t.ttag(), datao: 0, datal: 16384, last: true, success: false };
    tcp::encode_h2c_data_header(&mut out, &pdu, raw.tx);
    out.extend_from_slice(&data);
    let mut digest = data_digest([data.as_slice()]);
    digest[0] ^= 1;
    out.extend_from_slice(&digest);
    raw.send(&out).await;
    assert_eq!(raw.completion(3).await, Status::DATA_TRANSFER_ERROR);

    // The connection still works: a good write lands.
    let good = pattern(4096, 7);
    raw.command(&write_sqe(4, 100, 4096, SglDescriptor::in_capsule(0, 4096)), &good, false).await;
    assert_eq!(raw.completion(4).await, Status::SUCCESS);
    assert_eq!(read(q, 1, 100, 4096).await, good);
    assert!(read(q, 1, 200, 16384).await.iter().all(|&b| b == 0), "the failed R2T write left nothing");
    background.progress(5).await;
    background.finish().await;
}

#[tokio::test]
async fn keep_alive_timeout_ends_a_silent_association() {
    let h = Harness::start().await;
    let host = h.connect_with(|o| (o.kato_ms, o.send_keep_alive) = (1000, false)).await;
    let io = host.io_queue(0).expect("queue 1").clone();
    let started = Instant::now();
    let reason = timeout(SOON, host.closed()).await.expect("the target ends the association");
    assert!(started.elapsed() >= Duration::from_millis(500), "closed after {:?}: {reason}", started.elapsed());
    assert!(reason.is_connection_lost(), "{reason}");
    timeout(SOON, io.queue().closed()).await.expect("the I/O queue goes with the admin queue");
    let (_, result) = io.read(1, 0, vec![0; 512]).await;
    assert!(result.is_err_and(|e| e.is_connection_lost()));
}

#[tokio::test]
async fn keep_alive_sent_keeps_the_association() {
    let h = Harness::start().await;
    let host = h.connect_with(|o| (o.kato_ms, o.send_keep_alive) = (1000, true)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!host.is_closed());
    let q = host.io_queue(0).expect("queue 1");
    write(q, 1, 0, pattern(512, 1)).await;
    assert_eq!(host.get_features(fid::KEEP_ALIVE_TIMER).await.expect("get features"), 1000);
}

#[tokio::test]
async fn namespace_added_raises_an_async_event() {
    let h = Harness::start().await;
    let host = h.connect().await;
    host.set_features(fid::ASYNC_EVENT_CONFIGURATION, oaes::NAMESPACE_ATTRIBUTE).await.expect("enable events");
    let pending = host.request_async_event().await.expect("asynchronous event request");

    let mut spec = subsystem(h.addr);
    spec.namespaces.insert("ns2".into(), NamespaceSpec { nsid: 2, volume: "vol2".into(), uuid: [2; 16], layer: None });
    h.store.update("sub1", spec, None).expect("update sub1");
    h.reconcile().await;

    let event = timeout(SOON, pending.wait()).await.expect("the event arrives").expect("event");
    assert_eq!(
        event,
        AsyncEvent {
            event_type: aer_type::NOTICE,
            info: aer_notice::NAMESPACE_ATTRIBUTE_CHANGED,
            log_page: lid::CHANGED_NAMESPACE_LIST
        }
    );
    assert_eq!(host.changed_namespaces().await.expect("changed namespace list"), [2]);
    assert!(host.changed_namespaces().await.expect("changed namespace list").is_empty(), "reading clears it");
    let namespaces = host.refresh_namespaces().await.expect("refresh");
    assert_eq!(namespaces.iter().map(|n| n.nsid).collect::<Vec<_>>(), [1, 2]);
    let q = host.io_queue(0).expect("queue 1");
    write(q, 2, 5, pattern(1024, 2)).await;
    assert_eq!(read(q, 2, 5, 1024).await, pattern(1024, 2));
    assert_eq!(read(q, 1, 5, 1024).await, vec![0; 1024], "namespace 1 is another volume");
}
