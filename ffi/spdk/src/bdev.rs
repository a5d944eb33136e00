//! Bdevs both ways: [`register`] offers any [`BlockDevice`] (the agent's volumes) to SPDK as a bdev of the
//! module `dpu`, so SPDK's nvmf target, vbdevs and tools can use it; [`Desc`] opens an SPDK bdev (malloc, aio,
//! NVMe, …) for I/O from Rust.

use std::ffi::{CString, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use dpu_spdk_sys as sys;

use crate::{Completion, Error, OnSpdk, ThreadRef};

/// Kinds of bdev I/O a [`BlockDevice`] is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
    /// Anything else SPDK may ask about (compare, zone management …): never supported here.
    Other(u32),
}

impl IoType {
    fn from_raw(raw: u32) -> IoType {
        match raw {
            sys::SPDK_BDEV_IO_TYPE_READ => IoType::Read,
            sys::SPDK_BDEV_IO_TYPE_WRITE => IoType::Write,
            sys::SPDK_BDEV_IO_TYPE_FLUSH => IoType::Flush,
            sys::SPDK_BDEV_IO_TYPE_UNMAP => IoType::Unmap,
            sys::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => IoType::WriteZeroes,
            sys::SPDK_BDEV_IO_TYPE_RESET => IoType::Reset,
            other => IoType::Other(other),
        }
    }
}

/// A block device SPDK can use. Called on SPDK threads: `submit` must not block; it hands the I/O on (to tokio)
/// and completes it from anywhere.
pub trait BlockDevice: Send + Sync + 'static {
    /// Bytes per block.
    fn block_size(&self) -> u32;
    /// Capacity in blocks.
    fn num_blocks(&self) -> u64;
    /// True when writes may be volatile until a flush.
    fn write_cache(&self) -> bool {
        false
    }
    /// Whether I/O of this type is served; SPDK emulates some (write zeroes) when not.
    fn supports(&self, io: IoType) -> bool;
    /// Serves one I/O; [`BdevIo::complete`] ends it (dropping it fails it).
    fn submit(&self, io: BdevIo);
}

/// One I/O SPDK submitted to a Rust bdev. Owned until completed; its buffers stay valid until then.
#[derive(Debug)]
pub struct BdevIo {
    io: Option<NonNull<sys::spdk_bdev_io>>,
    thread: ThreadRef,
    kind: IoType,
    offset_blocks: u64,
    num_blocks: u64,
}

// SAFETY: SPDK keeps the bdev_io and its buffers for us until spdk_bdev_io_complete, which this type only calls on
// the submitting SPDK thread (by message); reading fields and buffers from another thread meanwhile is plain memory
// access.
unsafe impl Send for BdevIo {}

impl BdevIo {
    pub fn kind(&self) -> IoType {
        self.kind
    }

    pub fn offset_blocks(&self) -> u64 {
        self.offset_blocks
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    fn iovs(&self) -> &[libc::iovec] {
        let Some(io) = self.io else { return &[] };
        let mut count = 0;
        // SAFETY: io is a live bdev_io owned by us; the shim reads its union fields.
        let iovs = unsafe { sys::dpu_spdk_bdev_io_iovs(io.as_ptr(), &mut count) };
        if iovs.is_null() || count <= 0 {
            return &[];
        }
        // SAFETY: SPDK gives `count` iovecs at `iovs`, valid until the I/O completes (which needs `self`).
        unsafe { std::slice::from_raw_parts(iovs.cast::<libc::iovec>(), count as usize) }
    }

    /// Bytes the I/O's buffers hold (reads and writes).
    pub fn len(&self) -> usize {
        self.iovs().iter().map(|v| v.iov_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the data of a write into `out` (as much as fits); returns the bytes copied.
    pub fn gather(&self, out: &mut [u8]) -> usize {
        let mut done = 0;
        for v in self.iovs() {
            let n = v.iov_len.min(out.len() - done);
            // SAFETY: the iovec is valid for iov_len bytes until completion; `out` has room for n more.
            let src = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), n) };
            out[done..done + n].copy_from_slice(src);
            done += n;
            if done == out.len() {
                break;
            }
        }
        done
    }

