//! The NVMe/TCP host side: connects to a controller (ours or any other), brings it up the way the Linux host
//! does and runs pipelined I/O on one TCP connection per queue.
//!
//! ```text
//! Initiator::connect
//!   admin queue: TCP + ICReq/ICResp → Connect (qid 0, cntlid FFFFh) → Property Get CAP → Property Set CC.EN
//!                → CSTS.RDY → Identify Controller → Set Features (Number of Queues) → Identify namespaces
//!   I/O queues:  per queue TCP + ICReq/ICResp → Connect (qid n, the admin queue's cntlid)
//! IoQueue::read/write/flush/write_zeroes/deallocate → Queue::submit → slot (cid) → CapsuleCmd … completion
//! ```
//!
//! Used by the `dpu-nvme-perf` load generator and the integration tests of the target; the remote NVMe volume
//! builds on it. Buffers are owned and handed back with the result, like the volume layer's.

mod queue;

pub use crate::model::{format_uuid, random_uuid};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use dpu_nvme::spec::command::{admin_opcode, io_opcode};
use dpu_nvme::spec::fabrics::{self, CATTR_DISABLE_SQ_FLOW_CONTROL, CNTLID_DYNAMIC, DISCOVERY_NQN, PropertyCommand};
use dpu_nvme::spec::features::{fid, number_of_queues};
use dpu_nvme::spec::identify::{self, IDENTIFY_DATA_SIZE, IdentifyController, IdentifyNamespace, cns};
use dpu_nvme::spec::log::{DiscoveryLogEntry, DiscoveryLogHeader, GetLogPageArgs, lid};
use dpu_nvme::spec::properties::{self, Capabilities, shutdown};
use dpu_nvme::spec::{Cqe, Sqe, Status};
use dpu_nvme::tcp::{ADMIN_IN_CAPSULE_DATA, PduError};
use tokio::task::JoinHandle;
use zerocopy::FromBytes;

pub use queue::{CommandResult, ConnectParams, InFlight, Queue, QueueConfig, Transfer};

/// Admin queue entries (as the Linux host: 32).
const ADMIN_DEPTH: u16 = 32;
/// Largest admin transfer the host accepts in one command (log pages are read in pieces of this size).
const ADMIN_MAX_TRANSFER: usize = 256 * 1024;
/// Largest I/O transfer when the controller reports no limit (MDTS 0).
const UNLIMITED_TRANSFER: usize = 2 * 1024 * 1024;
/// CC value enabling the controller: EN, NVM command set, 4 KiB pages, round robin, 64-byte SQEs, 16-byte CQEs.
const CC_ENABLE: u32 = 1 | 6 << 16 | 4 << 20;

