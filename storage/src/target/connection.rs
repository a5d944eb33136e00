//! One NVMe/TCP connection = one queue. The task reads PDUs, runs commands concurrently (a `FuturesUnordered`
//! of volume I/O on this task), and writes responses; completions that are ready together leave in one write.
//! A malformed PDU ends this connection only, with a C2HTermReq naming the fault.

use std::collections::HashMap;
use std::future::Future;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpu_nvme::spec::command::io_opcode;
use dpu_nvme::spec::fabrics::{self, ConnectData, fctype};
use dpu_nvme::spec::{Cqe, SglKind, Sqe, Status};
use dpu_nvme::tcp::{
    self, DataPdu, Decoded, Decoder, Direction, FatalErrorStatus, PduError, PduHeader, RecvBuffer, TxOptions,
    data_digest,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use zerocopy::FromBytes;

use super::Target;
use super::controller::{AdminOutcome, Controller, MAX_TRANSFER, QUEUE_ENTRIES};
use super::registry::Namespace;
use crate::bdev::{IoKind, Loan};

/// Largest PDU accepted: a full transfer plus headers, digests and padding.
const MAX_PDU: u32 = (MAX_TRANSFER + 4096) as u32;
/// A connection must have completed ICReq and Connect this soon after it is accepted.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

type CommandFuture = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// A finished command, ready to be sent.
struct Completion {
    cid: u16,
    status: Status,
    dw0: u32,
    dw1: u32,
    /// Data for the host (reads, Identify, log pages), sent before the completion.
    data: Option<Vec<u8>>,
    /// A buffer to return to the pool.
    spare: Option<Vec<u8>>,
}

impl Completion {
    fn status(cid: u16, status: Status) -> Self {
        Self { cid, status, dw0: 0, dw1: 0, data: None, spare: None }
    }
}

/// A write whose data arrives in H2CData PDUs after our R2T.
struct PendingWrite {
    sqe: Sqe,
    buf: Vec<u8>,
    received: usize,
}

struct Queue {
    qid: u16,
    controller: Arc<Controller>,
    sqsize: u16,
    sq_head: u16,
    sqflow_disabled: bool,
    closed: watch::Receiver<bool>,
    events: Option<mpsc::UnboundedReceiver<Cqe>>,
}

/// Serves one accepted connection until the host disconnects or the association ends.
pub async fn serve(stream: TcpStream, target: Target, local: SocketAddr, peer: SocketAddr) {
    let span = tracing::info_span!("nvme_tcp", %peer, qid = tracing::field::Empty, cntlid = tracing::field::Empty);
    let mut conn = Connection {
        stream,
        target,
        local,
        rx: RecvBuffer::new(64 * 1024),
        out: Vec::with_capacity(64 * 1024),
        out_data: Vec::new(),
        decoder: Decoder::new(Direction::HostToController, MAX_PDU),
        tx: TxOptions::default(),
        connected: false,
        queue: None,
        writes: HashMap::new(),
        next_ttag: 0,
        inflight: FuturesUnordered::new(),
        pool: Vec::new(),
        span: span.clone(),
    };
    let result = tracing::Instrument::instrument(conn.run(), span).await;
    if let Some(queue) = &conn.queue {
        queue.controller.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&queue.qid);
        if queue.qid == 0 {
            // The admin queue carries the association: without it every I/O queue of the controller ends.
            queue.controller.close(false);
            conn.target.forget_controller(queue.controller.cntlid);
        }
    }
    match result {
        Ok(()) => tracing::debug!(%peer, "NVMe/TCP connection closed"),
        Err(reason) => tracing::warn!(%peer, %reason, "NVMe/TCP connection terminated"),
    }
}

struct Connection {
    stream: TcpStream,
    target: Target,
    local: SocketAddr,
    rx: RecvBuffer,
    out: Vec<u8>,
    /// Read data that is not copied into `out`: (offset in `out` it goes before, data).
    out_data: Vec<(usize, OutData)>,
    decoder: Decoder,
    tx: TxOptions,
    /// ICReq/ICResp exchanged.
    connected: bool,
    queue: Option<Queue>,
    writes: HashMap<u16, PendingWrite>,
    next_ttag: u16,
    inflight: FuturesUnordered<CommandFuture>,
    pool: Vec<Vec<u8>>,
    span: tracing::Span,
}

/// Why a connection ends.
type Fault = String;

