//! SPDK's NVMe-oF target as the agent drives it: the framework's target (created by the nvmf subsystem at start),
//! its TCP transport, and subsystems with namespaces (bdevs), allowed hosts and listeners. Every call is on the
//! application thread ([`OnSpdk`]); state changes complete through a [`Completion`].

use std::ffi::{CStr, CString, c_void};
use std::net::SocketAddr;
use std::ptr::NonNull;

use dpu_spdk_sys as sys;

use crate::{Completion, Error, OnSpdk};

/// The framework's NVMe-oF target.
#[derive(Debug, Clone, Copy)]
pub struct Target(NonNull<sys::spdk_nvmf_tgt>);

/// A subsystem of the target, as SPDK holds it.
#[derive(Debug, Clone, Copy)]
pub struct Subsystem(NonNull<sys::spdk_nvmf_subsystem>);

/// Subsystem state changes (SPDK allows namespace, host and listener changes only when paused or inactive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Start,
    Stop,
    Pause,
    Resume,
}

fn c(what: &str, value: &str) -> Result<CString, Error> {
    CString::new(value).map_err(|_| Error::Failed(format!("{what} {value:?} contains a NUL byte")))
}

/// An NVMe transport id for a TCP address, as SPDK parses them.
fn tcp_trid(address: SocketAddr) -> Result<sys::spdk_nvme_transport_id, Error> {
    let family = if address.is_ipv4() { "IPv4" } else { "IPv6" };
    let text = c("address", &format!("trtype:TCP adrfam:{family} traddr:{} trsvcid:{}", address.ip(), address.port()))?;
    let mut trid = sys::spdk_nvme_transport_id::default();
    // SAFETY: trid is a valid, zeroed transport id; text is NUL-terminated.
    let rc = unsafe { sys::spdk_nvme_transport_id_parse(&mut trid, text.as_ptr()) };
    Error::check("spdk_nvme_transport_id_parse", rc)?;
    Ok(trid)
}

unsafe extern "C" fn status_done(arg: *mut c_void, status: i32) {
    // SAFETY: arg is a Completion<Result<(), Error>> leaked by the caller of the SPDK function.
    let done = unsafe { Completion::<Result<(), Error>>::from_raw(arg) };
    done.complete(Error::check("nvmf", status));
}

unsafe extern "C" fn state_done(_s: *mut sys::spdk_nvmf_subsystem, arg: *mut c_void, status: i32) {
    // SAFETY: as in status_done.
    unsafe { status_done(arg, status) };
}

unsafe extern "C" fn destroyed(arg: *mut c_void) {
    // SAFETY: as in status_done.
    unsafe { status_done(arg, 0) };
}

unsafe extern "C" fn transport_created(arg: *mut c_void, transport: *mut sys::spdk_nvmf_transport) {
    // SAFETY: arg is the (target, completion) pair leaked by Target::add_transport.
    let pending = unsafe { Box::from_raw(arg.cast::<(Target, Completion<Result<(), Error>>)>()) };
    let (target, done) = *pending;
    if transport.is_null() {
        done.complete(Err(Error::Failed("SPDK could not create the transport".into())));
        return;
    }
    // SAFETY: the target is live, the transport new; status_done takes the completion.
    unsafe { sys::spdk_nvmf_tgt_add_transport(target.0.as_ptr(), transport, Some(status_done), done.into_raw()) };
}

impl Target {
    /// The target the framework's nvmf subsystem created.
    pub fn get(_on: &OnSpdk) -> Result<Target, Error> {
        // SAFETY: on the app thread (token); returns null when there is none.
        let tgt = unsafe { sys::spdk_nvmf_get_first_tgt() };
        NonNull::new(tgt).map(Target).ok_or_else(|| Error::Failed("SPDK has no NVMe-oF target".into()))
    }