/// Why a host operation failed. Completions with an error status are [`Error::Command`]; [`Error::status`]
/// returns the NVMe status of any variant that has one.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The TCP connection could not be made.
    #[error("connecting to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Reading or writing the connection failed.
    #[error("the connection to {peer} failed")]
    Io {
        peer: SocketAddr,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The controller sent a malformed PDU; the host answered with an H2CTermReq and closed the connection.
    #[error("the controller at {peer} sent a malformed PDU")]
    Pdu {
        peer: SocketAddr,
        #[source]
        source: PduError,
    },
    /// The controller ended the connection with a C2HTermReq.
    #[error("the controller terminated the connection with fatal error status {fes:#04x} (information {fei:#x})")]
    Terminated { fes: u16, fei: u32 },
    /// The connection is gone; commands in flight and later ones fail with this.
    #[error("the connection is closed: {reason}")]
    Closed { reason: String },
    /// The controller completed the command with an error status.
    #[error("command {opcode:#04x} failed with {status:?} (dword 0 {dw0:#x})")]
    Command { opcode: u8, status: Status, dw0: u32 },
    /// The controller sent well-formed PDUs that make no sense here (data for a command not in flight,
    /// data outside a transfer, an unexpected PDU type).
    #[error("the controller broke the NVMe/TCP protocol: {0}")]
    Protocol(String),
    /// The data of a C2HData PDU does not match its data digest; only that command failed.
    #[error("the data digest of command {cid}'s data does not match")]
    DataDigest { cid: u16 },
    /// A step did not finish in time.
    #[error("{what} took longer than {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The NQNs or host identifier cannot be sent.
    #[error("the connect parameters are invalid")]
    Invalid(#[from] dpu_nvme::Error),
    /// I/O to a namespace this host has not identified (see [`Initiator::refresh_namespaces`]).
    #[error("namespace {nsid} is not active on this controller")]
    UnknownNamespace { nsid: u32 },
    /// A transfer larger than the controller's MDTS.
    #[error("a transfer of {len} bytes is more than the {max} the controller allows")]
    TransferTooLarge { len: usize, max: usize },
    /// A read or write buffer that is not 1 to 65536 whole blocks.
    #[error("a transfer of {len} bytes is not 1 to 65536 whole {block_size}-byte blocks")]
    Misaligned { len: usize, block_size: u32 },
    /// The controller did not come up (CSTS.CFS, or no CSTS.RDY in CAP.TO).
    #[error("the controller did not become ready: {0}")]
    NotReady(&'static str),
    /// Identify or log page data that cannot be parsed.
    #[error("the controller returned malformed {0}")]
    BadData(&'static str),
}

impl Error {
    /// The NVMe status of a failed command.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::Command { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the connection ended (every later command on it fails too).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, Self::Io { .. } | Self::Pdu { .. } | Self::Terminated { .. } | Self::Closed { .. })
    }

    fn closed(reason: impl Into<String>) -> Self {
        Self::Closed { reason: reason.into() }
    }
}

/// A buffer handed back with the outcome of the I/O that used it.
pub type BufResult = (Vec<u8>, Result<(), Error>);

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Subsystem NQN ([`DISCOVERY_NQN`] for a discovery controller).
    pub subnqn: String,
    /// Host NQN.
    pub hostnqn: String,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Ask for header digests.
    pub header_digest: bool,
    /// Ask for data digests.
    pub data_digest: bool,
    /// Keep Alive Timeout in milliseconds; 0 disables keep alive.
    pub kato_ms: u32,
    /// Send Keep Alive commands every `kato_ms / 2` (when `kato_ms` is not 0).
    pub send_keep_alive: bool,
    /// I/O queues (TCP connections) wanted; fewer are opened when the controller grants fewer.
    pub io_queues: u16,
    /// Commands in flight per I/O queue; lowered to what the controller supports (CAP.MQES + 1, MAXCMD).
    pub queue_depth: u16,
    /// Disable SQ flow control (Connect CATTR bit 2): the controller may then complete reads with the
    /// C2HData SUCCESS flag and no CapsuleResp.
    pub disable_sq_flow_control: bool,
    /// Time allowed for each connection step and admin command.
    pub timeout: Duration,
    /// Busy-poll window of the I/O queues (see [`QueueConfig::busy_poll`]); `None` sleeps in the reactor.
    pub busy_poll: Option<Duration>,
}

impl ConnectOptions {
    /// Options for `subnqn` with a fresh random host identity (UUID host NQN), one I/O queue of depth 32, no
    /// digests and no keep alive.
    pub fn new(subnqn: impl Into<String>) -> Self {
        let hostid = random_uuid();
        Self {
            subnqn: subnqn.into(),
            hostnqn: format!("{}{}", fabrics::UUID_NQN_PREFIX, format_uuid(&hostid)),
            hostid,
            header_digest: false,
            data_digest: false,
            kato_ms: 0,
            send_keep_alive: true,
            io_queues: 1,
            queue_depth: 32,
            disable_sq_flow_control: false,
            timeout: Duration::from_secs(10),
            busy_poll: None,
        }
    }
}

/// What the host knows about an active namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Capacity in blocks (NSZE).
    pub blocks: u64,
}

