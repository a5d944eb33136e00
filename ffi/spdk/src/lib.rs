//! A safe face for SPDK inside the agent.
//!
//! [`Spdk::start`] runs SPDK's application framework (environment, reactors, the bdev, sock and nvmf subsystems)
//! on a thread of its own; the returned handle is how tokio code reaches it. SPDK objects may be touched only on
//! an SPDK thread, so every operation on them takes an [`OnSpdk`] token, which exists only inside closures the
//! bridge runs there ([`Spdk::run`], [`Spdk::run_async`]); completions of SPDK's callbacks come back on the thread
//! that submitted the operation, as SPDK requires, and reach tokio through a oneshot channel.
//!
//! - [`bdev`]: bdevs implemented in Rust (any [`bdev::BlockDevice`]) and descriptors of existing bdevs for I/O.
//! - [`nvmf`]: SPDK's NVMe-oF target: transports, subsystems, namespaces, hosts, listeners.
//!
//! All `unsafe` of the agent's SPDK support lives in this crate and in `dpu-spdk-sys`.

pub mod bdev;
pub mod nvmf;

use std::ffi::{CString, c_void};
use std::marker::PhantomData;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use dpu_spdk_sys as sys;
use tokio::sync::oneshot;

/// What can go wrong talking to SPDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The framework did not come up (bad core mask, no memory, a JSON config that failed …).
    #[error("SPDK did not start: {0}")]
    Start(String),
    /// The SPDK runtime has stopped; nothing more can run on it.
    #[error("SPDK is not running")]
    Stopped,
    /// An SPDK call failed with an errno.
    #[error("{call}: {}", std::io::Error::from_raw_os_error(*.errno))]
    Errno { call: &'static str, errno: i32 },
    /// An SPDK call failed without an errno.
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// Maps SPDK's negated-errno convention.
    pub(crate) fn check(call: &'static str, rc: i32) -> Result<(), Error> {
        if rc == 0 { Ok(()) } else { Err(Error::Errno { call, errno: rc.saturating_abs() }) }
    }
}

/// How the SPDK environment starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Name of the application (DPDK file prefix and log tag derive from it and the pid).
    pub name: String,
    /// Reactor core mask, as SPDK takes it (`0x3`, `[0,2-3]`); the first core runs the application thread.
    pub cores: String,
    /// Memory for SPDK's allocator, in MiB. Its buffer pools alone take about 250 MiB with SPDK's defaults.
    pub mem_size_mib: u32,
    /// Use ordinary memory instead of hugepages (DPDK `--no-huge`): for machines without hugepages.
    pub no_huge: bool,
    /// Do not scan or claim PCI devices (no user-space NVMe): for machines whose devices stay with the kernel.
    pub no_pci: bool,
    /// An SPDK JSON configuration applied at start (bdevs created by SPDK's own modules, for example).
    pub json_config: Option<PathBuf>,
    /// Where SPDK's JSON-RPC server listens (a Unix socket path); `None`: no RPC server.
    pub rpc_socket: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            name: "dpu-agent".into(),
            cores: "0x1".into(),
            mem_size_mib: 1024,
            no_huge: true,
            no_pci: true,
            json_config: None,
            rpc_socket: None,
        }
    }
}

/// Proof that the code holding it runs on an SPDK thread. Not `Send`: it cannot leave the closure it was given to.
#[derive(Debug)]
pub struct OnSpdk {
    _not_send: PhantomData<*const ()>,
}

impl OnSpdk {
    /// # Safety
    /// The caller runs on an SPDK thread (a reactor polling `spdk_thread`s).
    pub(crate) unsafe fn assume() -> OnSpdk {
        OnSpdk { _not_send: PhantomData }
    }
}

/// An `spdk_thread` that messages can be sent to from any thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThreadRef(NonNull<sys::spdk_thread>);

// SAFETY: the pointer is only passed to spdk_thread_send_msg, which SPDK documents as callable from any thread.
unsafe impl Send for ThreadRef {}
// SAFETY: as above; the pointer is never dereferenced in Rust.
unsafe impl Sync for ThreadRef {}