    /// Copies `data` into the buffers of a read; returns the bytes copied.
    pub fn scatter(&mut self, data: &[u8]) -> usize {
        let mut done = 0;
        for v in self.iovs() {
            let n = v.iov_len.min(data.len() - done);
            // SAFETY: the iovec is valid and exclusively ours for iov_len bytes until completion (&mut self).
            let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), n) };
            dst.copy_from_slice(&data[done..done + n]);
            done += n;
            if done == data.len() {
                break;
            }
        }
        done
    }

    /// Ends the I/O: success or failure is reported to SPDK on the thread that submitted it.
    pub fn complete(mut self, ok: bool) {
        self.finish(ok);
    }

    fn finish(&mut self, ok: bool) {
        let Some(io) = self.io.take() else { return };
        let io = IoPtr(io);
        let status = if ok { sys::SPDK_BDEV_IO_STATUS_SUCCESS } else { sys::SPDK_BDEV_IO_STATUS_FAILED };
        let sent = self.thread.send(move |_| {
            let io = io;
            // SAFETY: on the submitting thread, completing an I/O SPDK gave us and nobody completed yet.
            unsafe { sys::spdk_bdev_io_complete(io.0.as_ptr(), status) };
        });
        if let Err(e) = sent {
            // The thread is gone (SPDK shutting down); the bdev layer aborts what is outstanding.
            tracing::error!(error = %e, "cannot complete a bdev I/O on its thread");
        }
    }
}

impl Drop for BdevIo {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[derive(Clone, Copy)]
struct IoPtr(NonNull<sys::spdk_bdev_io>);
// SAFETY: moved to the submitting thread only to complete the I/O there.
unsafe impl Send for IoPtr {}

/// What SPDK's `ctxt` of a Rust bdev points to: the bdev structure itself and the device behind it.
struct Context {
    bdev: sys::spdk_bdev,
    device: Arc<dyn BlockDevice>,
    _name: CString,
    _product: CString,
}

struct Static<T>(T);
// SAFETY: the module and function table are written by SPDK only on its application thread (module list, init);
// Rust never touches them after creation.
unsafe impl<T> Sync for Static<T> {}
// SAFETY: as above.
unsafe impl<T> Send for Static<T> {}

impl<T> std::fmt::Debug for Static<NonNull<T>> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::any::type_name::<T>().rsplit("::").next().unwrap_or("spdk"))
    }
}

static MODULE: OnceLock<Static<NonNull<sys::spdk_bdev_module>>> = OnceLock::new();
static FN_TABLE: OnceLock<Static<Box<sys::spdk_bdev_fn_table>>> = OnceLock::new();
const MODULE_NAME: &std::ffi::CStr = c"dpu";

unsafe extern "C" fn module_init() -> i32 {
    0
}

unsafe extern "C" fn module_ctx_size() -> i32 {
    0
}

/// Adds the `dpu` bdev module to SPDK's list; must happen before the bdev subsystem initializes.
pub(crate) fn register_module() {
    MODULE.get_or_init(|| {
        let module = Box::new(sys::spdk_bdev_module {
            module_init: Some(module_init),
            name: MODULE_NAME.as_ptr(),
            get_ctx_size: Some(module_ctx_size),
            ..Default::default()
        });
        let module = NonNull::from(Box::leak(module));
        // SAFETY: the module lives forever (leaked) and is added once, before spdk_app_start.
        unsafe { sys::spdk_bdev_module_list_add(module.as_ptr()) };
        Static(module)
    });
}

fn fn_table() -> *const sys::spdk_bdev_fn_table {
    let table = FN_TABLE.get_or_init(|| {
        Static(Box::new(sys::spdk_bdev_fn_table {
            destruct: Some(destruct),
            submit_request: Some(submit_request),
            io_type_supported: Some(io_type_supported),
            get_io_channel: Some(get_io_channel),
            ..Default::default()
        }))
    });
    &*table.0
}

unsafe extern "C" fn channel_create(_io_device: *mut c_void, _ctx: *mut c_void) -> i32 {
    0
}

unsafe extern "C" fn channel_destroy(_io_device: *mut c_void, _ctx: *mut c_void) {}

