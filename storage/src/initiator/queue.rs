//! One NVMe/TCP connection = one host queue, with many commands in flight.
//!
//! ```text
//! callers ── submit: take a command slot (cid), encode the capsule into `out`, wake the writer
//! writer task ── swaps `out` for an empty buffer and writes it: commands submitted together leave in one write
//! reader task ── frames PDUs, and for each: CapsuleResp → complete the slot; C2HData → copy into the slot's
//!                buffer (SUCCESS flag: complete); R2T → encode H2CData from the slot's buffer into `out`
//! ```
//!
//! Slots are preallocated (one per queue entry) and completion is signalled through the slot's waker, so the
//! steady state allocates nothing per command. Buffers are owned: they move into the slot at submission and
//! come back with the result, which keeps a dropped caller future sound (its slot stays busy until the
//! controller answers; the answer is then discarded).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use dpu_nvme::spec::fabrics::{ConnectCommand, ConnectData};
use dpu_nvme::spec::{Cqe, SglDescriptor, Sqe, Status};
use dpu_nvme::tcp::{
    self, DataPdu, Decoded, Decoder, Direction, FatalErrorStatus, PduError, PduHeader, RecvBuffer, TxOptions,
    data_digest, flags,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, Semaphore, watch};
use zerocopy::IntoBytes;

use super::Error;

/// Initial receive buffer; it grows to the largest PDU seen.
const RECV_BUFFER: usize = 256 * 1024;
/// Room for a data PDU's header, digests and padding beyond its data.
const PDU_OVERHEAD: usize = 4096;

/// How to open a queue's connection.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Commands in flight at most (command slots); 1 to 65535.
    pub depth: u16,
    /// Ask for header digests.
    pub header_digest: bool,
    /// Ask for data digests.
    pub data_digest: bool,
    /// Largest in-capsule data the controller accepts on this queue (admin and Fabrics commands: 8 KiB; I/O
    /// queues: IOCCSZ × 16 − 64). Longer writes use R2T/H2CData.
    pub in_capsule_data: usize,
    /// Largest data transfer of one command (MDTS); bounds the PDUs accepted from the controller.
    pub max_transfer: usize,
    /// Time allowed for the TCP connection and the ICReq/ICResp exchange.
    pub timeout: Duration,
    /// Busy-poll the socket for this long after the last data before sleeping in the reactor: trades a core
    /// for the latency of a sleep and wakeup per response. `None` never polls.
    pub busy_poll: Option<Duration>,
}

/// The data a command moves.
#[derive(Debug)]
pub enum Transfer {
    /// No data.
    None,
    /// Host to controller: in-capsule when it fits, otherwise after the controller's R2T.
    ToController(Vec<u8>),
    /// Controller to host: the buffer's length is the transfer length; C2HData fills it.
    FromController(Vec<u8>),
}

/// A buffer handed back with the outcome of the command that used it (empty for [`Transfer::None`]).
pub type CommandResult = (Vec<u8>, Result<Cqe, Error>);

/// The parameters of a Fabrics Connect.
#[derive(Debug, Clone)]
pub struct ConnectParams<'a> {
    /// Queue id: 0 for the admin queue.
    pub qid: u16,
    /// Submission queue size, 0's based.
    pub sqsize: u16,
    /// Connect Attributes (bit 2: disable SQ flow control).
    pub cattr: u8,
    /// Keep Alive Timeout in milliseconds (admin queue only).
    pub kato_ms: u32,
    /// Host identifier.
    pub hostid: [u8; 16],
    /// [`dpu_nvme::spec::fabrics::CNTLID_DYNAMIC`] on the admin queue, the admin queue's controller id on I/O
    /// queues.
    pub cntlid: u16,
    /// Subsystem NQN.
    pub subnqn: &'a str,
    /// Host NQN.
    pub hostnqn: &'a str,
}

/// Which data a slot still expects to move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Flow {
    /// None, or it went in-capsule.
    #[default]
    None,
    /// Data waits for the controller's R2T.
    ToController,
    /// C2HData fills the buffer.
    FromController,
}