impl NamespaceInfo {
    /// Capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

type Namespaces = Arc<RwLock<BTreeMap<u32, NamespaceInfo>>>;

/// An asynchronous event reported by the controller (completion dword 0 of an Asynchronous Event Request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Asynchronous Event Type (bits 2:0), see [`dpu_nvme::spec::features::aer_type`].
    pub event_type: u8,
    /// Asynchronous Event Information (bits 15:8).
    pub info: u8,
    /// The log page that clears the event (bits 23:16).
    pub log_page: u8,
}

impl AsyncEvent {
    /// Decodes completion dword 0.
    pub fn from_dw0(dw0: u32) -> Self {
        Self { event_type: (dw0 & 0x7) as u8, info: (dw0 >> 8) as u8, log_page: (dw0 >> 16) as u8 }
    }
}

/// An Asynchronous Event Request the controller holds until an event occurs.
#[derive(Debug)]
pub struct PendingEvent(InFlight);

impl PendingEvent {
    /// Waits for the event.
    pub async fn wait(self) -> Result<AsyncEvent, Error> {
        let (_, result) = self.0.await;
        Ok(AsyncEvent::from_dw0(result?.dw0()))
    }
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A host connected to one controller: the admin queue and its I/O queues.
#[derive(Debug)]
pub struct Initiator {
    admin: Queue,
    io: Vec<IoQueue>,
    cntlid: u16,
    cap: Capabilities,
    identify: Box<IdentifyController>,
    namespaces: Namespaces,
    timeout: Duration,
    _keep_alive: Option<AbortOnDrop>,
}

impl Initiator {
    /// Connects to the controller at `addr` and brings it up: admin queue, controller enable, Identify,
    /// Number of Queues, the I/O queues and the active namespaces (I/O controllers only).
    pub async fn connect(addr: SocketAddr, opts: ConnectOptions) -> Result<Self, Error> {
        let span = tracing::info_span!("nvme_connect", %addr, subnqn = %opts.subnqn);
        tracing::Instrument::instrument(Self::bring_up(addr, opts), span).await
    }

    async fn bring_up(addr: SocketAddr, opts: ConnectOptions) -> Result<Self, Error> {
        let timeout = opts.timeout;
        let config = QueueConfig {
            depth: ADMIN_DEPTH,
            header_digest: opts.header_digest,
            data_digest: opts.data_digest,
            in_capsule_data: ADMIN_IN_CAPSULE_DATA as usize,
            max_transfer: ADMIN_MAX_TRANSFER,
            timeout,
            busy_poll: None,
        };
        let admin = Queue::open(addr, &config).await?;
        let cattr = if opts.disable_sq_flow_control { CATTR_DISABLE_SQ_FLOW_CONTROL } else { 0 };
        let params = ConnectParams {
            qid: 0,
            sqsize: ADMIN_DEPTH - 1,
            cattr,
            kato_ms: opts.kato_ms,
            hostid: opts.hostid,
            cntlid: CNTLID_DYNAMIC,
            subnqn: &opts.subnqn,
            hostnqn: &opts.hostnqn,
        };
        let cntlid = within(timeout, "the admin queue Connect", admin.connect(&params)).await?;
        let mut host = Self {
            admin,
            io: Vec::new(),
            cntlid,
            cap: Capabilities::default(),
            identify: Box::new(zerocopy::FromZeros::new_zeroed()),
            namespaces: Namespaces::default(),
            timeout,
            _keep_alive: None,
        };
        host.cap = Capabilities::from_bits(host.property_get(properties::CAP, true).await?);
        host.enable().await?;
        host.identify = host.identify_controller().await?;
        tracing::debug!(cntlid, cap = ?host.cap, identify = ?host.identify, "controller ready");
        if opts.kato_ms != 0 && opts.send_keep_alive {
            host._keep_alive = Some(AbortOnDrop(tokio::spawn(keep_alive(
                host.admin.downgrade(),
                Duration::from_millis(u64::from(opts.kato_ms / 2).max(1)),
                timeout,
            ))));
        }
        if host.identify.cntrltype == identify::cntrltype::DISCOVERY || opts.subnqn == DISCOVERY_NQN {
            return Ok(host);
        }
        host.refresh_namespaces().await?;
        if opts.io_queues > 0 {
            host.open_io_queues(addr, &opts, cattr).await?;
        }
        tracing::info!(cntlid, io_queues = host.io.len(), "connected");
        Ok(host)
    }