/// Read data written to the socket from where it is, behind the PDU header queued before it in `out`.
enum OutData {
    /// A buffer the volume filled; it returns to the pool once written.
    Owned(Vec<u8>),
    /// Blocks of a volume that lends its memory ([`crate::bdev::Volume::lend`]), taken at the time of writing:
    /// the read's completion follows its data, so the data is still the command's to send.
    Lent { ns: Arc<Namespace>, lba: u64, len: usize },
}

/// How far [`Connection::write_some`] got.
enum Written {
    All,
    /// The socket takes no more for now.
    Blocked,
    /// A volume's blocks are being written just now: they are read into buffers instead.
    Busy,
}

/// Most iovecs one `writev` takes (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Read data from this size on is written from its own buffer instead of being copied behind its header: below
/// it, the copy costs less than another iovec and the buffer's trip through the pool.
const ZERO_COPY_MIN: usize = 4096;

impl Connection {
    async fn run(&mut self) -> Result<(), Fault> {
        let mut keep_alive = tokio::time::interval(Duration::from_millis(500));
        let accepted = Instant::now();
        let mut closing = self.target.closing();
        loop {
            let stopping = *closing.borrow_and_update();
            if !stopping {
                self.process_input()?;
            }
            self.flush().await?;
            if stopping && self.inflight.is_empty() {
                return self.close_gracefully().await;
            }
            let mut closed = self.queue.as_ref().map(|q| q.closed.clone());
            let events = self.queue.as_mut().and_then(|q| q.events.as_mut());
            tokio::select! {
                // Handing over: no new command is read; the running ones finish.
                Ok(()) = closing.changed(), if !stopping => {}
                read = self.stream.read(&mut self.rx.data[self.rx.end..]), if !stopping => match read {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        self.rx.end += n;
                        // Under poll mode `always`, NVMe/TCP traffic keeps the workers polling within the
                        // window, as proxy traffic does.
                        dpu_intent::poll::moved_always();
                    }
                    Err(e) => return Err(format!("reading: {e}")),
                },
                Some(done) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.complete(done);
                    // Gather whatever else finished, so it leaves in the same write.
                    while let Some(Some(done)) = futures_util::FutureExt::now_or_never(self.inflight.next()) {
                        self.complete(done);
                    }
                }
                Some(cqe) = recv_event(events) => self.respond(cqe.cid(), cqe.status(), cqe.dw0(), cqe.dw1()),
                () = association_ended(closed.as_mut()) => return Err("the controller association ended".into()),
                _ = keep_alive.tick() => {
                    if self.queue.is_none() && accepted.elapsed() > CONNECT_DEADLINE {
                        return Err(format!("no Connect within {} s", CONNECT_DEADLINE.as_secs()));
                    }
                    if let Some(q) = &self.queue
                        && q.qid == 0
                        && q.controller.keep_alive_expired()
                    {
                        q.controller.close(true);
                        return Err(format!("keep-alive timeout of {} ms expired", q.controller.kato_ms()));
                    }
                }
            }
        }
    }

    /// Ends the connection as the target stops serving, once its completions are written: FIN after them, then whatever the
    /// host still sends is read and dropped until it closes (closing with unread bytes would reset the
    /// connection and could discard completions not yet on the wire).
    async fn close_gracefully(&mut self) -> Result<(), Fault> {
        tracing::info!(pending_writes = self.writes.len(), "NVMe/TCP connection closed: the target stops serving");
        let _ = self.stream.shutdown().await;
        let mut scratch = [0u8; 4096];
        let drained = async { while let Ok(1..) = self.stream.read(&mut scratch).await {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
        Ok(())
    }

    /// Writes what is queued: PDU headers and small data from `out`, large read data from its own buffers or lent
    /// by its volume, in order, with as few `writev`s as the socket allows.
    async fn flush(&mut self) -> Result<(), Fault> {
        if self.out_data.is_empty() {
            if !self.out.is_empty() {
                self.stream.write_all(&self.out).await.map_err(|e| format!("writing: {e}"))?;
                self.out.clear();
            }
            return Ok(());
        }
        let mut sent = 0;
        loop {
            match self.write_some(&mut sent)? {
                Written::All => break,
                Written::Blocked => self.stream.writable().await.map_err(|e| format!("writing: {e}"))?,
                Written::Busy => self.read_lent().await?,
            }
        }
        self.out.clear();
        for (_, data) in self.out_data.drain(..) {
            if let OutData::Owned(buf) = data {
                self.pool.push(buf);
            }
        }
        Ok(())
    }

    /// Writes what the socket takes now of the queued output from byte `sent` on, without waiting. Lent blocks
    /// are borrowed for this one attempt only.
    #[inline(never)]
    fn write_some(&self, sent: &mut usize) -> Result<Written, Fault> {
        let mut loans: Vec<Box<dyn Loan + '_>> = Vec::new();
        for (_, data) in &self.out_data {
            if let OutData::Lent { ns, lba, len } = data {
                match ns.volume.lend(*lba, *len) {
                    Some(loan) => loans.push(loan),
                    None => return Ok(Written::Busy),
                }
            }
        }
        let mut slices = Vec::with_capacity(self.out_data.len() * 3 + 1);
        let mut loans = loans.iter();
        let mut from = 0;
        for (at, data) in &self.out_data {
            slices.push(IoSlice::new(&self.out[from..*at]));
            match data {
                OutData::Owned(buf) => slices.push(IoSlice::new(buf)),
                // One loan was taken per lent entry, in order.
                OutData::Lent { .. } => loans.next().into_iter().for_each(|loan| loan.slices(&mut slices)),
            }
            from = *at;
        }
        slices.push(IoSlice::new(&self.out[from..]));
        slices.retain(|s| !s.is_empty());
        let mut rest = &mut slices[..];
        IoSlice::advance_slices(&mut rest, *sent);
        while !rest.is_empty() {
            let batch = rest.len().min(MAX_IOVECS);
            match self.stream.try_write_vectored(&rest[..batch]) {
                Ok(0) => return Err("writing: the connection accepts no more data".into()),
                Ok(n) => {
                    *sent += n;
                    IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Written::Blocked),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("writing: {e}")),
            }
        }
        Ok(Written::All)
    }

    /// Reads lent blocks into buffers of ours, for a write that found them busy.
    #[inline(never)]
    async fn read_lent(&mut self) -> Result<(), Fault> {
        for i in 0..self.out_data.len() {
            let OutData::Lent { ns, lba, len } = &self.out_data[i].1 else { continue };
            let (ns, lba, len) = (ns.clone(), *lba, *len);
            let buf = self.buffer(len);
            let (buf, result) = ns.volume.read(lba, buf).await;
            result.map_err(|e| format!("reading blocks {lba}.. of namespace {}: {e}", ns.nsid))?;
            self.out_data[i].1 = OutData::Owned(buf);
        }
        Ok(())
    }

    /// Handles every complete PDU in the receive buffer.
    fn process_input(&mut self) -> Result<(), Fault> {
        loop {
            let decoded = self.decoder.decode(&self.rx.data[self.rx.start..self.rx.end]);
            match decoded {
                Ok(Decoded::NeedMore(n)) => {
                    self.rx.make_room(n);
                    return Ok(());
                }
                Ok(Decoded::Frame { header, data, len }) => {
                    let data = self.rx.start + data.start..self.rx.start + data.end;
                    self.handle(header, data)?;
                    self.rx.start += len;
                }
                Err(PduError::DataDigest { cccid, len, .. }) => {
                    // The PDU is intact but its data is not: fail that command, keep the connection.
                    tracing::warn!(cid = cccid, "data digest mismatch");
                    self.writes.retain(|_, w| w.sqe.cid() != cccid);
                    self.respond(cccid, Status::DATA_TRANSFER_ERROR, 0, 0);
                    self.rx.start += len;
                }
                Err(e) => {
                    return Err(self.terminate(
                        e.fes().unwrap_or(FatalErrorStatus::InvalidHeaderField),
                        e.fei(),
                        &e.to_string(),
                    ));
                }
            }
        }
    }

    /// Queues a C2HTermReq quoting the offending header; the caller closes the connection after the flush.
    fn terminate(&mut self, fes: FatalErrorStatus, fei: u32, reason: &str) -> Fault {
        let offending = tcp::offending_header(&self.rx.data[self.rx.start..self.rx.end]).to_vec();
        // The completions queued so far go first, as one buffer for the single best-effort write; if lent blocks
        // are busy they stay unsent (the host retries those commands on its next connection).
        if !self.out_data.is_empty() {
            let mut flat = Some(Vec::with_capacity(self.out.len()));
            let mut from = 0;
            for (at, data) in self.out_data.drain(..) {
                let Some(out) = flat.as_mut() else { break };
                out.extend_from_slice(&self.out[from..at]);
                match data {
                    OutData::Owned(buf) => out.extend_from_slice(&buf),
                    OutData::Lent { ns, lba, len } => match ns.volume.lend(lba, len) {
                        Some(loan) => {
                            let mut slices = Vec::new();
                            loan.slices(&mut slices);
                            slices.iter().for_each(|s| out.extend_from_slice(s));
                        }
                        None => flat = None,
                    },
                }
                from = at;
            }
            self.out = flat
                .map(|mut out| {
                    out.extend_from_slice(&self.out[from..]);
                    out
                })
                .unwrap_or_default();
        }
        tcp::encode_term_req(&mut self.out, Direction::ControllerToHost, fes, fei, &offending);
        // Best effort: the connection is going away either way.
        let _ = self.stream.try_write(&self.out);
        self.out.clear();
        format!("terminated ({fes:?}): {reason}")
    }

    fn handle(&mut self, header: PduHeader, data: std::ops::Range<usize>) -> Result<(), Fault> {
        match header {
            PduHeader::IcReq(req) => {
                if self.connected {
                    return Err(self.terminate(FatalErrorStatus::PduSequenceError, 0, "second ICReq"));
                }
                if req.pfv() != tcp::PFV_1_0 {
                    return Err(self.terminate(
                        FatalErrorStatus::InvalidHeaderField,
                        8,
                        "unsupported PDU format version",
                    ));
                }
                let (hdgst, ddgst) = (req.header_digest(), req.data_digest());
                tcp::encode_ic_resp(&mut self.out, 0, hdgst, ddgst, MAX_TRANSFER as u32);
                self.decoder.header_digest = hdgst;
                self.decoder.data_digest = ddgst;
                self.tx = TxOptions { header_digest: hdgst, data_digest: ddgst, pda: req.hpda() };
                self.connected = true;
                Ok(())
            }
            _ if !self.connected => Err(self.terminate(FatalErrorStatus::PduSequenceError, 0, "PDU before ICReq")),
            PduHeader::CapsuleCmd(cmd) => {
                let sqe = *cmd.sqe();
                self.command(sqe, data)
            }
            PduHeader::H2CData(h) => self.h2c_data(h.cccid(), h.ttag(), h.datao(), data),
            PduHeader::H2CTermReq(t) => Err(format!("host terminated the connection (FES {:#x})", t.fes())),
            other => Err(self.terminate(
                FatalErrorStatus::InvalidHeaderField,
                0,
                &format!("unexpected {:?}", other.pdu_type()),
            )),
        }
    }

    /// Takes a buffer of `len` bytes from the pool.
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn command(&mut self, sqe: Sqe, data: std::ops::Range<usize>) -> Result<(), Fault> {
        let cid = sqe.cid();
        let outstanding = self.inflight.len() + self.writes.len();
        if let Some(q) = &mut self.queue {
            // The host may not have more commands outstanding than the queue holds; one that does is broken.
            if outstanding > usize::from(q.sqsize) {
                let sqsize = q.sqsize;
                return Err(self.terminate(
                    FatalErrorStatus::PduSequenceError,
                    0,
                    &format!("more than {} commands outstanding", sqsize + 1),
                ));
            }
            q.sq_head = (q.sq_head + 1) % (q.sqsize + 1);
            q.controller.touch();
        }
        if sqe.is_fabrics() {
            return self.fabrics(sqe, data);
        }
        let Some(queue) = &self.queue else {
            self.respond(cid, Status::COMMAND_SEQUENCE_ERROR.with_dnr(), 0, 0);
            return Ok(());
        };
        if queue.qid == 0 {
            let controller = queue.controller.clone();
            match controller.admin(&sqe) {
                AdminOutcome::Reply { status, dw0, dw1, data: reply } => {
                    let wanted = match sqe.sgl().kind() {
                        SglKind::Transport { length } => length as usize,
                        _ => 0,
                    };
                    let mut reply = reply;
                    reply.truncate(wanted);
                    let data = (!reply.is_empty() && status.is_success()).then_some(reply);
                    self.complete(Completion { cid, status, dw0, dw1, data, spare: None });
                }
                AdminOutcome::Deferred => {}
            }
            return Ok(());
        }
        if !queue.controller.ready() {
            self.respond(cid, Status::COMMAND_SEQUENCE_ERROR, 0, 0);
            return Ok(());
        }
        self.io(sqe, data);
        Ok(())
    }

    fn fabrics(&mut self, sqe: Sqe, data: std::ops::Range<usize>) -> Result<(), Fault> {
        let cid = sqe.cid();
        match sqe.fctype() {
            fctype::CONNECT if self.queue.is_none() => {
                let (status, dw0) = self.connect(&sqe, data);
                self.respond(cid, status, dw0, 0);
            }
            fctype::PROPERTY_GET | fctype::PROPERTY_SET => match &self.queue {
                Some(q) if q.qid == 0 => {
                    if let AdminOutcome::Reply { status, dw0, dw1, .. } = q.controller.property(&sqe) {
                        self.respond(cid, status, dw0, dw1);
                    }
                }
                _ => self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0, 0),
            },
            fctype::DISCONNECT => {
                self.respond(cid, Status::SUCCESS, 0, 0);
                if let Some(q) = &self.queue {
                    q.controller.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&q.qid);
                }
            }
            _ => self.respond(cid, Status::INVALID_OPCODE.with_dnr(), 0, 0),
        }
        Ok(())
    }

    /// A Connect command: creates the controller (admin queue) or joins one (I/O queue).
    fn connect(&mut self, sqe: &Sqe, data: std::ops::Range<usize>) -> (Status, u32) {
        let connect = sqe.as_connect();
        let invalid = |offset: u16, in_data: bool| {
            (Status::CONNECT_INVALID_PARAMETERS.with_dnr(), fabrics::connect_ipo_iattr(offset, in_data))
        };
        let Ok(params) = ConnectData::read_from_bytes(&self.rx.data[data.clone()]) else {
            return (Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0);
        };
        let (Some(subnqn), Some(hostnqn)) = (params.subnqn(), params.hostnqn()) else {
            return invalid(fabrics::connect_data_offset::SUBNQN, true);
        };
        if connect.recfmt() != 0 {
            return (Status::CONNECT_INCOMPATIBLE_FORMAT.with_dnr(), 0);
        }
        if connect.sqsize() == 0 || connect.sqsize() >= QUEUE_ENTRIES {
            return invalid(fabrics::connect_command_offset::SQSIZE, false);
        }
        let qid = connect.qid();
        let (controller, events) = if qid == 0 {
            let subsystem = if subnqn == fabrics::DISCOVERY_NQN {
                None
            } else {
                match self.target.registry().by_nqn(subnqn) {
                    Some(s) if s.allows(hostnqn) => Some(s),
                    Some(_) => {
                        tracing::warn!(%subnqn, %hostnqn, "connect refused: host not allowed");
                        return (
                            Status::CONNECT_INVALID_HOST.with_dnr(),
                            fabrics::connect_ipo_iattr(fabrics::connect_data_offset::HOSTNQN, true),
                        );
                    }
                    None => {
                        tracing::warn!(%subnqn, %hostnqn, "connect refused: unknown subsystem");
                        return invalid(fabrics::connect_data_offset::SUBNQN, true);
                    }
                }
            };
            if params.cntlid() != fabrics::CNTLID_DYNAMIC {
                return invalid(fabrics::connect_data_offset::CNTLID, true);
            }
            let cntlid = self.target.registry().allocate_cntlid();
            let (controller, events) = Controller::new(
                cntlid,
                hostnqn.to_owned(),
                params.hostid,
                subsystem,
                self.target.clone(),
                self.local,
                connect.kato_ms(),
            );
            controller.touch();
            self.target.remember_controller(&controller);
            tracing::info!(cntlid, %subnqn, %hostnqn, kato_ms = connect.kato_ms(), "controller created");
            (controller, Some(events))
        } else {
            let Some(controller) = self.target.controller(params.cntlid()) else {
                return invalid(fabrics::connect_data_offset::CNTLID, true);
            };
            let same_subsystem = controller.subsystem.as_ref().is_some_and(|s| s.nqn == subnqn);
            if !same_subsystem || controller.host_nqn != hostnqn {
                return invalid(fabrics::connect_data_offset::HOSTNQN, true);
            }
            // Every queue of an association comes from the same host: its Host Identifier must match too.
            if controller.host_id != params.hostid {
                return invalid(fabrics::connect_data_offset::HOSTID, true);
            }
            if !controller.ready() || qid > controller.io_queues() {
                return invalid(fabrics::connect_command_offset::QID, false);
            }
            if !controller.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(qid) {
                return invalid(fabrics::connect_command_offset::QID, false);
            }
            (controller, None)
        };
        self.queue = Some(Queue {
            qid,
            controller: controller.clone(),
            sqsize: connect.sqsize(),
            sq_head: 1,
            sqflow_disabled: connect.cattr() & fabrics::CATTR_DISABLE_SQ_FLOW_CONTROL != 0,
            closed: controller.closed(),
            events,
        });
        self.span.record("qid", qid);
        self.span.record("cntlid", controller.cntlid);
        (Status::SUCCESS, fabrics::connect_success_dw0(controller.cntlid, 0))
    }

    /// Starts an I/O command.
    fn io(&mut self, sqe: Sqe, data: std::ops::Range<usize>) {
        let cid = sqe.cid();
        let Some(queue) = &self.queue else { return };
        let subsystem = queue.controller.subsystem.clone();
        let namespace = subsystem.as_ref().and_then(|s| s.namespace(sqe.nsid()));
        let opcode = sqe.opcode();
        if opcode == io_opcode::FLUSH && sqe.nsid() == u32::MAX {
            let namespaces = subsystem.map(|s| s.namespaces()).unwrap_or_default();
            self.inflight.push(Box::pin(async move {
                for ns in namespaces {
                    if ns.volume.flush().await.is_err() {
                        return Completion::status(cid, Status::INTERNAL_ERROR);
                    }
                }
                Completion::status(cid, Status::SUCCESS)
            }));
            return;
        }
        let Some(ns) = namespace else {
            self.respond(cid, Status::INVALID_NAMESPACE.with_dnr(), 0, 0);
            return;
        };
        let geometry = ns.volume.geometry();
        let bs = geometry.block_size as usize;
        match opcode {
            io_opcode::READ | io_opcode::WRITE => {
                let (slba, nlb) = sqe.lba_range();
                let len = nlb as usize * bs;
                if slba.checked_add(u64::from(nlb)).is_none_or(|end| end > geometry.blocks) {
                    self.respond(cid, Status::LBA_OUT_OF_RANGE.with_dnr(), 0, 0);
                    return;
                }
                if len > MAX_TRANSFER {
                    self.respond(cid, Status::INVALID_FIELD.with_dnr(), 0, 0);
                    return;
                }
                let sgl = sqe.sgl().kind();
                let sgl_len = match sgl {
                    SglKind::Transport { length } | SglKind::InCapsule { length, .. } => length as usize,
                    _ => {
                        self.respond(cid, Status::SGL_DESCRIPTOR_TYPE_INVALID.with_dnr(), 0, 0);
                        return;
                    }
                };
                if sgl_len != len {
                    self.respond(cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0, 0);
                    return;
                }
                if opcode == io_opcode::READ {
                    if len >= ZERO_COPY_MIN && !self.tx.data_digest && ns.volume.lends() {
                        // In memory: the data goes from the volume to the socket with the next write.
                        ns.stats.record(IoKind::Read, len as u64, 0, true);
                        self.queue_data((cid, Status::SUCCESS, 0, 0), OutData::Lent { ns, lba: slba, len }, len);
                        return;
                    }
                    let buf = self.buffer(len);
                    self.inflight.push(Box::pin(read(ns, cid, slba, buf)));
                    return;
                }
                match sgl {
                    SglKind::InCapsule { offset, .. } => {
                        let from = data.start + offset as usize;
                        if offset != 0 || from + len > data.end {
                            self.respond(cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0, 0);
                            return;
                        }
                        let mut buf = self.buffer(len);
                        buf.copy_from_slice(&self.rx.data[from..from + len]);
                        self.inflight.push(Box::pin(write(ns, cid, slba, buf)));
                    }
                    _ => self.request_data(sqe, len),
                }
            }
            io_opcode::FLUSH => self.inflight.push(Box::pin(async move {
                let started = Instant::now();
                let ok = ns.volume.flush().await.is_ok();
                ns.stats.record(IoKind::Flush, 0, started.elapsed().as_micros() as u64, ok);
                Completion::status(cid, if ok { Status::SUCCESS } else { Status::INTERNAL_ERROR })
            })),
            io_opcode::WRITE_ZEROES => {
                let (slba, nlb) = sqe.lba_range();
                if slba.checked_add(u64::from(nlb)).is_none_or(|end| end > geometry.blocks) {
                    self.respond(cid, Status::LBA_OUT_OF_RANGE.with_dnr(), 0, 0);
                    return;
                }
                self.inflight.push(Box::pin(async move {
                    let ok = ns.volume.write_zeroes(slba, u64::from(nlb)).await.is_ok();
                    Completion::status(cid, if ok { Status::SUCCESS } else { Status::INTERNAL_ERROR })
                }));
            }
            io_opcode::DATASET_MANAGEMENT => {
                // The range list: NR + 1 ranges of 16 bytes. Hosts may describe a larger buffer (Linux can send a
                // whole page); only the ranges are read.
                let len = ((sqe.cdw10() & 0xff) as usize + 1) * 16;
                match sqe.sgl().kind() {
                    SglKind::InCapsule { offset: 0, length } if length as usize >= len && data.len() >= len => {
                        let mut list = self.buffer(len);
                        list.copy_from_slice(&self.rx.data[data.start..data.start + len]);
                        self.inflight.push(Box::pin(deallocate(ns, sqe, list)));
                    }
                    SglKind::Transport { length } if length as usize >= len && length as usize <= MAX_TRANSFER => {
                        self.request_data(sqe, length as usize);
                    }
                    _ => self.respond(cid, Status::DATA_SGL_LENGTH_INVALID.with_dnr(), 0, 0),
                }
            }
            _ => self.respond(cid, Status::INVALID_OPCODE.with_dnr(), 0, 0),
        }
    }

    /// Sends an R2T for a command's data.
    fn request_data(&mut self, sqe: Sqe, len: usize) {
        let ttag = self.next_ttag;
        self.next_ttag = self.next_ttag.wrapping_add(1);
        let buf = self.buffer(len);
        self.writes.insert(ttag, PendingWrite { sqe, buf, received: 0 });
        tcp::encode_r2t(&mut self.out, sqe.cid(), ttag, 0, len as u32, self.tx);
    }

    fn h2c_data(&mut self, cid: u16, ttag: u16, offset: u32, data: std::ops::Range<usize>) -> Result<(), Fault> {
        let Some(pending) = self.writes.get_mut(&ttag).filter(|w| w.sqe.cid() == cid) else {
            return Err(self.terminate(
                FatalErrorStatus::InvalidHeaderField,
                10,
                "H2CData for an unknown transfer tag",
            ));
        };
        let offset = offset as usize;
        if offset != pending.received || offset + data.len() > pending.buf.len() {
            return Err(self.terminate(FatalErrorStatus::DataTransferOutOfRange, 0, "H2CData outside the R2T"));
        }
        pending.buf[offset..offset + data.len()].copy_from_slice(&self.rx.data[data.clone()]);
        pending.received += data.len();
        if pending.received < pending.buf.len() {
            return Ok(());
        }
        let Some(PendingWrite { sqe, buf, .. }) = self.writes.remove(&ttag) else { return Ok(()) };
        let Some(ns) = self.queue.as_ref().and_then(|q| q.controller.subsystem.as_ref()?.namespace(sqe.nsid())) else {
            self.respond(cid, Status::INVALID_NAMESPACE.with_dnr(), 0, 0);
            return Ok(());
        };
        if sqe.opcode() == io_opcode::DATASET_MANAGEMENT {
            self.inflight.push(Box::pin(deallocate(ns, sqe, buf)));
        } else {
            let (slba, _) = sqe.lba_range();
            self.inflight.push(Box::pin(write(ns, cid, slba, buf)));
        }
        Ok(())
    }

    fn complete(&mut self, done: Completion) {
        if let Some(spare) = done.spare {
            self.pool.push(spare);
        }
        match done.data {
            Some(data) if done.status.is_success() => {
                let len = data.len();
                let cqe = (done.cid, done.status, done.dw0, done.dw1);
                self.queue_data(cqe, OutData::Owned(data), len);
            }
            data => {
                if let Some(buf) = data {
                    self.pool.push(buf);
                }
                self.respond(done.cid, done.status, done.dw0, done.dw1);
            }
        }
    }

    /// Queues a successful command's data for the host (a C2HData PDU) and its completion `(cid, status, dw0,
    /// dw1)`: the PDU's SUCCESS flag stands for a plain completion when the host disabled SQ flow control, else a
    /// CapsuleResp follows.
    #[inline(never)]
    fn queue_data(&mut self, (cid, status, dw0, dw1): (u16, Status, u32, u32), data: OutData, len: usize) {
        let success = self.queue.as_ref().is_some_and(|q| q.sqflow_disabled) && dw0 == 0 && dw1 == 0;
        let pdu = DataPdu { cccid: cid, ttag: 0, datao: 0, datal: len as u32, last: true, success };
        tcp::encode_c2h_data_header(&mut self.out, &pdu, self.tx);
        match data {
            OutData::Owned(buf) => {
                let digest = self.tx.data_digest.then(|| data_digest([buf.as_slice()]));
                if len >= ZERO_COPY_MIN {
                    // Leaves from the volume's buffer (writev), and the buffer returns to the pool after.
                    self.out_data.push((self.out.len(), OutData::Owned(buf)));
                } else {
                    self.out.extend_from_slice(&buf);
                    self.pool.push(buf);
                }
                if let Some(digest) = digest {
                    self.out.extend_from_slice(&digest);
                }
            }
            // Lent only without data digests.
            lent @ OutData::Lent { .. } => self.out_data.push((self.out.len(), lent)),
        }
        if !success {
            self.respond(cid, status, dw0, dw1);
        }
    }

    /// Queues a CapsuleResp.
    fn respond(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) {
        let (qid, head) = self.queue.as_ref().map_or((0, 0), |q| (q.qid, q.sq_head));
        let cqe = Cqe::new(cid, qid, head, status, dw0, dw1);
        tcp::encode_capsule_resp(&mut self.out, &cqe, self.tx);
    }
}