/// One command slot; the index is the command id.
#[derive(Debug, Default)]
struct Slot {
    busy: bool,
    opcode: u8,
    flow: Flow,
    buf: Vec<u8>,
    /// C2HData bytes received so far.
    received: usize,
    waker: Option<Waker>,
    done: Option<Result<Cqe, Error>>,
    /// An error to report when the CapsuleResp arrives (a data digest mismatch in C2HData).
    error: Option<Error>,
    /// The caller's future was dropped: free the slot on completion.
    abandoned: bool,
}

#[derive(Debug)]
struct State {
    /// Bytes for the writer task.
    out: Vec<u8>,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    /// Why the connection ended; set once, by the reader task.
    closed: Option<Error>,
}

#[derive(Debug)]
struct Shared {
    peer: SocketAddr,
    /// Set by a successful Connect.
    qid: std::sync::atomic::AtomicU16,
    tx: TxOptions,
    maxh2cdata: usize,
    in_capsule_data: usize,
    max_transfer: usize,
    depth: u16,
    state: Mutex<State>,
    /// Wakes the writer task: `out` has bytes, or the connection closed.
    writer: Notify,
    /// Asks the reader task to close the connection.
    shutdown: Notify,
    /// Free slots.
    permits: Semaphore,
    closed_tx: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn qid(&self) -> u16 {
        self.qid.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Frees a slot whose result was taken or is no longer wanted.
    fn release(&self, st: &mut State, cid: u16) {
        st.slots[usize::from(cid)] = Slot::default();
        st.free.push(cid);
        self.permits.add_permits(1);
    }

    /// Completes `cid` (the reader task calls this); returns its waker.
    fn complete(&self, st: &mut State, cid: u16, result: Result<Cqe, Error>) -> Option<Waker> {
        let slot = &mut st.slots[usize::from(cid)];
        let result = match slot.error.take() {
            Some(e) => Err(e),
            None => result,
        };
        if slot.abandoned {
            self.release(st, cid);
            return None;
        }
        slot.done = Some(result);
        slot.waker.take()
    }

    /// Ends the connection: fails every command in flight and every later submission with `reason`.
    fn close(&self, reason: Error) {
        let wakers: Vec<Waker> = {
            let mut st = self.lock();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(reason.clone());
            let busy: Vec<u16> = st
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.busy && s.done.is_none())
                .map(|(i, _)| i as u16)
                .collect();
            busy.into_iter().filter_map(|cid| self.complete(&mut st, cid, Err(reason.clone()))).collect()
        };
        self.permits.close();
        self.writer.notify_one();
        self.closed_tx.send_replace(true);
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// Closes the connection when the last handle goes.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.notify_one();
    }
}

/// A host queue over one NVMe/TCP connection; cheap to clone. The connection closes when the last clone is
/// dropped, when [`Queue::close`] is called, or when the controller ends it.
#[derive(Debug, Clone)]
pub struct Queue {
    handle: Arc<Handle>,
}

/// A weak reference to a [`Queue`] that does not keep its connection open.
#[derive(Debug, Clone)]
pub(crate) struct WeakQueue(std::sync::Weak<Handle>);

impl WeakQueue {
    pub(crate) fn upgrade(&self) -> Option<Queue> {
        self.0.upgrade().map(|handle| Queue { handle })
    }
}