    /// CC.EN = 1, then waits for CSTS.RDY within CAP.TO.
    async fn enable(&self) -> Result<(), Error> {
        self.property_set(properties::CC, CC_ENABLE).await?;
        let limit = Duration::from_millis(500 * u64::from(self.cap.timeout_500ms.max(1)));
        let deadline = tokio::time::Instant::now() + limit;
        let mut pause = Duration::from_micros(100);
        loop {
            let csts = self.property_get(properties::CSTS, false).await?;
            if csts & 0b10 != 0 {
                return Err(Error::NotReady("the controller reports a fatal status (CSTS.CFS)"));
            }
            if csts & 1 != 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::NotReady("CSTS.RDY stayed clear for CAP.TO"));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    async fn open_io_queues(&mut self, addr: SocketAddr, opts: &ConnectOptions, cattr: u8) -> Result<(), Error> {
        let wanted = opts.io_queues.min(fabrics::CNTLID_MAX);
        let dw0 = self.set_features(fid::NUMBER_OF_QUEUES, number_of_queues(wanted - 1, wanted - 1)).await?;
        let granted = ((dw0 & 0xffff) as u16).min((dw0 >> 16) as u16).saturating_add(1);
        let count = wanted.min(granted);
        let id = &self.identify;
        let mut depth = opts.queue_depth.clamp(1, self.cap.mqes.saturating_add(1).max(2));
        if id.maxcmd.get() != 0 {
            depth = depth.min(id.maxcmd.get());
        }
        let max_transfer = match id.mdts {
            0 => UNLIMITED_TRANSFER,
            mdts => 1usize
                .checked_shl(12 + u32::from(self.cap.mpsmin) + u32::from(mdts))
                .map_or(UNLIMITED_TRANSFER, |m| m.min(UNLIMITED_TRANSFER)),
        };
        let config = QueueConfig {
            depth,
            header_digest: opts.header_digest,
            data_digest: opts.data_digest,
            in_capsule_data: (id.ioccsz.get() as usize * 16).saturating_sub(64),
            max_transfer,
            timeout: opts.timeout,
            busy_poll: opts.busy_poll,
        };
        for qid in 1..=count {
            let queue = Queue::open(addr, &config).await?;
            let params = ConnectParams {
                qid,
                sqsize: depth.saturating_sub(1).max(1),
                cattr,
                kato_ms: 0,
                hostid: opts.hostid,
                cntlid: self.cntlid,
                subnqn: &opts.subnqn,
                hostnqn: &opts.hostnqn,
            };
            within(opts.timeout, "an I/O queue Connect", queue.connect(&params)).await?;
            self.io.push(IoQueue { queue, namespaces: self.namespaces.clone() });
        }
        Ok(())
    }

    /// Controller id assigned at Connect.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// CAP as read at connect.
    pub fn capabilities(&self) -> Capabilities {
        self.cap
    }

    /// Identify Controller as read at connect.
    pub fn controller(&self) -> &IdentifyController {
        &self.identify
    }

    /// The admin queue.
    pub fn admin(&self) -> &Queue {
        &self.admin
    }

    /// The I/O queues, qid 1 first.
    pub fn io_queues(&self) -> &[IoQueue] {
        &self.io
    }

    /// The I/O queue at `index` (qid `index + 1`).
    pub fn io_queue(&self, index: usize) -> Option<&IoQueue> {
        self.io.get(index)
    }

    /// An active namespace as last identified.
    pub fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        self.namespaces.read().unwrap_or_else(PoisonError::into_inner).get(&nsid).copied()
    }