/// Resolves when the controller's association is torn down; never before a Connect.
async fn association_ended(closed: Option<&mut watch::Receiver<bool>>) {
    match closed {
        // An error means the controller is gone, which ends the association too.
        Some(rx) => drop(rx.wait_for(|c| *c).await),
        None => std::future::pending().await,
    }
}

async fn recv_event(events: Option<&mut mpsc::UnboundedReceiver<Cqe>>) -> Option<Cqe> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn volume_status(e: &crate::bdev::VolumeError) -> Status {
    match e {
        crate::bdev::VolumeError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE.with_dnr(),
        crate::bdev::VolumeError::Misaligned { .. } => Status::INVALID_FIELD.with_dnr(),
        crate::bdev::VolumeError::Io(_) => Status::INTERNAL_ERROR,
        crate::bdev::VolumeError::ReadOnly => Status::NAMESPACE_WRITE_PROTECTED.with_dnr(),
        // Retrying cannot help sooner than the volume's own deadline did: fail at once, the host sees EIO.
        crate::bdev::VolumeError::Unavailable(_) => Status::UNRECOVERED_READ_ERROR.with_dnr(),
    }
}

async fn read(ns: Arc<Namespace>, cid: u16, slba: u64, buf: Vec<u8>) -> Completion {
    let started = Instant::now();
    let len = buf.len() as u64;
    let (buf, result) = ns.volume.read(slba, buf).await;
    ns.stats.record(IoKind::Read, len, started.elapsed().as_micros() as u64, result.is_ok());
    match result {
        Ok(()) => Completion { cid, status: Status::SUCCESS, dw0: 0, dw1: 0, data: Some(buf), spare: None },
        Err(e) => {
            tracing::warn!(nsid = ns.nsid, slba, error = %e, "read failed");
            Completion { cid, status: volume_status(&e), dw0: 0, dw1: 0, data: None, spare: Some(buf) }
        }
    }
}