    /// Whether the target has the transport `name` (e.g. "TCP", "RDMA").
    pub fn has_transport(&self, _on: &OnSpdk, name: &str) -> bool {
        let Ok(name) = c("transport", name) else { return false };
        // SAFETY: the target is live (token: app thread).
        !unsafe { sys::spdk_nvmf_tgt_get_transport(self.0.as_ptr(), name.as_ptr()) }.is_null()
    }

    /// Creates the transport `name` with SPDK's defaults and adds it to the target.
    pub fn add_transport(&self, on: &OnSpdk, name: &str, done: Completion<Result<(), Error>>) {
        if self.has_transport(on, name) {
            return done.complete(Ok(()));
        }
        let c_name = match c("transport", name) {
            Ok(n) => n,
            Err(e) => return done.complete(Err(e)),
        };
        let mut opts = sys::spdk_nvmf_transport_opts::default();
        let size = std::mem::size_of::<sys::spdk_nvmf_transport_opts>();
        // SAFETY: opts is a valid structure of the size given.
        if !unsafe { sys::spdk_nvmf_transport_opts_init(c_name.as_ptr(), &mut opts, size) } {
            return done.complete(Err(Error::Failed(format!("SPDK has no {name} transport"))));
        }
        let arg = Box::into_raw(Box::new((*self, done)));
        // SAFETY: opts is initialized; transport_created owns arg when the call succeeds.
        let rc = unsafe {
            sys::spdk_nvmf_transport_create_async(c_name.as_ptr(), &mut opts, Some(transport_created), arg.cast())
        };
        if rc != 0 {
            // SAFETY: not queued: arg is still ours.
            let (_, done) = *unsafe { Box::from_raw(arg) };
            done.complete(Err(Error::Errno { call: "spdk_nvmf_transport_create_async", errno: rc.saturating_abs() }));
        }
    }

    /// Starts accepting connections at `address` (TCP).
    pub fn listen(&self, _on: &OnSpdk, address: SocketAddr) -> Result<(), Error> {
        let trid = tcp_trid(address)?;
        let mut opts = sys::spdk_nvmf_listen_opts::default();
        // SAFETY: opts is a valid structure of the size given.
        unsafe { sys::spdk_nvmf_listen_opts_init(&mut opts, std::mem::size_of::<sys::spdk_nvmf_listen_opts>()) };
        // SAFETY: the target is live; trid and opts are initialized.
        let rc = unsafe { sys::spdk_nvmf_tgt_listen_ext(self.0.as_ptr(), &trid, &mut opts) };
        Error::check("spdk_nvmf_tgt_listen_ext", rc)
    }

    /// Stops accepting connections at `address`.
    pub fn stop_listen(&self, _on: &OnSpdk, address: SocketAddr) -> Result<(), Error> {
        let mut trid = tcp_trid(address)?;
        // SAFETY: the target is live; trid is initialized.
        let rc = unsafe { sys::spdk_nvmf_tgt_stop_listen(self.0.as_ptr(), &mut trid) };
        Error::check("spdk_nvmf_tgt_stop_listen", rc)
    }

    /// The subsystem with this NQN.
    pub fn find(&self, _on: &OnSpdk, nqn: &str) -> Option<Subsystem> {
        let nqn = c("NQN", nqn).ok()?;
        // SAFETY: the target is live; nqn is NUL-terminated.
        NonNull::new(unsafe { sys::spdk_nvmf_tgt_find_subsystem(self.0.as_ptr(), nqn.as_ptr()) }).map(Subsystem)
    }