    /// Whether the admin connection has ended (the association is then gone).
    pub fn is_closed(&self) -> bool {
        self.admin.is_closed()
    }

    /// Resolves when the admin connection ends, with the reason.
    pub async fn closed(&self) -> Error {
        self.admin.closed().await
    }

    /// Runs an admin command with the connect timeout.
    async fn admin_command(&self, sqe: Sqe, transfer: Transfer) -> (Vec<u8>, Result<Cqe, Error>) {
        match tokio::time::timeout(self.timeout, self.admin.submit(sqe, transfer)).await {
            Ok(done) => done,
            Err(_) => (Vec::new(), Err(Error::Timeout { what: "an admin command", after: self.timeout })),
        }
    }

    /// Property Get of a 4- or 8-byte controller property.
    pub async fn property_get(&self, offset: u32, eight_bytes: bool) -> Result<u64, Error> {
        let sqe = *PropertyCommand::get(0, offset, eight_bytes).as_sqe();
        let (_, cqe) = self.admin_command(sqe, Transfer::None).await;
        let cqe = cqe?;
        Ok(if eight_bytes { cqe.result_u64() } else { u64::from(cqe.dw0()) })
    }

    /// Property Set of a 4-byte controller property.
    pub async fn property_set(&self, offset: u32, value: u32) -> Result<(), Error> {
        let sqe = *PropertyCommand::set(0, offset, false, u64::from(value)).as_sqe();
        self.admin_command(sqe, Transfer::None).await.1.map(drop)
    }

    async fn identify(&self, cns: u8, nsid: u32) -> Result<Vec<u8>, Error> {
        let mut sqe = Sqe::new(admin_opcode::IDENTIFY, 0);
        sqe.set_nsid(nsid).set_cdws([u32::from(cns), 0, 0, 0, 0, 0]);
        let (buf, result) = self.admin_command(sqe, Transfer::FromController(vec![0; IDENTIFY_DATA_SIZE])).await;
        result.map(|_| buf)
    }

    /// Identify Controller.
    pub async fn identify_controller(&self) -> Result<Box<IdentifyController>, Error> {
        let data = self.identify(cns::CONTROLLER, 0).await?;
        IdentifyController::read_from_bytes(&data).map(Box::new).map_err(|_| Error::BadData("Identify Controller"))
    }

    /// Identify Namespace (all zeroes for an inactive namespace id).
    pub async fn identify_namespace(&self, nsid: u32) -> Result<Box<IdentifyNamespace>, Error> {
        let data = self.identify(cns::NAMESPACE, nsid).await?;
        IdentifyNamespace::read_from_bytes(&data).map(Box::new).map_err(|_| Error::BadData("Identify Namespace"))
    }