unsafe extern "C" fn io_device_gone(io_device: *mut c_void) {
    // SAFETY: the io_device is the Context leaked by `register`; SPDK calls this once, after its last channel.
    drop(unsafe { Box::from_raw(io_device.cast::<Context>()) });
}

unsafe extern "C" fn destruct(ctx: *mut c_void) -> i32 {
    // SAFETY: ctx is our Context; unregistering the io_device frees it once no channel is left.
    unsafe { sys::spdk_io_device_unregister(ctx, Some(io_device_gone)) };
    0
}

unsafe extern "C" fn get_io_channel(ctx: *mut c_void) -> *mut sys::spdk_io_channel {
    // SAFETY: ctx is the Context registered as an io_device in `register`.
    unsafe { sys::spdk_get_io_channel(ctx) }
}

unsafe extern "C" fn io_type_supported(ctx: *mut c_void, io_type: u32) -> bool {
    // SAFETY: ctx is our live Context (SPDK asks only while the bdev is registered).
    let context = unsafe { &*ctx.cast::<Context>() };
    context.device.supports(IoType::from_raw(io_type))
}

unsafe extern "C" fn submit_request(_ch: *mut sys::spdk_io_channel, io: *mut sys::spdk_bdev_io) {
    // SAFETY: SPDK passes a live bdev_io of one of our bdevs.
    let kind = IoType::from_raw(unsafe { sys::dpu_spdk_bdev_io_type(io) } as u32);
    if kind == IoType::Read {
        // SAFETY: as above; the shim reads the I/O's union fields.
        let blocks = unsafe { sys::dpu_spdk_bdev_io_num_blocks(io) };
        // SAFETY: as above.
        let context = unsafe { context_of(io) };
        let len = blocks * u64::from(context.device.block_size());
        // SAFETY: asks the bdev layer for data buffers for this read; `buffer_ready` continues.
        unsafe { sys::spdk_bdev_io_get_buf(io, Some(buffer_ready), len) };
        return;
    }
    // SAFETY: as above.
    unsafe { dispatch(io) };
}

unsafe extern "C" fn buffer_ready(_ch: *mut sys::spdk_io_channel, io: *mut sys::spdk_bdev_io, success: bool) {
    if !success {
        // SAFETY: no buffer could be had; fail the I/O on its own thread (this callback runs there).
        unsafe { sys::spdk_bdev_io_complete(io, sys::SPDK_BDEV_IO_STATUS_FAILED) };
        return;
    }
    // SAFETY: the I/O is live and now has its buffers.
    unsafe { dispatch(io) };
}

/// # Safety
/// `io` is a live bdev_io of a Rust bdev, on its submitting SPDK thread.
unsafe fn context_of<'a>(io: *mut sys::spdk_bdev_io) -> &'a Context {
    // SAFETY: the shim reads the bdev's ctxt from a live bdev_io.
    let ctxt = unsafe { sys::dpu_spdk_bdev_io_ctxt(io) };
    // SAFETY: the bdev's ctxt is our Context, alive while the bdev has I/O.
    unsafe { &*ctxt.cast::<Context>() }
}

/// # Safety
/// `io` is a live bdev_io of a Rust bdev, on its submitting SPDK thread, with buffers when it is a read.
unsafe fn dispatch(io: *mut sys::spdk_bdev_io) {
    // SAFETY: per the contract.
    let context = unsafe { context_of(io) };
    // SAFETY: per the contract, on an SPDK thread.
    let on = unsafe { OnSpdk::assume() };
    let io = BdevIo {
        io: NonNull::new(io),
        thread: ThreadRef::current(&on),
        // SAFETY: the shims read fields of the live bdev_io.
        kind: IoType::from_raw(unsafe { sys::dpu_spdk_bdev_io_type(io) } as u32),
        // SAFETY: as above.
        offset_blocks: unsafe { sys::dpu_spdk_bdev_io_offset_blocks(io) },
        // SAFETY: as above.
        num_blocks: unsafe { sys::dpu_spdk_bdev_io_num_blocks(io) },
    };
    if !context.device.supports(io.kind) {
        io.complete(false);
        return;
    }
    context.device.submit(io);
}

