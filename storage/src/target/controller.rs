//! A controller: what one host association sees. It owns the controller registers (CC/CSTS), negotiated
//! features, keep-alive state and asynchronous events, and executes admin commands. I/O and discovery
//! controllers share this type; a discovery controller has no subsystem.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dpu_nvme::spec::features::{aer_notice, aer_type, fid, number_of_queues};
use dpu_nvme::spec::identify::{self, IdentifyController, IdentifyNamespace, NsIdDescriptor, cns};
use dpu_nvme::spec::log::{self, DiscoveryLogEntry, SmartLog, TcpDiscoveryEntry, lid};
use dpu_nvme::spec::properties::{self, Capabilities, ControllerConfig, ControllerStatus, shutdown};
use dpu_nvme::spec::{Cqe, Sqe, Status, command::admin_opcode};
use tokio::sync::{mpsc, watch};
use zerocopy::{FromZeros, IntoBytes};

use super::Target;
use super::registry::{EventSink, Subsystem};
use crate::model::MAX_NSID;

/// Largest transfer: 2^MDTS pages of 4 KiB.
pub const MDTS: u8 = 6;
/// Largest transfer in bytes.
pub const MAX_TRANSFER: usize = 4096 << MDTS;
/// Entries per queue the controller supports (CAP.MQES is this minus one).
pub const QUEUE_ENTRIES: u16 = 128;
/// In-capsule data the I/O queues accept, in bytes.
pub const IN_CAPSULE_DATA: usize = 8192;
/// I/O queues a host may create.
pub const MAX_IO_QUEUES: u16 = 64;
/// Outstanding Asynchronous Event Requests accepted (AERL + 1).
const AER_LIMIT: usize = 4;

/// The result of an admin command.
#[derive(Debug)]
pub enum AdminOutcome {
    /// Complete now with `status`/`dw0`, sending `data` to the host first (truncated to what it asked for).
    Reply { status: Status, dw0: u32, dw1: u32, data: Vec<u8> },
    /// An Asynchronous Event Request: completed later through the controller's event channel.
    Deferred,
}

impl AdminOutcome {
    fn status(status: Status) -> Self {
        Self::Reply { status, dw0: 0, dw1: 0, data: Vec::new() }
    }
    fn ok(dw0: u32) -> Self {
        Self::Reply { status: Status::SUCCESS, dw0, dw1: 0, data: Vec::new() }
    }
    fn data(data: Vec<u8>) -> Self {
        Self::Reply { status: Status::SUCCESS, dw0: 0, dw1: 0, data }
    }
}

#[derive(Debug, Default)]
struct Events {
    /// Command ids of outstanding Asynchronous Event Requests.
    waiting: VecDeque<u16>,
    /// Completion dword 0 of events not yet reported.
    pending: VecDeque<u32>,
    /// Namespaces changed since the host last read the Changed Namespace List.
    changed: BTreeSet<u32>,
    /// A namespace-attribute event was reported and the log page not read yet (events of a type are masked
    /// until the host reads the log).
    masked: bool,
}

/// One host association.
#[derive(Debug)]
pub struct Controller {
    pub cntlid: u16,
    pub host_nqn: String,
    pub host_id: [u8; 16],
    /// `None` for the discovery controller.
    pub subsystem: Option<Arc<Subsystem>>,
    target: Target,
    /// The address the admin queue's connection arrived on (reported by discovery).
    local: SocketAddr,
    cc: AtomicU32,
    csts: AtomicU32,
    kato_ms: AtomicU32,
    aec: AtomicU32,
    io_queues: AtomicU16,
    /// Milliseconds since `epoch` of the last command on any queue.
    last_command_ms: AtomicU64,
    epoch: Instant,
    events: Mutex<Events>,
    event_tx: mpsc::UnboundedSender<Cqe>,
    closed_tx: watch::Sender<bool>,
    /// Queues connected, the admin queue included.
    pub queues: Mutex<BTreeSet<u16>>,
    fatal: AtomicBool,
}