    /// The active namespace ids, ascending.
    pub async fn active_namespaces(&self) -> Result<Vec<u32>, Error> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.identify(cns::ACTIVE_NAMESPACE_LIST, after).await?;
            let ids: Vec<u32> = page
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .take_while(|&id| id != 0)
                .collect();
            let full = ids.len() == IDENTIFY_DATA_SIZE / 4;
            match ids.last() {
                Some(&last) if full && last < u32::MAX - 1 => after = last,
                _ => {
                    all.extend(ids);
                    return Ok(all);
                }
            }
            all.extend(ids);
        }
    }

    /// Identifies the active namespaces again (after a Namespace Attribute Changed event) and returns them;
    /// the I/O queues use the new geometry from then on.
    pub async fn refresh_namespaces(&self) -> Result<Vec<NamespaceInfo>, Error> {
        let mut found = BTreeMap::new();
        for nsid in self.active_namespaces().await? {
            let ns = self.identify_namespace(nsid).await?;
            let Some(block_size) = ns.block_size() else {
                tracing::warn!(nsid, "namespace with an unusable LBA format skipped");
                continue;
            };
            found.insert(nsid, NamespaceInfo { nsid, block_size, blocks: ns.nsze.get() });
        }
        let list = found.values().copied().collect();
        *self.namespaces.write().unwrap_or_else(PoisonError::into_inner) = found;
        Ok(list)
    }

    /// Set Features; returns completion dword 0.
    pub async fn set_features(&self, fid: u8, cdw11: u32) -> Result<u32, Error> {
        let mut sqe = Sqe::new(admin_opcode::SET_FEATURES, 0);
        sqe.set_cdws([u32::from(fid), cdw11, 0, 0, 0, 0]);
        Ok(self.admin_command(sqe, Transfer::None).await.1?.dw0())
    }

    /// Get Features (current value); returns completion dword 0.
    pub async fn get_features(&self, fid: u8) -> Result<u32, Error> {
        let mut sqe = Sqe::new(admin_opcode::GET_FEATURES, 0);
        sqe.set_cdws([u32::from(fid), 0, 0, 0, 0, 0]);
        Ok(self.admin_command(sqe, Transfer::None).await.1?.dw0())
    }

    /// Keep Alive.
    pub async fn keep_alive(&self) -> Result<(), Error> {
        self.admin_command(Sqe::new(admin_opcode::KEEP_ALIVE, 0), Transfer::None).await.1.map(drop)
    }

    /// Get Log Page: `len` bytes (a multiple of 4) of log `lid` from byte `offset`, read in pieces the admin
    /// queue can carry. `rae` (Retain Asynchronous Event) keeps the event that pointed at the log pending.
    pub async fn get_log_page(&self, lid: u8, offset: u64, len: usize, rae: bool) -> Result<Vec<u8>, Error> {
        let mut page = Vec::with_capacity(len);
        while page.len() < len {
            let chunk = (len - page.len()).min(ADMIN_MAX_TRANSFER).next_multiple_of(4);
            let args = GetLogPageArgs {
                lid,
                rae,
                numd: (chunk / 4) as u64,
                lpo: offset + page.len() as u64,
                ..GetLogPageArgs::default()
            };
            let mut sqe = Sqe::new(admin_opcode::GET_LOG_PAGE, 0);
            sqe.set_nsid(u32::MAX).set_cdws(args.to_cdws());
            let (buf, result) = self.admin_command(sqe, Transfer::FromController(vec![0; chunk])).await;
            result?;
            page.extend_from_slice(&buf[..chunk.min(len - page.len())]);
        }
        Ok(page)
    }

    /// The Changed Namespace List log page (clears the Namespace Attribute Changed event).
    pub async fn changed_namespaces(&self) -> Result<Vec<u32>, Error> {
        let page = self.get_log_page(lid::CHANGED_NAMESPACE_LIST, 0, 4096, false).await?;
        Ok(page
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .take_while(|&id| id != 0)
            .collect())
    }

    /// The discovery log of a discovery controller (connect with [`DISCOVERY_NQN`]). Reads the header, then
    /// the whole log, and starts over when the generation counter changed in between.
    pub async fn discovery_log(&self) -> Result<Vec<DiscoveryLogEntry>, Error> {
        const ENTRY: usize = 1024;
        const MAX_RECORDS: u64 = 4096;
        for _ in 0..8 {
            let header = self.get_log_page(lid::DISCOVERY, 0, ENTRY, false).await?;
            let header = DiscoveryLogHeader::read_from_bytes(&header).map_err(|_| Error::BadData("discovery log"))?;
            let records = header.numrec.get();
            if records > MAX_RECORDS {
                return Err(Error::BadData("discovery log (too many records)"));
            }
            let page = self.get_log_page(lid::DISCOVERY, 0, ENTRY * (records as usize + 1), false).await?;
            let again =
                DiscoveryLogHeader::read_from_bytes(&page[..ENTRY]).map_err(|_| Error::BadData("discovery log"))?;
            if again.genctr != header.genctr || again.numrec != header.numrec {
                continue;
            }
            return page[ENTRY..]
                .chunks_exact(ENTRY)
                .map(|e| DiscoveryLogEntry::read_from_bytes(e).map_err(|_| Error::BadData("discovery log entry")))
                .collect();
        }
        Err(Error::BadData("discovery log (it kept changing while being read)"))
    }

    /// Sends an Asynchronous Event Request and returns once it is queued; the controller completes it when an
    /// enabled event occurs (enable them with Set Features, Asynchronous Event Configuration).
    pub async fn request_async_event(&self) -> Result<PendingEvent, Error> {
        let sqe = Sqe::new(admin_opcode::ASYNC_EVENT_REQUEST, 0);
        self.admin.start(sqe, Transfer::None).await.map(PendingEvent).map_err(|(_, e)| e)
    }

    /// Shuts the controller down (CC.SHN normal, waiting for CSTS.SHST complete) and closes every queue.
    pub async fn shutdown(self) -> Result<(), Error> {
        for q in &self.io {
            q.queue.close();
        }
        let cc = self.property_get(properties::CC, false).await? as u32;
        self.property_set(properties::CC, cc | u32::from(shutdown::NORMAL_OR_OCCURRING) << 14).await?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let csts = self.property_get(properties::CSTS, false).await? as u32;
            if (csts >> 2) & 0b11 == u32::from(shutdown::ABRUPT_OR_COMPLETE) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout { what: "the controller shutdown", after: self.timeout });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.admin.close();
        Ok(())
    }
}