async fn write(ns: Arc<Namespace>, cid: u16, slba: u64, buf: Vec<u8>) -> Completion {
    let started = Instant::now();
    let len = buf.len() as u64;
    let (buf, result) = ns.volume.write(slba, buf).await;
    ns.stats.record(IoKind::Write, len, started.elapsed().as_micros() as u64, result.is_ok());
    let status = match &result {
        Ok(()) => Status::SUCCESS,
        Err(e) => {
            tracing::warn!(nsid = ns.nsid, slba, error = %e, "write failed");
            volume_status(e)
        }
    };
    Completion { cid, status, dw0: 0, dw1: 0, data: None, spare: Some(buf) }
}

/// Dataset Management: with the Deallocate attribute, discards every range in the list.
async fn deallocate(ns: Arc<Namespace>, sqe: Sqe, list: Vec<u8>) -> Completion {
    let cid = sqe.cid();
    let deallocate = sqe.cdw11() & (1 << 2) != 0;
    let ranges = (sqe.cdw10() & 0xff) as usize + 1;
    if deallocate {
        let started = Instant::now();
        for range in list.chunks_exact(16).take(ranges) {
            let blocks = u32::from_le_bytes([range[4], range[5], range[6], range[7]]);
            let slba = u64::from_le_bytes([
                range[8], range[9], range[10], range[11], range[12], range[13], range[14], range[15],
            ]);
            if let Err(e) = ns.volume.discard(slba, u64::from(blocks)).await {
                ns.stats.record(IoKind::Discard, 0, started.elapsed().as_micros() as u64, false);
                return Completion { cid, status: volume_status(&e), dw0: 0, dw1: 0, data: None, spare: Some(list) };
            }
        }
        ns.stats.record(IoKind::Discard, 0, started.elapsed().as_micros() as u64, true);
    }
    Completion { cid, status: Status::SUCCESS, dw0: 0, dw1: 0, data: None, spare: Some(list) }
}