impl Controller {
    /// A new controller for an admin queue connection. Returns it with the receiver of asynchronous event
    /// completions, which the admin queue sends.
    pub fn new(
        cntlid: u16,
        host_nqn: String,
        host_id: [u8; 16],
        subsystem: Option<Arc<Subsystem>>,
        target: Target,
        local: SocketAddr,
        kato_ms: u32,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Cqe>) {
        let (event_tx, event_rx) = mpsc::unbounded_channel();
        let controller = Arc::new(Self {
            cntlid,
            host_nqn,
            host_id,
            subsystem,
            target,
            local,
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            kato_ms: AtomicU32::new(kato_ms),
            aec: AtomicU32::new(0),
            io_queues: AtomicU16::new(0),
            last_command_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            events: Mutex::new(Events::default()),
            event_tx,
            closed_tx: watch::channel(false).0,
            queues: Mutex::new(BTreeSet::from([0])),
            fatal: AtomicBool::new(false),
        });
        if let Some(subsystem) = &controller.subsystem {
            let sink: Arc<dyn EventSink> = controller.clone();
            subsystem.attach(Arc::downgrade(&sink));
        }
        (controller, event_rx)
    }

    /// True for the discovery controller.
    pub fn is_discovery(&self) -> bool {
        self.subsystem.is_none()
    }

    /// The controller is enabled and ready (CSTS.RDY).
    pub fn ready(&self) -> bool {
        self.csts.load(Ordering::Acquire) & 1 != 0
    }

    /// I/O queues granted by Set Features (Number of Queues).
    pub fn io_queues(&self) -> u16 {
        self.io_queues.load(Ordering::Acquire)
    }

    /// Resets the keep-alive timer (any command counts: the controller advertises traffic-based keep alive).
    pub fn touch(&self) {
        self.last_command_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// True when the keep-alive timeout has passed without a command.
    pub fn keep_alive_expired(&self) -> bool {
        let kato = u64::from(self.kato_ms.load(Ordering::Relaxed));
        kato != 0
            && (self.epoch.elapsed().as_millis() as u64).saturating_sub(self.last_command_ms.load(Ordering::Relaxed))
                > kato
    }

    /// Keep-alive timeout in milliseconds (0 = disabled).
    pub fn kato_ms(&self) -> u32 {
        self.kato_ms.load(Ordering::Relaxed)
    }

    /// Tears the association down: every queue of this controller closes.
    pub fn close(&self, fatal: bool) {
        if fatal {
            self.fatal.store(true, Ordering::Release);
            let csts = ControllerStatus { rdy: false, cfs: true, shst: 0 }.to_bits();
            self.csts.store(csts, Ordering::Release);
        }
        self.closed_tx.send_replace(true);
    }

    /// Resolves when the association is torn down.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed_tx.subscribe()
    }

    fn capabilities() -> u64 {
        Capabilities {
            mqes: QUEUE_ENTRIES - 1,
            cqr: true,
            timeout_500ms: 30,
            dstrd: 0,
            css_nvm: true,
            css_io_command_sets: false,
            mpsmin: 0,
            mpsmax: 0,
        }
        .to_bits()
    }

    fn property_get(&self, offset: u32) -> Option<u64> {
        Some(match offset {
            properties::CAP => Self::capabilities(),
            properties::VS => u64::from(properties::version(1, 3, 0)),
            properties::CC => u64::from(self.cc.load(Ordering::Acquire)),
            properties::CSTS => u64::from(self.csts.load(Ordering::Acquire)),
            _ => return None,
        })
    }

    fn property_set(&self, offset: u32, value: u64) -> Status {
        if offset != properties::CC {
            return Status::INVALID_FIELD;
        }
        let cc = ControllerConfig(value as u32);
        let old = ControllerConfig(self.cc.swap(cc.0, Ordering::AcqRel));
        let mut csts = ControllerStatus { rdy: self.ready(), cfs: self.fatal.load(Ordering::Acquire), shst: 0 };
        if cc.shn() != shutdown::NONE {
            // Nothing is cached in the controller itself: shutdown completes at once.
            csts.shst = shutdown::ABRUPT_OR_COMPLETE;
            csts.rdy = cc.en();
        } else if cc.en() && !old.en() {
            if cc.mps() != 0 || cc.iosqes() != 6 || cc.iocqes() != 4 {
                tracing::warn!(cntlid = self.cntlid, cc = cc.0, "CC enable with unsupported page or entry sizes");
                csts.cfs = true;
            } else {
                csts.rdy = true;
            }
        } else if !cc.en() {
            csts.rdy = false;
        }
        self.csts.store(csts.to_bits(), Ordering::Release);
        Status::SUCCESS
    }

    /// Executes a Property Get or Set (fabrics commands on the admin queue).
    pub fn property(&self, sqe: &Sqe) -> AdminOutcome {
        let p = sqe_property(sqe);
        match p {
            Property::Get { offset, eight } => match self.property_get(offset) {
                Some(v) if eight || offset != properties::CAP => AdminOutcome::Reply {
                    status: Status::SUCCESS,
                    dw0: v as u32,
                    dw1: (v >> 32) as u32,
                    data: Vec::new(),
                },
                _ => AdminOutcome::status(Status::INVALID_FIELD),
            },
            Property::Set { offset, value } => AdminOutcome::status(self.property_set(offset, value)),
            Property::Invalid => AdminOutcome::status(Status::INVALID_FIELD),
        }
    }