/// Sends Keep Alive every `interval` while the admin queue exists.
async fn keep_alive(admin: queue::WeakQueue, interval: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(queue) = admin.upgrade() else { return };
        let sqe = Sqe::new(admin_opcode::KEEP_ALIVE, 0);
        match tokio::time::timeout(timeout, queue.submit(sqe, Transfer::None)).await {
            Ok((_, Ok(_))) => {}
            Ok((_, Err(e))) if e.is_connection_lost() => return,
            Ok((_, Err(e))) => tracing::warn!(error = %e, "keep alive failed"),
            Err(_) => tracing::warn!("keep alive timed out"),
        }
    }
}

async fn within<T>(
    limit: Duration,
    what: &'static str,
    step: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(limit, step).await.map_err(|_| Error::Timeout { what, after: limit })?
}

/// An I/O queue: NVM command set I/O on one connection, with the namespaces' geometry from the admin queue.
#[derive(Debug, Clone)]
pub struct IoQueue {
    queue: Queue,
    namespaces: Namespaces,
}

impl IoQueue {
    /// The underlying queue (raw commands).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.queue.qid()
    }

    /// Commands in flight at most.
    pub fn depth(&self) -> u16 {
        self.queue.depth()
    }

    fn namespace(&self, nsid: u32) -> Result<NamespaceInfo, Error> {
        self.namespaces
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&nsid)
            .copied()
            .ok_or(Error::UnknownNamespace { nsid })
    }

    /// A Read or Write of `buf.len()` bytes at `slba`.
    fn rw(&self, opcode: u8, nsid: u32, slba: u64, len: usize) -> Result<Sqe, Error> {
        let ns = self.namespace(nsid)?;
        let bs = ns.block_size as usize;
        let blocks = len / bs;
        if len == 0 || !len.is_multiple_of(bs) || blocks > 65536 {
            return Err(Error::Misaligned { len, block_size: ns.block_size });
        }
        Ok(io_sqe(opcode, nsid, slba, blocks as u32))
    }

    /// Reads `buf.len()` bytes (whole blocks) from block `slba` into `buf`.
    pub async fn read(&self, nsid: u32, slba: u64, buf: Vec<u8>) -> BufResult {
        match self.rw(io_opcode::READ, nsid, slba, buf.len()) {
            Ok(sqe) => {
                let (buf, result) = self.queue.submit(sqe, Transfer::FromController(buf)).await;
                (buf, result.map(drop))
            }
            Err(e) => (buf, Err(e)),
        }
    }

    /// Writes `buf` (whole blocks) at block `slba`: in-capsule when it fits the controller's IOCCSZ,
    /// otherwise after the controller's R2T.
    pub async fn write(&self, nsid: u32, slba: u64, buf: Vec<u8>) -> BufResult {
        match self.rw(io_opcode::WRITE, nsid, slba, buf.len()) {
            Ok(sqe) => {
                let (buf, result) = self.queue.submit(sqe, Transfer::ToController(buf)).await;
                (buf, result.map(drop))
            }
            Err(e) => (buf, Err(e)),
        }
    }

    /// Flush (`nsid` [`u32::MAX`]: every namespace).
    pub async fn flush(&self, nsid: u32) -> Result<(), Error> {
        let mut sqe = Sqe::new(io_opcode::FLUSH, 0);
        sqe.set_nsid(nsid);
        self.queue.submit(sqe, Transfer::None).await.1.map(drop)
    }

    /// Write Zeroes over `blocks` (1 to 65536) blocks from `slba`.
    pub async fn write_zeroes(&self, nsid: u32, slba: u64, blocks: u32) -> Result<(), Error> {
        if !(1..=65536).contains(&blocks) {
            return Err(Error::Misaligned { len: blocks as usize, block_size: 1 });
        }
        let sqe = io_sqe(io_opcode::WRITE_ZEROES, nsid, slba, blocks);
        self.queue.submit(sqe, Transfer::None).await.1.map(drop)
    }

    /// Dataset Management with the Deallocate attribute over `(slba, blocks)` ranges (1 to 256 of them).
    pub async fn deallocate(&self, nsid: u32, ranges: &[(u64, u32)]) -> Result<(), Error> {
        if ranges.is_empty() || ranges.len() > 256 {
            return Err(Error::Misaligned { len: ranges.len(), block_size: 16 });
        }
        let mut list = Vec::with_capacity(ranges.len() * 16);
        for &(slba, blocks) in ranges {
            list.extend_from_slice(&0u32.to_le_bytes());
            list.extend_from_slice(&blocks.to_le_bytes());
            list.extend_from_slice(&slba.to_le_bytes());
        }
        let mut sqe = Sqe::new(io_opcode::DATASET_MANAGEMENT, 0);
        // CDW10: number of ranges, 0's based; CDW11 bit 2: Attribute – Deallocate.
        sqe.set_nsid(nsid).set_cdws([ranges.len() as u32 - 1, 1 << 2, 0, 0, 0, 0]);
        self.queue.submit(sqe, Transfer::ToController(list)).await.1.map(drop)
    }
}

