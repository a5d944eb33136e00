//! io_uring engine for file volumes: one thread owns a ring; callers hand it owned buffers and await the
//! result. The ring thread keeps every buffer until the kernel has completed the operation on it, so a caller
//! that stops waiting cannot free memory the kernel is still writing to. New work wakes the thread through an
//! eventfd that is itself read through the ring.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc;

use io_uring::{IoUring, opcode, types};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::oneshot;

const RING_ENTRIES: u32 = 256;
/// user_data of the eventfd read.
const WAKE: u64 = u64::MAX;

/// What the ring thread is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UringOp {
    Read,
    Write,
    Fdatasync,
}

struct Request {
    op: UringOp,
    file: Arc<File>,
    offset: u64,
    buf: Vec<u8>,
    reply: oneshot::Sender<(Vec<u8>, io::Result<()>)>,
}

/// A request in flight: its buffer stays here until the kernel completes it.
struct InFlight {
    request: Request,
    /// Bytes already transferred (short reads and writes are resubmitted for the rest).
    done: usize,
}

/// Handle to a ring thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Uring {
    inner: Arc<Handle>,
}

#[derive(Debug)]
struct Handle {
    tx: mpsc::Sender<Request>,
    wake: EventFd,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("op", &self.op).field("offset", &self.offset).finish_non_exhaustive()
    }
}

impl Uring {
    /// Sets up a ring and its thread. Fails where io_uring is unavailable (old kernels, qemu-user, sysctl).
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC)?;
        let wake_fd = wake.as_fd().as_raw_fd();
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("dpu-uring".into()).spawn(move || run(ring, rx, wake_fd))?;
        Ok(Self { inner: Arc::new(Handle { tx, wake }) })
    }

    /// Runs `op` on `file` at `offset` with `buf` (read into it, or write it); returns the buffer.
    pub async fn submit(&self, op: UringOp, file: Arc<File>, offset: u64, buf: Vec<u8>) -> (Vec<u8>, io::Result<()>) {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::SendError(request)) = self.inner.tx.send(Request { op, file, offset, buf, reply }) {
            return (request.buf, Err(io::Error::other("the io_uring thread has stopped")));
        }
        // Nudging the eventfd cannot fail short of fd exhaustion; the ring also drains on its next wake-up.
        let _ = self.inner.wake.write(1);
        match rx.await {
            Ok(result) => result,
            Err(_) => (Vec::new(), Err(io::Error::other("the io_uring thread dropped the request"))),
        }
    }
}

fn run(mut ring: IoUring, rx: mpsc::Receiver<Request>, wake_fd: RawFd) {
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let mut next_id: u64 = 0;
    let mut wake_buf = [0u8; 8];
    let mut wake_armed = false;
    let mut open = true;
    loop {
        let mut fresh = Vec::new();
        while open {
            match rx.try_recv() {
                Ok(request) => fresh.push(request),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        for request in fresh {
            let id = next_id;
            next_id = next_id.wrapping_add(1) % WAKE;
            inflight.insert(id, InFlight { request, done: 0 });
            push(&mut ring, id, &mut inflight);
        }
        if open && !wake_armed {
            let entry = opcode::Read::new(types::Fd(wake_fd), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE);
            // SAFETY: `wake_buf` lives on this thread's stack for the whole loop, which outlives every
            // submission; the eventfd stays open while the handle (and so the sender) exists.
            if unsafe { ring.submission().push(&entry) }.is_ok() {
                wake_armed = true;
            }
        }
        if !open && inflight.is_empty() {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %e, "io_uring submit failed; failing in-flight I/O");
            for (_, f) in inflight.drain() {
                let _ = f.request.reply.send((f.request.buf, Err(io::Error::new(e.kind(), e.to_string()))));
            }
            return;
        }
        let completed: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (id, result) in completed {
            if id == WAKE {
                wake_armed = false;
                continue;
            }
            let Some(mut f) = inflight.remove(&id) else { continue };
            let want = if f.request.op == UringOp::Fdatasync { 0 } else { f.request.buf.len() };
            match result {
                r if r < 0 => {
                    let _ = f.request.reply.send((f.request.buf, Err(io::Error::from_raw_os_error(-r))));
                }
                0 if want > f.done => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "end of file inside the volume");
                    let _ = f.request.reply.send((f.request.buf, Err(e)));
                }
                n => {
                    f.done += n as usize;
                    if f.done < want {
                        inflight.insert(id, f);
                        push(&mut ring, id, &mut inflight);
                    } else {
                        let _ = f.request.reply.send((f.request.buf, Ok(())));
                    }
                }
            }
        }
    }
}

/// Queues the (rest of the) operation `id`; on a full submission queue, submits first.
fn push(ring: &mut IoUring, id: u64, inflight: &mut HashMap<u64, InFlight>) {
    let Some(f) = inflight.get_mut(&id) else { return };
    let fd = types::Fd(f.request.file.as_raw_fd());
    let offset = f.request.offset + f.done as u64;
    let remaining = &mut f.request.buf[f.done..];
    let len = u32::try_from(remaining.len()).unwrap_or(u32::MAX);
    let entry = match f.request.op {
        UringOp::Read => opcode::Read::new(fd, remaining.as_mut_ptr(), len).offset(offset).build(),
        UringOp::Write => opcode::Write::new(fd, remaining.as_ptr(), len).offset(offset).build(),
        UringOp::Fdatasync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
    }
    .user_data(id);
    loop {
        // SAFETY: the buffer and the file belong to the request stored in `inflight` under `id`, which is only
        // removed after its completion has been reaped, so both outlive the kernel's use of them. A Vec's heap
        // allocation does not move when the map rehashes.
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return;
        }
        if let Err(e) = ring.submit() {
            tracing::warn!(error = %e, "io_uring submit while the queue was full failed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_or_reported_unavailable() {
        let ring = match Uring::new() {
            Ok(ring) => ring,
            // qemu-user and kernels with io_uring disabled: the file engine falls back to the thread pool.
            Err(e) => {
                let code = e.raw_os_error();
                assert!(
                    code == Some(nix::errno::Errno::ENOSYS as i32) || code == Some(nix::errno::Errno::EPERM as i32),
                    "{e}"
                );
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("f"))
                .unwrap(),
        );
        file.set_len(1 << 20).unwrap();
        let data: Vec<u8> = (0..65536).map(|i| (i % 253) as u8).collect();
        let (_, r) = ring.submit(UringOp::Write, file.clone(), 4096, data.clone()).await;
        r.unwrap();
        let (_, r) = ring.submit(UringOp::Fdatasync, file.clone(), 0, Vec::new()).await;
        r.unwrap();
        let (back, r) = ring.submit(UringOp::Read, file.clone(), 4096, vec![0; 65536]).await;
        r.unwrap();
        assert_eq!(back, data);
        let (_, r) = ring.submit(UringOp::Read, file, (1 << 20) - 512, vec![0; 4096]).await;
        assert!(r.is_err(), "a read past the end of the file is an error");
    }
}