/// A Rust bdev registered with SPDK. Dropping the handle leaves it registered; [`Registered::unregister`] takes
/// it away (SPDK first closes every descriptor, e.g. a namespace's).
#[derive(Debug)]
pub struct Registered {
    bdev: Static<NonNull<sys::spdk_bdev>>,
    name: String,
}

/// Registers `device` as the bdev `name` (module `dpu`), with `uuid` when given.
pub fn register(
    _on: &OnSpdk,
    name: &str,
    product: &str,
    uuid: Option<[u8; 16]>,
    device: Arc<dyn BlockDevice>,
) -> Result<Registered, Error> {
    let c_name = CString::new(name).map_err(|_| Error::Failed(format!("bdev name {name:?} contains a NUL")))?;
    let c_product = CString::new(product).map_err(|_| Error::Failed(format!("{product:?} contains a NUL")))?;
    let module = MODULE.get().ok_or_else(|| Error::Failed("the dpu bdev module is not registered".into()))?.0;
    let mut context = Box::new(Context {
        bdev: sys::spdk_bdev::default(),
        device: device.clone(),
        _name: c_name,
        _product: c_product,
    });
    let bdev = &mut context.bdev;
    bdev.name = context._name.as_ptr().cast_mut();
    bdev.product_name = context._product.as_ptr().cast_mut();
    bdev.blocklen = device.block_size();
    bdev.blockcnt = device.num_blocks();
    bdev.write_cache = i32::from(device.write_cache());
    bdev.module = module.as_ptr();
    bdev.fn_table = fn_table();
    if let Some(uuid) = uuid {
        // SAFETY: spdk_uuid is 16 bytes of plain data.
        bdev.uuid = unsafe { std::mem::transmute::<[u8; 16], sys::spdk_uuid>(uuid) };
    }
    let raw = Box::into_raw(context);
    // SAFETY: raw is a live Context whose first use as io_device is here.
    unsafe { (*raw).bdev.ctxt = raw.cast() };
    // SAFETY: registers the io_device that get_io_channel hands out channels of; on the app thread (token).
    unsafe {
        sys::spdk_io_device_register(raw.cast(), Some(channel_create), Some(channel_destroy), 0, c"dpu".as_ptr())
    };
    // SAFETY: raw is a live Context (leaked above); the bdev structure inside it is fully set up.
    let bdev = unsafe { &raw mut (*raw).bdev };
    // SAFETY: bdev points into the leaked Context, which lives until the io_device is unregistered.
    let rc = unsafe { sys::spdk_bdev_register(bdev) };
    if rc != 0 {
        // SAFETY: the bdev was not registered; the io_device goes and frees the Context.
        unsafe { sys::spdk_io_device_unregister(raw.cast(), Some(io_device_gone)) };
        return Err(Error::Errno { call: "spdk_bdev_register", errno: rc.saturating_abs() });
    }
    let bdev = NonNull::new(bdev).expect("a field of a boxed value");
    Ok(Registered { bdev: Static(bdev), name: name.to_owned() })
}

unsafe extern "C" fn unregistered(arg: *mut c_void, rc: i32) {
    // SAFETY: arg is the Completion leaked by Registered::unregister.
    let done = unsafe { Completion::<Result<(), Error>>::from_raw(arg) };
    done.complete(Error::check("spdk_bdev_unregister", rc));
}

impl Registered {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Unregisters the bdev; `done` completes when SPDK has let go of it.
    pub fn unregister(self, _on: &OnSpdk, done: Completion<Result<(), Error>>) {
        // SAFETY: the bdev is registered (this handle is consumed once), on the app thread (token).
        unsafe { sys::spdk_bdev_unregister(self.bdev.0.as_ptr(), Some(unregistered), done.into_raw()) };
    }
}

/// Memory SPDK can do I/O to (DMA-able when devices need it). Freed on drop.
#[derive(Debug)]
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory owned by this value; SPDK's allocator is thread-safe.
unsafe impl Send for DmaBuf {}