type Message = Box<dyn FnOnce(&OnSpdk) + Send>;

unsafe extern "C" fn run_message(ctx: *mut c_void) {
    // SAFETY: ctx is the Box<Message> leaked by ThreadRef::send, handed to SPDK exactly once.
    let message = unsafe { Box::from_raw(ctx.cast::<Message>()) };
    // SAFETY: SPDK calls messages on the thread they were sent to, an SPDK thread.
    let on = unsafe { OnSpdk::assume() };
    message(&on);
}

impl ThreadRef {
    /// The SPDK thread the caller runs on.
    pub(crate) fn current(_on: &OnSpdk) -> ThreadRef {
        // SAFETY: the token proves the caller is on an SPDK thread, where spdk_get_thread returns it (non-null).
        let thread = unsafe { sys::spdk_get_thread() };
        ThreadRef(NonNull::new(thread).expect("an SPDK thread"))
    }

    /// Runs `f` on this thread. Fails when the thread is exiting or its message pool is exhausted.
    pub(crate) fn send(self, f: impl FnOnce(&OnSpdk) + Send + 'static) -> Result<(), Error> {
        let message: Box<Message> = Box::new(Box::new(f));
        let ctx = Box::into_raw(message);
        // SAFETY: the thread pointer came from SPDK; run_message takes ownership of ctx when the send succeeds.
        let rc = unsafe { sys::spdk_thread_send_msg(self.0.as_ptr(), Some(run_message), ctx.cast()) };
        if rc != 0 {
            // SAFETY: the message was not queued, so ctx is still ours.
            drop(unsafe { Box::from_raw(ctx) });
            return Err(Error::Errno { call: "spdk_thread_send_msg", errno: rc.saturating_abs() });
        }
        Ok(())
    }
}

/// The completion of an SPDK operation started in [`Spdk::run_async`]: complete it from SPDK's callback.
#[derive(Debug)]
pub struct Completion<R>(oneshot::Sender<R>);

impl<R: Send + 'static> Completion<R> {
    /// Hands the result to the waiting tokio task (dropped when that task went away).
    pub fn complete(self, result: R) {
        let _ = self.0.send(result);
    }

    /// The completion as a C callback argument; [`Completion::from_raw`] takes it back exactly once.
    pub fn into_raw(self) -> *mut c_void {
        Box::into_raw(Box::new(self)).cast()
    }

    /// # Safety
    /// `raw` came from [`Completion::into_raw`] with the same `R` and is not used again.
    pub unsafe fn from_raw(raw: *mut c_void) -> Self {
        // SAFETY: per the contract, raw is a leaked Box<Completion<R>>.
        *unsafe { Box::from_raw(raw.cast::<Completion<R>>()) }
    }
}

#[derive(Debug)]
struct Inner {
    app_thread: ThreadRef,
    /// False once shutdown began: the application thread may be gone, so nothing more is sent to it.
    running: std::sync::RwLock<bool>,
    reactor: Mutex<Option<std::thread::JoinHandle<i32>>>,
}

impl Inner {
    fn send(&self, f: impl FnOnce(&OnSpdk) + Send + 'static) -> Result<(), Error> {
        let running = self.running.read().unwrap_or_else(|e| e.into_inner());
        if !*running {
            return Err(Error::Stopped);
        }
        self.app_thread.send(f)
    }
}

/// How long SPDK may take to initialize its subsystems and apply its JSON config.
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A handle on the running SPDK framework. Cheap to clone; [`Spdk::stop`] shuts it down.
#[derive(Debug, Clone)]
pub struct Spdk {
    inner: Arc<Inner>,
}

struct StartContext {
    ready: std::sync::mpsc::Sender<Result<ThreadRef, Error>>,
    /// The process's SIGINT/SIGTERM handlers before SPDK installed its own; put back once SPDK is up, so the
    /// agent's own signal handling (graceful stop, hand-over) keeps working.
    saved: [(libc::c_int, libc::sigaction); 2],
}

