//! Thin wrappers over system calls that `nix` does not cover (the other unsafe blocks adopt descriptors passed
//! by another process: upgrade.rs, systemd.rs).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Opens a netlink socket of `protocol` (e.g. `libc::NETLINK_XFRM`); the kernel loads the protocol's module on
/// demand when it can.
pub fn netlink_socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the arguments are plain integers.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2), is valid and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_netlink_opens_and_unknown_protocol_fails() {
        netlink_socket(libc::NETLINK_ROUTE).unwrap();
        let err = netlink_socket(1000).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPROTONOSUPPORT));
    }
}