impl DmaBuf {
    /// `len` zeroed bytes aligned to 4 KiB.
    pub fn zeroed(len: usize) -> Result<DmaBuf, Error> {
        // SAFETY: plain allocation from SPDK's (thread-safe) allocator.
        let ptr = unsafe { sys::spdk_dma_zmalloc(len.max(1), 4096, std::ptr::null_mut()) };
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::Failed(format!("SPDK has no memory for a {len}-byte buffer")))?;
        Ok(DmaBuf { ptr, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: len bytes allocated and initialized (zeroed) at ptr.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: ptr came from spdk_dma_zmalloc and is freed once.
        unsafe { sys::spdk_dma_free(self.ptr.as_ptr().cast()) };
    }
}

/// An open SPDK bdev with an I/O channel on the application thread. Usable only there (every call takes the
/// [`OnSpdk`] token); [`Desc::close`] releases it there too.
#[derive(Debug)]
pub struct Desc {
    desc: Static<NonNull<sys::spdk_bdev_desc>>,
    channel: Static<NonNull<sys::spdk_io_channel>>,
    block_size: u32,
    num_blocks: u64,
}

unsafe extern "C" fn bdev_event(_kind: u32, _bdev: *mut sys::spdk_bdev, _ctx: *mut c_void) {
    // Hot removal and resize of a bdev opened by a volume: its I/O starts failing, which the volume reports.
}

type IoCallback = Box<dyn FnOnce(&OnSpdk, bool) + Send>;

struct IoDone(IoCallback);

unsafe extern "C" fn io_done(io: *mut sys::spdk_bdev_io, success: bool, arg: *mut c_void) {
    // SAFETY: arg is the IoDone leaked by Desc::submit, called once.
    let done = unsafe { Box::from_raw(arg.cast::<IoDone>()) };
    // SAFETY: the bdev layer hands us the finished I/O to free.
    unsafe { sys::spdk_bdev_free_io(io) };
    // SAFETY: completions run on the thread that submitted the I/O, an SPDK thread.
    let on = unsafe { OnSpdk::assume() };
    (done.0)(&on, success);
}

/// Operations a [`Desc`] submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescOp {
    Flush,
    Unmap,
    WriteZeroes,
}