unsafe extern "C" fn started(ctx: *mut c_void) {
    // SAFETY: ctx is the StartContext leaked by Spdk::start, passed to this callback exactly once.
    let ctx = unsafe { Box::from_raw(ctx.cast::<StartContext>()) };
    for (signal, action) in &ctx.saved {
        // SAFETY: restores a sigaction previously read from the kernel for the same signal.
        unsafe { libc::sigaction(*signal, action, std::ptr::null_mut()) };
    }
    // SAFETY: the start callback runs on the application thread.
    let on = unsafe { OnSpdk::assume() };
    let _ = ctx.ready.send(Ok(ThreadRef::current(&on)));
}

/// The agent passes SPDK no options of its own, so this is never asked.
unsafe extern "C" fn no_app_option(_ch: libc::c_int, _arg: *mut libc::c_char) -> libc::c_int {
    -libc::EINVAL
}

unsafe extern "C" fn no_usage() {}

fn saved_action(signal: libc::c_int) -> (libc::c_int, libc::sigaction) {
    // SAFETY: sigaction is plain data; all-zero is a valid value to be overwritten.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `action`.
    unsafe { libc::sigaction(signal, std::ptr::null(), &mut action) };
    (signal, action)
}

fn cstring(what: &str, value: &str) -> Result<CString, Error> {
    CString::new(value).map_err(|_| Error::Start(format!("{what} {value:?} contains a NUL byte")))
}