    /// Creates an inactive NVMe subsystem.
    pub fn create_subsystem(&self, _on: &OnSpdk, nqn: &str, serial: &str, model: &str) -> Result<Subsystem, Error> {
        let c_nqn = c("NQN", nqn)?;
        // SAFETY: the target is live; 0 namespaces means SPDK's default maximum.
        let raw =
            unsafe { sys::spdk_nvmf_subsystem_create(self.0.as_ptr(), c_nqn.as_ptr(), sys::SPDK_NVMF_SUBTYPE_NVME, 0) };
        let subsystem = NonNull::new(raw)
            .map(Subsystem)
            .ok_or_else(|| Error::Failed(format!("SPDK refused to create subsystem {nqn}")))?;
        let (sn, mn) = (c("serial", serial)?, c("model", model)?);
        // SAFETY: the subsystem is new and inactive; the strings are NUL-terminated and copied.
        Error::check("spdk_nvmf_subsystem_set_sn", unsafe { sys::spdk_nvmf_subsystem_set_sn(raw, sn.as_ptr()) })?;
        // SAFETY: as above.
        Error::check("spdk_nvmf_subsystem_set_mn", unsafe { sys::spdk_nvmf_subsystem_set_mn(raw, mn.as_ptr()) })?;
        Ok(subsystem)
    }
}

impl Subsystem {
    pub fn nqn(&self, _on: &OnSpdk) -> String {
        // SAFETY: the subsystem is live; SPDK returns its NUL-terminated NQN.
        let nqn = unsafe { sys::spdk_nvmf_subsystem_get_nqn(self.0.as_ptr()) };
        // SAFETY: non-null, NUL-terminated, owned by the subsystem.
        unsafe { CStr::from_ptr(nqn) }.to_string_lossy().into_owned()
    }

    pub fn set_allow_any_host(&self, _on: &OnSpdk, allow: bool) -> Result<(), Error> {
        // SAFETY: the subsystem is live (token: app thread).
        let rc = unsafe { sys::spdk_nvmf_subsystem_set_allow_any_host(self.0.as_ptr(), allow) };
        Error::check("spdk_nvmf_subsystem_set_allow_any_host", rc)
    }

    pub fn add_host(&self, _on: &OnSpdk, host_nqn: &str) -> Result<(), Error> {
        let host = c("host NQN", host_nqn)?;
        // SAFETY: the subsystem is live; no extra parameters.
        let rc = unsafe { sys::spdk_nvmf_subsystem_add_host(self.0.as_ptr(), host.as_ptr(), std::ptr::null()) };
        Error::check("spdk_nvmf_subsystem_add_host", rc)
    }

    pub fn remove_host(&self, _on: &OnSpdk, host_nqn: &str) -> Result<(), Error> {
        let host = c("host NQN", host_nqn)?;
        // SAFETY: the subsystem is live.
        let rc = unsafe { sys::spdk_nvmf_subsystem_remove_host(self.0.as_ptr(), host.as_ptr()) };
        Error::check("spdk_nvmf_subsystem_remove_host", rc)
    }

    /// Adds namespace `nsid` backed by the bdev `bdev`, with `uuid` (paused or inactive subsystems only).
    pub fn add_namespace(&self, _on: &OnSpdk, nsid: u32, bdev: &str, uuid: [u8; 16]) -> Result<(), Error> {
        let c_bdev = c("bdev", bdev)?;
        let mut opts = sys::spdk_nvmf_ns_opts::default();
        let size = std::mem::size_of::<sys::spdk_nvmf_ns_opts>();
        // SAFETY: opts is a valid structure of the size given.
        unsafe { sys::spdk_nvmf_ns_opts_get_defaults(&mut opts, size) };
        opts.nsid = nsid;
        // SAFETY: spdk_uuid is 16 bytes of plain data.
        opts.uuid = unsafe { std::mem::transmute::<[u8; 16], sys::spdk_uuid>(uuid) };
        opts.nguid = uuid;
        // SAFETY: the subsystem is live; opts initialized; no persistent reservation file.
        let got = unsafe {
            sys::spdk_nvmf_subsystem_add_ns_ext(self.0.as_ptr(), c_bdev.as_ptr(), &opts, size, std::ptr::null())
        };
        if got != nsid {
            return Err(Error::Failed(format!("SPDK refused namespace {nsid} on bdev {bdev}")));
        }
        Ok(())
    }