    /// Executes one admin command (`data` is its in-capsule data, if any).
    pub fn admin(&self, sqe: &Sqe) -> AdminOutcome {
        self.touch();
        match sqe.opcode() {
            admin_opcode::IDENTIFY => self.identify(sqe),
            admin_opcode::GET_LOG_PAGE => self.get_log_page(sqe),
            admin_opcode::SET_FEATURES => self.set_features(sqe),
            admin_opcode::GET_FEATURES => self.get_features(sqe),
            admin_opcode::KEEP_ALIVE => AdminOutcome::ok(0),
            admin_opcode::ASYNC_EVENT_REQUEST => self.async_event_request(sqe.cid()),
            // Commands complete quickly here; report "not aborted" (dword 0 bit 0 set).
            admin_opcode::ABORT => AdminOutcome::ok(1),
            _ => AdminOutcome::status(Status::INVALID_OPCODE),
        }
    }

    fn identify(&self, sqe: &Sqe) -> AdminOutcome {
        let args = sqe.identify();
        match args.cns {
            cns::CONTROLLER => AdminOutcome::data(self.identify_controller().as_bytes().to_vec()),
            _ if self.is_discovery() => AdminOutcome::status(Status::INVALID_FIELD),
            cns::NAMESPACE => match self.subsystem.as_ref().and_then(|s| s.namespace(args.nsid)) {
                Some(ns) => AdminOutcome::data(
                    identify_namespace(ns.volume.geometry(), ns.volume.read_only(), &ns.uuid).as_bytes().to_vec(),
                ),
                // An allocated-but-inactive or out-of-range NSID reads as zeroes / Invalid Namespace.
                None if (1..=MAX_NSID).contains(&args.nsid) => {
                    AdminOutcome::data(vec![0; identify::IDENTIFY_DATA_SIZE])
                }
                None => AdminOutcome::status(Status::INVALID_NAMESPACE.with_dnr()),
            },
            cns::ACTIVE_NAMESPACE_LIST => {
                let nsids = self.subsystem.as_ref().map(|s| s.nsids()).unwrap_or_default();
                AdminOutcome::data(identify::active_namespace_list(&nsids, args.nsid).to_vec())
            }
            // I/O command set specific structures of the NVM command set (CSI 0): no limits beyond the generic
            // ones, which an all-zero structure says.
            cns::CS_CONTROLLER | cns::CS_NAMESPACE if args.csi == 0 => {
                AdminOutcome::data(vec![0; identify::IDENTIFY_DATA_SIZE])
            }
            cns::NAMESPACE_ID_DESCRIPTORS => match self.subsystem.as_ref().and_then(|s| s.namespace(args.nsid)) {
                Some(ns) => AdminOutcome::data(
                    identify::ns_id_descriptor_list(&[NsIdDescriptor::Nguid(ns.uuid), NsIdDescriptor::Uuid(ns.uuid)])
                        .to_vec(),
                ),
                None => AdminOutcome::status(Status::INVALID_NAMESPACE.with_dnr()),
            },
            _ => AdminOutcome::status(Status::INVALID_FIELD.with_dnr()),
        }
    }

    fn identify_controller(&self) -> IdentifyController {
        let mut id = IdentifyController::new_zeroed();
        let (serial, model, nqn) = match &self.subsystem {
            Some(s) => (s.serial.as_str(), s.model.as_str(), s.nqn.as_str()),
            None => ("discovery", "dpu-agent discovery", dpu_nvme::spec::fabrics::DISCOVERY_NQN),
        };
        // The values were validated when the intent was accepted; a failure here leaves the field blank.
        let _ = id.set_sn(serial);
        let _ = id.set_mn(model);
        let _ = id.set_fr(&env!("CARGO_PKG_VERSION").chars().take(8).collect::<String>());
        let _ = id.set_subnqn(nqn);
        id.rab = 6;
        id.cmic = identify::cmic::MULTI_CONTROLLER;
        id.mdts = MDTS;
        id.cntlid.set(self.cntlid);
        id.ver.set(properties::version(1, 3, 0));
        id.oaes.set(if self.is_discovery() { 0 } else { identify::oaes::NAMESPACE_ATTRIBUTE });
        id.ctratt.set(identify::ctratt::HOST_ID_128 | identify::ctratt::TBKAS);
        id.cntrltype = if self.is_discovery() { identify::cntrltype::DISCOVERY } else { identify::cntrltype::IO };
        id.acl = 3;
        id.aerl = (AER_LIMIT - 1) as u8;
        id.frmw = 0b11;
        id.lpa = identify::lpa::EXTENDED_DATA;
        id.kas.set(1);
        id.sqes = 0x66;
        id.cqes = 0x44;
        id.maxcmd.set(QUEUE_ENTRIES);
        id.nn.set(MAX_NSID);
        id.oncs.set(identify::oncs::DATASET_MANAGEMENT | identify::oncs::WRITE_ZEROES);
        id.vwc = identify::VWC_PRESENT;
        id.sgls.set(identify::sgls::SUPPORTED | identify::sgls::OFFSET_ADDRESS);
        id.ioccsz.set(((64 + IN_CAPSULE_DATA) / 16) as u32);
        id.iorcsz.set(1);
        id.msdbd = 1;
        // OFCS bit 0: the Disconnect command is supported.
        id.ofcs.set(1);
        id
    }