impl Spdk {
    /// Starts SPDK on a new thread (which becomes its first reactor) and waits until its application thread
    /// runs. SPDK can be started once per process.
    pub fn start(options: &Options) -> Result<Spdk, Error> {
        bdev::register_module();
        let name = cstring("name", &options.name)?;
        let cores = cstring("core mask", &options.cores)?;
        let json =
            options.json_config.as_ref().map(|p| cstring("JSON config path", &p.to_string_lossy())).transpose()?;
        let rpc = options.rpc_socket.as_ref().map(|p| cstring("RPC socket", &p.to_string_lossy())).transpose()?;
        let mem_size = i32::try_from(options.mem_size_mib)
            .map_err(|_| Error::Start(format!("{} MiB of memory is too much", options.mem_size_mib)))?;
        let (no_huge, no_pci) = (options.no_huge, options.no_pci);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();

        let reactor = std::thread::Builder::new()
            .name("spdk-reactor".into())
            .spawn(move || {
                let mut opts = sys::spdk_app_opts::default();
                // SAFETY: opts is a valid spdk_app_opts of the size given.
                unsafe { sys::spdk_app_opts_init(&mut opts, std::mem::size_of::<sys::spdk_app_opts>()) };
                // Core locks (/var/tmp/spdk_cpu_lock_*) would stop the next agent from starting SPDK while the
                // previous one still serves during a hand-over; only the command line turns them off.
                let mut argv = [c"dpu-agent".as_ptr().cast_mut(), c"--disable-cpumask-locks".as_ptr().cast_mut()];
                // SAFETY: argv holds two NUL-terminated strings that outlive the call; no options of our own.
                let parsed = unsafe {
                    sys::spdk_app_parse_args(
                        2,
                        argv.as_mut_ptr(),
                        &mut opts,
                        c"".as_ptr(),
                        std::ptr::null(),
                        Some(no_app_option),
                        Some(no_usage),
                    )
                };
                if parsed != sys::SPDK_APP_PARSE_ARGS_SUCCESS {
                    let _ = ready_tx.send(Err(Error::Start("SPDK refused its start-up options".into())));
                    return -1;
                }
                opts.name = name.as_ptr();
                opts.reactor_mask = cores.as_ptr();
                opts.mem_size = mem_size;
                opts.no_huge = no_huge;
                opts.no_pci = no_pci;
                opts.json_config_file = json.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
                opts.rpc_addr = rpc.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
                let ctx = Box::new(StartContext {
                    ready: ready_tx.clone(),
                    saved: [saved_action(libc::SIGINT), saved_action(libc::SIGTERM)],
                });
                let raw = Box::into_raw(ctx);
                // SAFETY: opts and the strings it points to live until spdk_app_start returns; `started` owns raw.
                let rc = unsafe { sys::spdk_app_start(&mut opts, Some(started), raw.cast()) };
                // SAFETY: called once after spdk_app_start returned, as SPDK requires.
                unsafe { sys::spdk_app_fini() };
                // When start failed before calling `started`, raw leaks (a few bytes, once); waking the caller
                // matters more.
                let _ = ready_tx.send(Err(Error::Start(format!("spdk_app_start returned {rc}"))));
                rc
            })
            .map_err(|e| Error::Start(format!("cannot spawn the reactor thread: {e}")))?;

        // SPDK does not always return from spdk_app_start when a subsystem fails to initialize (it logs why).
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(app_thread)) => {
                tracing::info!(cores = %options.cores, mem_mib = options.mem_size_mib, options.no_huge, "SPDK started");
                Ok(Spdk {
                    inner: Arc::new(Inner {
                        app_thread,
                        running: std::sync::RwLock::new(true),
                        reactor: Mutex::new(Some(reactor)),
                    }),
                })
            }
            Ok(Err(e)) => {
                let _ = reactor.join();
                Err(e)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Error::Start(format!(
                "not up after {} s; SPDK's log says why (too little memory for its buffer pools is a usual cause)",
                START_TIMEOUT.as_secs()
            ))),
            Err(_) => Err(Error::Start("the reactor thread ended without starting SPDK".into())),
        }
    }

    /// Runs `f` on SPDK's application thread and returns its result.
    pub async fn run<R: Send + 'static>(&self, f: impl FnOnce(&OnSpdk) -> R + Send + 'static) -> Result<R, Error> {
        self.run_async(move |on, done| done.complete(f(on))).await
    }

    /// Runs `f` on SPDK's application thread; the result is what is passed to the [`Completion`], typically from
    /// an SPDK callback later on that thread.
    pub async fn run_async<R: Send + 'static>(
        &self,
        f: impl FnOnce(&OnSpdk, Completion<R>) + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner.send(move |on| f(on, Completion(tx)))?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Runs `f` on SPDK's application thread without waiting for it.
    pub fn post(&self, f: impl FnOnce(&OnSpdk) + Send + 'static) -> Result<(), Error> {
        self.inner.send(f)
    }

    /// Like [`Spdk::run`], for callers outside tokio: blocks the calling thread.
    pub fn run_blocking<R: Send + 'static>(&self, f: impl FnOnce(&OnSpdk) -> R + Send + 'static) -> Result<R, Error> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.send(move |on| {
            let _ = tx.send(f(on));
        })?;
        rx.recv().map_err(|_| Error::Stopped)
    }

    /// Shuts SPDK down (subsystems finish in reverse order: the nvmf target disconnects hosts, bdevs close) and
    /// waits for the reactor thread. Later calls on any handle fail with [`Error::Stopped`].
    pub fn stop(&self) {
        let reactor = self.inner.reactor.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(reactor) = reactor else { return };
        {
            let mut running = self.inner.running.write().unwrap_or_else(|e| e.into_inner());
            *running = false;
            // SAFETY: spdk_app_start_shutdown runs on the application thread, where SPDK expects it.
            if self.inner.app_thread.send(|_| unsafe { sys::spdk_app_start_shutdown() }).is_err() {
                tracing::warn!("SPDK's application thread did not take the shutdown message");
                return;
            }
        }
        match reactor.join() {
            Ok(0) => tracing::info!("SPDK stopped"),
            Ok(rc) => tracing::warn!(rc, "SPDK stopped with an error"),
            Err(_) => tracing::error!("SPDK's reactor thread panicked"),
        }
    }
}