impl Queue {
    /// Connects to `addr` and exchanges ICReq/ICResp. The queue is not associated with a controller until
    /// [`Queue::connect`].
    pub async fn open(addr: SocketAddr, config: &QueueConfig) -> Result<Self, Error> {
        let timeout = |what| Error::Timeout { what, after: config.timeout };
        let mut stream = tokio::time::timeout(config.timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timeout("the TCP connection"))?
            .map_err(|e| Error::Connect { addr, source: Arc::new(e) })?;
        stream.set_nodelay(true).map_err(|e| Error::io(addr, e))?;

        let mut out = Vec::with_capacity(128);
        tcp::encode_ic_req(&mut out, 0, config.header_digest, config.data_digest, 0);
        stream.write_all(&out).await.map_err(|e| Error::io(addr, e))?;
        let mut rbuf = vec![0u8; RECV_BUFFER];
        let max_pdu = config.max_transfer.saturating_add(PDU_OVERHEAD).min(u32::MAX as usize) as u32;
        let mut decoder = Decoder::new(Direction::ControllerToHost, max_pdu);
        let (resp, used, end) =
            tokio::time::timeout(config.timeout, read_ic_resp(&mut stream, addr, &decoder, &mut rbuf))
                .await
                .map_err(|_| timeout("the ICReq/ICResp exchange"))??;
        decoder.header_digest = resp.header_digest();
        decoder.data_digest = resp.data_digest();
        let tx = TxOptions { header_digest: resp.header_digest(), data_digest: resp.data_digest(), pda: resp.cpda() };
        tracing::debug!(%addr, ?resp, "NVMe/TCP connection initialized");

        let depth = config.depth.max(1);
        let shared = Arc::new(Shared {
            peer: addr,
            qid: std::sync::atomic::AtomicU16::new(0),
            tx,
            maxh2cdata: resp.maxh2cdata() as usize,
            in_capsule_data: config.in_capsule_data,
            max_transfer: config.max_transfer,
            depth,
            state: Mutex::new(State {
                out: Vec::with_capacity(64 * 1024),
                slots: (0..depth).map(|_| Slot::default()).collect(),
                free: (0..depth).rev().collect(),
                closed: None,
            }),
            writer: Notify::new(),
            shutdown: Notify::new(),
            permits: Semaphore::new(usize::from(depth)),
            closed_tx: watch::channel(false).0,
        });
        let (rd, wr) = stream.into_split();
        let span = tracing::debug_span!("nvme_host", peer = %addr);
        tokio::spawn(tracing::Instrument::instrument(
            Reader {
                shared: shared.clone(),
                rd,
                decoder,
                rx: RecvBuffer { data: rbuf, start: used, end },
                wake: Vec::new(),
                poll: config.busy_poll,
            }
            .run(),
            span.clone(),
        ));
        tokio::spawn(tracing::Instrument::instrument(writer(shared.clone(), wr), span));
        Ok(Self { handle: Arc::new(Handle { shared }) })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    pub(crate) fn downgrade(&self) -> WeakQueue {
        WeakQueue(Arc::downgrade(&self.handle))
    }

    /// Fabrics Connect: associates this queue with a controller. Returns the controller id.
    pub async fn connect(&self, params: &ConnectParams<'_>) -> Result<u16, Error> {
        let data = ConnectData::new(params.hostid, params.cntlid, params.subnqn, params.hostnqn)?;
        let cmd = ConnectCommand::new(
            0,
            params.qid,
            params.sqsize,
            params.cattr,
            params.kato_ms,
            SglDescriptor::transport(0),
        );
        let (_, result) = self.submit(*cmd.as_sqe(), Transfer::ToController(data.as_bytes().to_vec())).await;
        let cqe = result?;
        self.shared().qid.store(params.qid, std::sync::atomic::Ordering::Relaxed);
        Ok((cqe.dw0() & 0xffff) as u16)
    }

    /// The queue id given at Connect (0 before).
    pub fn qid(&self) -> u16 {
        self.shared().qid()
    }

    /// Commands in flight at most.
    pub fn depth(&self) -> u16 {
        self.shared().depth
    }

    /// The controller's address.
    pub fn peer(&self) -> SocketAddr {
        self.shared().peer
    }

    /// Largest data transfer of one command.
    pub fn max_transfer(&self) -> usize {
        self.shared().max_transfer
    }

    /// The digests in use (header, data) as negotiated by ICReq/ICResp.
    pub fn digests(&self) -> (bool, bool) {
        let tx = self.shared().tx;
        (tx.header_digest, tx.data_digest)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.shared().closed_tx.borrow()
    }

    /// Resolves when the connection ends, with the reason.
    pub async fn closed(&self) -> Error {
        let mut rx = self.shared().closed_tx.subscribe();
        // The sender lives in `Shared`, which `self` keeps alive: `wait_for` cannot fail.
        let _ = rx.wait_for(|closed| *closed).await;
        self.shared().lock().closed.clone().unwrap_or_else(|| Error::closed("the connection closed"))
    }

    /// Closes the connection; commands in flight fail.
    pub fn close(&self) {
        self.shared().shutdown.notify_one();
    }

    /// Sends a command and waits for its completion. The queue sets the command id and the data pointer (SGL)
    /// from `transfer`. A completion with an error status is [`Error::Command`].
    pub async fn submit(&self, sqe: Sqe, transfer: Transfer) -> CommandResult {
        match self.start(sqe, transfer).await {
            Ok(inflight) => inflight.await,
            Err((buf, e)) => (buf, Err(e)),
        }
    }

    /// Sends a command and returns once it is queued for sending; the returned future resolves with the
    /// completion. Dropping it abandons the command (its slot is reused once the controller answers).
    pub async fn start(&self, mut sqe: Sqe, transfer: Transfer) -> Result<InFlight, (Vec<u8>, Error)> {
        let shared = self.shared();
        let (dir, buf) = match transfer {
            Transfer::None => (Flow::None, Vec::new()),
            Transfer::ToController(buf) if buf.is_empty() => (Flow::None, buf),
            Transfer::ToController(buf) => (Flow::ToController, buf),
            Transfer::FromController(buf) => (Flow::FromController, buf),
        };
        if buf.len() > shared.max_transfer || buf.len() > u32::MAX as usize {
            let e = Error::TransferTooLarge { len: buf.len(), max: shared.max_transfer };
            return Err((buf, e));
        }
        let permit = match shared.permits.try_acquire() {
            Ok(p) => p,
            Err(_) => match shared.permits.acquire().await {
                Ok(p) => p,
                Err(_) => {
                    let e = shared.lock().closed.clone().unwrap_or_else(|| Error::closed("the connection closed"));
                    return Err((buf, e));
                }
            },
        };
        permit.forget();
        let len = buf.len() as u32;
        let mut st = shared.lock();
        if let Some(e) = st.closed.clone() {
            drop(st);
            shared.permits.add_permits(1);
            return Err((buf, e));
        }
        let Some(cid) = st.free.pop() else {
            // A permit guarantees a free slot.
            drop(st);
            shared.permits.add_permits(1);
            return Err((buf, Error::closed("no command slot is free")));
        };
        sqe.as_mut_bytes()[2..4].copy_from_slice(&cid.to_le_bytes());
        let was_empty = st.out.is_empty();
        let in_capsule = dir == Flow::ToController && buf.len() <= shared.in_capsule_data;
        match dir {
            Flow::ToController if in_capsule => {
                sqe.set_sgl(SglDescriptor::in_capsule(0, len));
                tcp::encode_capsule_cmd(&mut st.out, &sqe, &buf, shared.tx);
            }
            _ => {
                sqe.set_sgl(SglDescriptor::transport(if dir == Flow::None { 0 } else { len }));
                tcp::encode_capsule_cmd(&mut st.out, &sqe, &[], shared.tx);
            }
        }
        st.slots[usize::from(cid)] = Slot {
            busy: true,
            opcode: sqe.opcode(),
            flow: if in_capsule { Flow::None } else { dir },
            buf,
            ..Slot::default()
        };
        drop(st);
        if was_empty {
            shared.writer.notify_one();
        }
        Ok(InFlight { shared: shared.clone(), cid, finished: false })
    }
}

/// A command sent and not yet completed; resolves with its buffer and completion.
#[derive(Debug)]
pub struct InFlight {
    shared: Arc<Shared>,
    cid: u16,
    finished: bool,
}

impl InFlight {
    /// The command id.
    pub fn cid(&self) -> u16 {
        self.cid
    }
}

impl Future for InFlight {
    type Output = CommandResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<CommandResult> {
        let this = &mut *self;
        let mut st = this.shared.lock();
        let slot = &mut st.slots[usize::from(this.cid)];
        match slot.done.take() {
            Some(result) => {
                let buf = std::mem::take(&mut slot.buf);
                let opcode = slot.opcode;
                this.shared.release(&mut st, this.cid);
                drop(st);
                this.finished = true;
                let result = result.and_then(|cqe| {
                    let status = cqe.status();
                    if status.is_success() { Ok(cqe) } else { Err(Error::Command { opcode, status, dw0: cqe.dw0() }) }
                });
                Poll::Ready((buf, result))
            }
            None => {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut st = self.shared.lock();
        let slot = &mut st.slots[usize::from(self.cid)];
        if slot.done.is_some() {
            self.shared.release(&mut st, self.cid);
        } else {
            slot.abandoned = true;
            slot.waker = None;
        }
    }
}

/// Reads the ICResp; returns it with the receive buffer's used range (bytes after it belong to later PDUs).
async fn read_ic_resp(
    stream: &mut TcpStream,
    peer: SocketAddr,
    decoder: &Decoder,
    rbuf: &mut [u8],
) -> Result<(tcp::IcResp, usize, usize), Error> {
    let mut end = 0;
    loop {
        match decoder.decode(&rbuf[..end]).map_err(|source| Error::Pdu { peer, source })? {
            Decoded::NeedMore(n) if n > rbuf.len() => {
                return Err(Error::Protocol(format!("a {n}-byte PDU before the ICResp")));
            }
            Decoded::NeedMore(_) => {
                let n = stream.read(&mut rbuf[end..]).await.map_err(|e| Error::io(peer, e))?;
                if n == 0 {
                    return Err(Error::closed("the controller closed the connection before its ICResp"));
                }
                end += n;
            }
            Decoded::Frame { header: PduHeader::IcResp(resp), len, .. } => return Ok((resp, len, end)),
            Decoded::Frame { header: PduHeader::C2HTermReq(t), .. } => {
                return Err(Error::Terminated { fes: t.fes(), fei: t.fei() });
            }
            Decoded::Frame { header, .. } => {
                return Err(Error::Protocol(format!("{:?} instead of an ICResp", header.pdu_type())));
            }
        }
    }
}

/// Writes whatever the submitters and the reader queued, in as few writes as possible.
async fn writer(shared: Arc<Shared>, mut wr: OwnedWriteHalf) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        shared.writer.notified().await;
        let closed = {
            let mut st = shared.lock();
            std::mem::swap(&mut st.out, &mut batch);
            st.closed.is_some()
        };
        if !batch.is_empty() {
            if let Err(e) = wr.write_all(&batch).await {
                shared.close(Error::io(shared.peer, e));
                shared.shutdown.notify_one();
                return;
            }
            batch.clear();
            // Keep the buffer from holding on to one burst's worth of memory forever.
            batch.shrink_to(1 << 20);
        }
        if closed {
            // Dropping the write half sends FIN.
            return;
        }
    }
}

struct Reader {
    shared: Arc<Shared>,
    rd: OwnedReadHalf,
    decoder: Decoder,
    rx: RecvBuffer,
    /// Wakers collected under the lock, woken after it.
    wake: Vec<Waker>,
    /// Busy-poll window, see [`QueueConfig::busy_poll`].
    poll: Option<Duration>,
}

impl Reader {
    async fn run(mut self) {
        let mut last_data = std::time::Instant::now();
        let reason = loop {
            if let Err(e) = self.process() {
                break e;
            }
            if let Some(window) = self.poll {
                match self.rd.try_read(&mut self.rx.data[self.rx.end..]) {
                    Ok(0) => break Error::closed("the controller closed the connection"),
                    Ok(n) => {
                        self.rx.end += n;
                        last_data = std::time::Instant::now();
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if futures_util::FutureExt::now_or_never(self.shared.shutdown.notified()).is_some() {
                            break Error::closed("the host closed the queue");
                        }
                        if last_data.elapsed() < window {
                            // Let the submitters and the writer run, without sleeping in the reactor.
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                    Err(e) => break Error::io(self.shared.peer, e),
                }
            }
            tokio::select! {
                read = self.rd.read(&mut self.rx.data[self.rx.end..]) => match read {
                    Ok(0) => break Error::closed("the controller closed the connection"),
                    Ok(n) => {
                        self.rx.end += n;
                        if self.poll.is_some() {
                            last_data = std::time::Instant::now();
                        }
                    }
                    Err(e) => break Error::io(self.shared.peer, e),
                },
                () = self.shared.shutdown.notified() => break Error::closed("the host closed the queue"),
            }
        };
        tracing::debug!(qid = self.shared.qid(), reason = %reason, "NVMe/TCP queue closed");
        self.shared.close(reason);
    }

    /// Handles every complete PDU in the receive buffer, under one acquisition of the queue's lock (read
    /// data is copied into the slots' buffers while it is held).
    fn process(&mut self) -> Result<(), Error> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let was_empty = st.out.is_empty();
        let result = loop {
            match self.decoder.decode(&self.rx.data[self.rx.start..self.rx.end]) {
                Ok(Decoded::NeedMore(n)) => {
                    self.rx.make_room(n);
                    break Ok(());
                }
                Ok(Decoded::Frame { header, data, len }) => {
                    let data = self.rx.start + data.start..self.rx.start + data.end;
                    if let Err(e) = self.handle(&mut st, header, data) {
                        break Err(e);
                    }
                    self.rx.start += len;
                }
                Err(PduError::DataDigest { cccid, len, .. }) => {
                    // The data is bad but the stream is in step: fail that command only.
                    let success = self.rx.data[self.rx.start + 1] & flags::DATA_SUCCESS != 0;
                    tracing::warn!(cid = cccid, "C2HData data digest mismatch");
                    if let Err(e) = self.data_digest_error(&mut st, cccid, success) {
                        break Err(e);
                    }
                    self.rx.start += len;
                }
                Err(e) => break Err(self.fatal(&mut st, e)),
            }
        };
        let wake_writer = was_empty && !st.out.is_empty();
        drop(st);
        if wake_writer {
            shared.writer.notify_one();
        }
        self.wake.drain(..).for_each(Waker::wake);
        result
    }

    /// A malformed PDU from the controller: queue an H2CTermReq and end the connection.
    fn fatal(&mut self, st: &mut State, e: PduError) -> Error {
        let fes = e.fes().unwrap_or(FatalErrorStatus::InvalidHeaderField);
        let offending = tcp::offending_header(&self.rx.data[self.rx.start..self.rx.end]);
        tcp::encode_term_req(&mut st.out, Direction::HostToController, fes, e.fei(), offending);
        Error::Pdu { peer: self.shared.peer, source: e }
    }

    fn busy_slot<'s>(st: &'s mut State, cid: u16, what: &str) -> Result<&'s mut Slot, Error> {
        match st.slots.get_mut(usize::from(cid)) {
            Some(slot) if slot.busy && slot.done.is_none() => Ok(slot),
            _ => Err(Error::Protocol(format!("{what} for command {cid}, which is not in flight"))),
        }
    }