    fn get_log_page(&self, sqe: &Sqe) -> AdminOutcome {
        let args = sqe.get_log_page();
        let page: Vec<u8> = match args.lid {
            lid::ERROR_INFORMATION => vec![0; 64],
            lid::SMART_HEALTH => {
                let mut smart = SmartLog::new_zeroed();
                smart.composite_temperature.set(273 + 40);
                smart.available_spare = 100;
                smart.available_spare_threshold = 10;
                smart.as_bytes().to_vec()
            }
            lid::FIRMWARE_SLOT => vec![0; 512],
            lid::CHANGED_NAMESPACE_LIST if !self.is_discovery() => {
                let mut events = self.lock_events();
                let changed: Vec<u32> = std::mem::take(&mut events.changed).into_iter().collect();
                if !args.rae {
                    events.masked = false;
                }
                log::changed_namespace_list(&changed).to_vec()
            }
            lid::DISCOVERY if self.is_discovery() => self.discovery_log(),
            _ => return AdminOutcome::status(Status::INVALID_LOG_PAGE.with_dnr()),
        };
        let start = usize::try_from(args.lpo).unwrap_or(usize::MAX).min(page.len());
        let len = usize::try_from(args.len_bytes()).unwrap_or(usize::MAX).min(page.len() - start);
        AdminOutcome::data(page[start..start + len].to_vec())
    }

    /// Discovery log: every subsystem this host may connect to, once per address it is exported on.
    fn discovery_log(&self) -> Vec<u8> {
        let mut entries = Vec::new();
        for (portid, subsystem) in self.target.registry().all().into_iter().enumerate() {
            if !subsystem.allows(&self.host_nqn) {
                continue;
            }
            for address in subsystem.listeners() {
                // A wildcard listener is reported with the address this host reached us on.
                let ip = if address.ip().is_unspecified() { self.local.ip() } else { address.ip() };
                let traddr = ip.to_string();
                let trsvcid = address.port().to_string();
                let entry = TcpDiscoveryEntry {
                    adrfam: if ip.is_ipv4() { log::adrfam::IPV4 } else { log::adrfam::IPV6 },
                    subtype: log::subtype::NVME,
                    treq: log::treq::SECURE_CHANNEL_NOT_REQUIRED | log::treq::SQ_FLOW_CONTROL_DISABLE_SUPPORTED,
                    portid: portid as u16,
                    cntlid: dpu_nvme::spec::fabrics::CNTLID_DYNAMIC,
                    asqsz: QUEUE_ENTRIES,
                    eflags: 0,
                    trsvcid: &trsvcid,
                    traddr: &traddr,
                    subnqn: &subsystem.nqn,
                    sectype: log::sectype::NONE,
                };
                match DiscoveryLogEntry::tcp(&entry) {
                    Ok(e) => entries.push(e),
                    Err(e) => tracing::warn!(nqn = %subsystem.nqn, error = %e, "discovery entry skipped"),
                }
            }
        }
        let mut out = Vec::new();
        log::write_discovery_log(&mut out, self.target.discovery_generation(), &entries);
        out
    }