impl Desc {
    /// Opens the bdev `name` for reading and writing (or reading only).
    pub fn open(_on: &OnSpdk, name: &str, write: bool) -> Result<Desc, Error> {
        let c_name = CString::new(name).map_err(|_| Error::Failed(format!("bdev name {name:?} contains a NUL")))?;
        let mut desc = std::ptr::null_mut();
        // SAFETY: on the app thread (token); desc receives the descriptor.
        let rc = unsafe {
            sys::spdk_bdev_open_ext(c_name.as_ptr(), write, Some(bdev_event), std::ptr::null_mut(), &mut desc)
        };
        if rc != 0 {
            return Err(Error::Errno { call: "spdk_bdev_open_ext", errno: rc.saturating_abs() });
        }
        let desc =
            NonNull::new(desc).ok_or_else(|| Error::Failed(format!("bdev {name} opened without a descriptor")))?;
        // SAFETY: desc is open; the bdev outlives it.
        let bdev = unsafe { sys::spdk_bdev_desc_get_bdev(desc.as_ptr()) };
        // SAFETY: bdev is live while desc is open.
        let block_size = unsafe { sys::spdk_bdev_get_block_size(bdev) };
        // SAFETY: as above.
        let num_blocks = unsafe { sys::spdk_bdev_get_num_blocks(bdev) };
        // SAFETY: a channel for this (the app) thread.
        let channel = unsafe { sys::spdk_bdev_get_io_channel(desc.as_ptr()) };
        let Some(channel) = NonNull::new(channel) else {
            // SAFETY: closes the descriptor just opened.
            unsafe { sys::spdk_bdev_close(desc.as_ptr()) };
            return Err(Error::Failed(format!("bdev {name} gave no I/O channel")));
        };
        Ok(Desc { desc: Static(desc), channel: Static(channel), block_size, num_blocks })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn num_blocks(&self) -> u64 {
        self.num_blocks
    }

    /// Reads `buf.len() / block_size` blocks at `offset` into `buf`; `done` gets the buffer back and the outcome.
    pub fn read(
        &self,
        on: &OnSpdk,
        offset: u64,
        buf: DmaBuf,
        done: impl FnOnce(&OnSpdk, DmaBuf, bool) + Send + 'static,
    ) {
        self.transfer(on, false, offset, buf, done);
    }

    /// Writes `buf` at block `offset`; `done` gets the buffer back and the outcome.
    pub fn write(
        &self,
        on: &OnSpdk,
        offset: u64,
        buf: DmaBuf,
        done: impl FnOnce(&OnSpdk, DmaBuf, bool) + Send + 'static,
    ) {
        self.transfer(on, true, offset, buf, done);
    }

    fn transfer(
        &self,
        on: &OnSpdk,
        write: bool,
        offset: u64,
        buf: DmaBuf,
        done: impl FnOnce(&OnSpdk, DmaBuf, bool) + Send + 'static,
    ) {
        let blocks = (buf.len / self.block_size as usize) as u64;
        let data = buf.ptr.as_ptr().cast::<c_void>();
        self.start(on, Box::new(move |on, ok| done(on, buf, ok)), |desc, ch, arg| {
            if write {
                // SAFETY: desc and channel belong to this (app) thread; data stays allocated inside the callback.
                unsafe { sys::spdk_bdev_write_blocks(desc, ch, data, offset, blocks, Some(io_done), arg) }
            } else {
                // SAFETY: as above.
                unsafe { sys::spdk_bdev_read_blocks(desc, ch, data, offset, blocks, Some(io_done), arg) }
            }
        });
    }

    /// Submits one I/O through `call` (descriptor, channel, completion argument → SPDK's return code); when SPDK
    /// refuses it, `done` runs at once as a failure.
    fn start(
        &self,
        on: &OnSpdk,
        done: IoCallback,
        call: impl FnOnce(*mut sys::spdk_bdev_desc, *mut sys::spdk_io_channel, *mut c_void) -> i32,
    ) {
        let arg = Box::into_raw(Box::new(IoDone(done)));
        if call(self.desc.0.as_ptr(), self.channel.0.as_ptr(), arg.cast()) != 0 {
            // SAFETY: not submitted, so the callback is still ours.
            let done = unsafe { Box::from_raw(arg) };
            (done.0)(on, false);
        }
    }

    /// Flushes, unmaps or zeroes `blocks` blocks at `offset`.
    pub fn submit(
        &self,
        on: &OnSpdk,
        op: DescOp,
        offset: u64,
        blocks: u64,
        done: impl FnOnce(&OnSpdk, bool) + Send + 'static,
    ) {
        let f = match op {
            DescOp::Flush => sys::spdk_bdev_flush_blocks,
            DescOp::Unmap => sys::spdk_bdev_unmap_blocks,
            DescOp::WriteZeroes => sys::spdk_bdev_write_zeroes_blocks,
        };
        // SAFETY: desc and channel belong to this (app) thread; io_done owns arg when submitted.
        self.start(on, Box::new(done), |desc, ch, arg| unsafe { f(desc, ch, offset, blocks, Some(io_done), arg) });
    }

    /// Whether the bdev serves `op` natively or by emulation.
    pub fn supports(&self, _on: &OnSpdk, op: DescOp) -> bool {
        let kind = match op {
            DescOp::Flush => sys::SPDK_BDEV_IO_TYPE_FLUSH,
            DescOp::Unmap => sys::SPDK_BDEV_IO_TYPE_UNMAP,
            DescOp::WriteZeroes => sys::SPDK_BDEV_IO_TYPE_WRITE_ZEROES,
        };
        // SAFETY: desc is open.
        let bdev = unsafe { sys::spdk_bdev_desc_get_bdev(self.desc.0.as_ptr()) };
        // SAFETY: the bdev is live while desc is open.
        unsafe { sys::spdk_bdev_io_type_supported(bdev, kind) }
    }

    /// Releases the channel and closes the descriptor.
    pub fn close(self, _on: &OnSpdk) {
        // SAFETY: on the thread the channel was taken on; each released once (self is consumed).
        unsafe { sys::spdk_put_io_channel(self.channel.0.as_ptr()) };
        // SAFETY: as above.
        unsafe { sys::spdk_bdev_close(self.desc.0.as_ptr()) };
    }
}