/// Read, Write or Write Zeroes: SLBA in CDW10-11, the 0's based block count in CDW12.
fn io_sqe(opcode: u8, nsid: u32, slba: u64, blocks: u32) -> Sqe {
    let mut sqe = Sqe::new(opcode, 0);
    sqe.set_nsid(nsid).set_cdws([slba as u32, (slba >> 32) as u32, blocks - 1, 0, 0, 0]);
    sqe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_form_and_version() {
        let id = random_uuid();
        assert_eq!(id[6] >> 4, 4);
        assert_eq!(id[8] >> 6, 0b10);
        let text = format_uuid(&id);
        assert_eq!(text.len(), 36);
        let nqn = format!("{}{text}", fabrics::UUID_NQN_PREFIX);
        fabrics::validate_nqn(&nqn).unwrap();
        assert_ne!(random_uuid(), random_uuid());
    }

    #[test]
    fn io_command_fields() {
        let sqe = io_sqe(io_opcode::READ, 3, 0x1_0000_0002, 8);
        assert_eq!((sqe.opcode(), sqe.nsid()), (io_opcode::READ, 3));
        assert_eq!(sqe.lba_range(), (0x1_0000_0002, 8));
        assert_eq!(CC_ENABLE, 0x0046_0001);
    }

    #[test]
    fn async_event_fields() {
        let e = AsyncEvent::from_dw0(0x0004_0002);
        assert_eq!((e.event_type, e.info, e.log_page), (2, 0, 4));
    }
}