    fn set_features(&self, sqe: &Sqe) -> AdminOutcome {
        let f = sqe.feature();
        match f.fid {
            fid::NUMBER_OF_QUEUES => {
                let nsq = (f.cdw11 & 0xffff) as u16;
                let ncq = (f.cdw11 >> 16) as u16;
                if nsq == 0xffff || ncq == 0xffff {
                    return AdminOutcome::status(Status::INVALID_FIELD.with_dnr());
                }
                let granted = nsq.min(ncq).min(MAX_IO_QUEUES - 1);
                self.io_queues.store(granted + 1, Ordering::Release);
                AdminOutcome::ok(number_of_queues(granted, granted))
            }
            fid::ASYNC_EVENT_CONFIGURATION => {
                self.aec.store(f.cdw11, Ordering::Release);
                AdminOutcome::ok(0)
            }
            fid::KEEP_ALIVE_TIMER => {
                self.kato_ms.store(f.cdw11, Ordering::Release);
                AdminOutcome::ok(0)
            }
            fid::VOLATILE_WRITE_CACHE => AdminOutcome::ok(0),
            _ => AdminOutcome::status(Status::INVALID_FIELD.with_dnr()),
        }
    }

    fn get_features(&self, sqe: &Sqe) -> AdminOutcome {
        let f = sqe.feature();
        match f.fid {
            fid::NUMBER_OF_QUEUES => {
                let n = self.io_queues().max(1) - 1;
                AdminOutcome::ok(number_of_queues(n, n))
            }
            fid::ASYNC_EVENT_CONFIGURATION => AdminOutcome::ok(self.aec.load(Ordering::Acquire)),
            fid::KEEP_ALIVE_TIMER => AdminOutcome::ok(self.kato_ms()),
            fid::VOLATILE_WRITE_CACHE => AdminOutcome::ok(1),
            _ => AdminOutcome::status(Status::INVALID_FIELD.with_dnr()),
        }
    }

    fn lock_events(&self) -> std::sync::MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn async_event_request(&self, cid: u16) -> AdminOutcome {
        let mut events = self.lock_events();
        if events.waiting.len() >= AER_LIMIT {
            return AdminOutcome::status(Status::ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED);
        }
        events.waiting.push_back(cid);
        self.deliver(&mut events);
        AdminOutcome::Deferred
    }

    /// Completes waiting requests with pending events.
    fn deliver(&self, events: &mut Events) {
        while !events.pending.is_empty() && !events.waiting.is_empty() {
            let (Some(dw0), Some(cid)) = (events.pending.pop_front(), events.waiting.pop_front()) else { break };
            // The admin queue may be gone; then the event is moot.
            let _ = self.event_tx.send(Cqe::new(cid, 0, 0, Status::SUCCESS, dw0, 0));
        }
    }
}

impl EventSink for Controller {
    fn namespaces_changed(&self, nsids: &[u32]) {
        let mut events = self.lock_events();
        events.changed.extend(nsids);
        let enabled = self.aec.load(Ordering::Acquire) & identify::oaes::NAMESPACE_ATTRIBUTE != 0;
        if enabled && !events.masked {
            events.masked = true;
            let dw0 = u32::from(aer_type::NOTICE)
                | u32::from(aer_notice::NAMESPACE_ATTRIBUTE_CHANGED) << 8
                | u32::from(lid::CHANGED_NAMESPACE_LIST) << 16;
            events.pending.push_back(dw0);
            self.deliver(&mut events);
        }
    }
}

/// Identify Namespace for a volume of `geometry`.
fn identify_namespace(geometry: crate::bdev::Geometry, read_only: bool, uuid: &[u8; 16]) -> IdentifyNamespace {
    let mut ns = IdentifyNamespace::new_zeroed();
    // Write protected: the host's block layer marks the disk read-only.
    ns.nsattr = u8::from(read_only);
    ns.nsze.set(geometry.blocks);
    ns.ncap.set(geometry.blocks);
    ns.nuse.set(geometry.blocks);
    ns.nsfeat = identify::nsfeat::THIN_PROVISIONING;
    // Deallocated blocks read as zeroes; Write Zeroes may deallocate.
    ns.dlfeat = 0b1001;
    ns.nguid = *uuid;
    ns.lbaf[0].lbads = geometry.block_size.trailing_zeros() as u8;
    ns
}

enum Property {
    Get { offset: u32, eight: bool },
    Set { offset: u32, value: u64 },
    Invalid,
}

fn sqe_property(sqe: &Sqe) -> Property {
    let p = sqe.as_property();
    match (p.fctype(), p.size()) {
        (dpu_nvme::spec::fabrics::fctype::PROPERTY_GET, Some(size)) => {
            Property::Get { offset: p.offset(), eight: size == 8 }
        }
        (dpu_nvme::spec::fabrics::fctype::PROPERTY_SET, Some(_)) => {
            Property::Set { offset: p.offset(), value: p.value() }
        }
        _ => Property::Invalid,
    }
}