    pub fn remove_namespace(&self, _on: &OnSpdk, nsid: u32) -> Result<(), Error> {
        // SAFETY: the subsystem is live (paused or inactive, by the caller's transition).
        let rc = unsafe { sys::spdk_nvmf_subsystem_remove_ns(self.0.as_ptr(), nsid) };
        Error::check("spdk_nvmf_subsystem_remove_ns", rc)
    }

    /// Lets hosts connect through `address` (the target must listen there).
    pub fn add_listener(&self, _on: &OnSpdk, address: SocketAddr, done: Completion<Result<(), Error>>) {
        let mut trid = match tcp_trid(address) {
            Ok(t) => t,
            Err(e) => return done.complete(Err(e)),
        };
        // SAFETY: the subsystem is live; SPDK copies trid; status_done owns the completion.
        unsafe {
            sys::spdk_nvmf_subsystem_add_listener(self.0.as_ptr(), &mut trid, Some(status_done), done.into_raw())
        };
    }

    pub fn remove_listener(&self, _on: &OnSpdk, address: SocketAddr) -> Result<(), Error> {
        let trid = tcp_trid(address)?;
        // SAFETY: the subsystem is live; trid initialized.
        let rc = unsafe { sys::spdk_nvmf_subsystem_remove_listener(self.0.as_ptr(), &trid) };
        Error::check("spdk_nvmf_subsystem_remove_listener", rc)
    }

    /// Starts, stops, pauses or resumes the subsystem.
    pub fn transition(&self, _on: &OnSpdk, to: Transition, done: Completion<Result<(), Error>>) {
        let s = self.0.as_ptr();
        let arg = done.into_raw();
        let call = match to {
            Transition::Start => "spdk_nvmf_subsystem_start",
            Transition::Stop => "spdk_nvmf_subsystem_stop",
            Transition::Pause => "spdk_nvmf_subsystem_pause",
            Transition::Resume => "spdk_nvmf_subsystem_resume",
        };
        // The four calls: the subsystem is live, on the app thread (token); state_done owns arg when the call
        // returns 0. Pausing nsid 0 pauses every namespace.
        let rc = match to {
            // SAFETY: see above.
            Transition::Start => unsafe { sys::spdk_nvmf_subsystem_start(s, Some(state_done), arg) },
            // SAFETY: see above.
            Transition::Stop => unsafe { sys::spdk_nvmf_subsystem_stop(s, Some(state_done), arg) },
            // SAFETY: see above.
            Transition::Pause => unsafe { sys::spdk_nvmf_subsystem_pause(s, 0, Some(state_done), arg) },
            // SAFETY: see above.
            Transition::Resume => unsafe { sys::spdk_nvmf_subsystem_resume(s, Some(state_done), arg) },
        };
        if rc != 0 {
            // SAFETY: not queued: the completion is still ours.
            let done = unsafe { Completion::<Result<(), Error>>::from_raw(arg) };
            done.complete(Err(Error::Errno { call, errno: rc.saturating_abs() }));
        }
    }

    /// Destroys an inactive subsystem.
    pub fn destroy(self, _on: &OnSpdk, done: Completion<Result<(), Error>>) {
        let arg = done.into_raw();
        // SAFETY: the subsystem is live and inactive; `destroyed` owns arg when SPDK answers -EINPROGRESS.
        let rc = unsafe { sys::spdk_nvmf_subsystem_destroy(self.0.as_ptr(), Some(destroyed), arg) };
        if rc != -libc::EINPROGRESS {
            // SAFETY: SPDK finished (or failed) synchronously and will not call back: arg is still ours.
            let done = unsafe { Completion::<Result<(), Error>>::from_raw(arg) };
            done.complete(Error::check("spdk_nvmf_subsystem_destroy", rc));
        }
    }
}