    fn data_digest_error(&mut self, st: &mut State, cid: u16, success: bool) -> Result<(), Error> {
        let slot = Self::busy_slot(st, cid, "C2HData")?;
        let e = Error::DataDigest { cid };
        if success {
            if let Some(w) = self.shared.complete(st, cid, Err(e)) {
                self.wake.push(w);
            }
        } else {
            slot.error = Some(e);
        }
        Ok(())
    }

    fn handle(&mut self, st: &mut State, header: PduHeader, data: std::ops::Range<usize>) -> Result<(), Error> {
        match header {
            PduHeader::CapsuleResp(resp) => {
                let cqe = *resp.cqe();
                let cid = cqe.cid();
                let exact = self.shared.qid() != 0;
                let slot = Self::busy_slot(st, cid, "a completion")?;
                if exact
                    && cqe.status().is_success()
                    && slot.flow == Flow::FromController
                    && slot.received != slot.buf.len()
                {
                    return Err(Error::Protocol(format!(
                        "command {cid} completed after {} of {} bytes",
                        slot.received,
                        slot.buf.len()
                    )));
                }
                if let Some(w) = self.shared.complete(st, cid, Ok(cqe)) {
                    self.wake.push(w);
                }
                Ok(())
            }
            PduHeader::C2HData(h) => {
                let cid = h.cccid();
                let slot = Self::busy_slot(st, cid, "C2HData")?;
                let offset = h.datao() as usize;
                if slot.flow != Flow::FromController || offset != slot.received || offset + data.len() > slot.buf.len()
                {
                    return Err(Error::Protocol(format!(
                        "C2HData of command {cid} at {offset}+{} outside its {}-byte transfer",
                        data.len(),
                        slot.buf.len()
                    )));
                }
                slot.buf[offset..offset + data.len()].copy_from_slice(&self.rx.data[data.clone()]);
                slot.received += data.len();
                if h.success() {
                    if slot.received != slot.buf.len() && self.shared.qid() != 0 {
                        return Err(Error::Protocol(format!(
                            "command {cid} succeeded after {} of {} bytes",
                            slot.received,
                            slot.buf.len()
                        )));
                    }
                    let cqe = Cqe::new(cid, self.shared.qid(), 0, Status::SUCCESS, 0, 0);
                    if let Some(w) = self.shared.complete(st, cid, Ok(cqe)) {
                        self.wake.push(w);
                    }
                }
                Ok(())
            }
            PduHeader::R2T(r2t) => {
                let cid = r2t.cccid();
                let (maxh2cdata, tx) = (self.shared.maxh2cdata.max(4096), self.shared.tx);
                let slot = Self::busy_slot(st, cid, "R2T")?;
                let (from, len) = (r2t.r2to() as usize, r2t.r2tl() as usize);
                if slot.flow != Flow::ToController || from + len > slot.buf.len() {
                    return Err(Error::Protocol(format!(
                        "R2T of command {cid} for {from}+{len} outside its {}-byte transfer",
                        slot.buf.len()
                    )));
                }
                // Disjoint borrows: the slot's buffer and the output buffer.
                let State { out, slots, .. } = st;
                let buf = &slots[usize::from(cid)].buf;
                let mut at = from;
                while at < from + len {
                    let n = maxh2cdata.min(from + len - at);
                    let pdu = DataPdu {
                        cccid: cid,
                        ttag: r2t.ttag(),
                        datao: at as u32,
                        datal: n as u32,
                        last: at + n == from + len,
                        success: false,
                    };
                    tcp::encode_h2c_data_header(out, &pdu, tx);
                    out.extend_from_slice(&buf[at..at + n]);
                    if tx.data_digest {
                        out.extend_from_slice(&data_digest([&buf[at..at + n]]));
                    }
                    at += n;
                }
                Ok(())
            }
            PduHeader::C2HTermReq(t) => {
                tracing::warn!(fes = t.fes(), fei = t.fei(), "the controller terminated the connection");
                Err(Error::Terminated { fes: t.fes(), fei: t.fei() })
            }
            other => {
                let offending = tcp::offending_header(&self.rx.data[self.rx.start..self.rx.end]);
                tcp::encode_term_req(
                    &mut st.out,
                    Direction::HostToController,
                    FatalErrorStatus::PduSequenceError,
                    0,
                    offending,
                );
                Err(Error::Protocol(format!("an unexpected {:?} PDU", other.pdu_type())))
            }
        }
    }
}

impl Error {
    fn io(peer: SocketAddr, e: std::io::Error) -> Self {
        Self::Io { peer, source: Arc::new(e) }
    }
}
