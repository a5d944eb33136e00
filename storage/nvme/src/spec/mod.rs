//! NVMe Base Specification 2.0, NVM Command Set Specification 1.0 and NVMe over Fabrics data structures.

pub mod command;
pub mod fabrics;
pub mod features;
pub mod identify;
pub mod log;
pub mod properties;

pub use command::{Cqe, SglDescriptor, SglKind, Sqe, Status};

use crate::Error;

/// Writes `value` left-justified into `field` and fills the rest with spaces (20h), the format of the ASCII
/// string fields of Identify Controller (SN, MN, FR) and of the discovery log TRSVCID/TRADDR.
pub fn write_space_padded(field: &mut [u8], value: &str, name: &'static str) -> Result<(), Error> {
    check_ascii(value, field.len(), name)?;
    field.fill(b' ');
    field[..value.len()].copy_from_slice(value.as_bytes());
    Ok(())
}

/// Writes `value` into `field` followed by NUL bytes; at least one NUL always terminates the string
/// (SUBNQN, HOSTNQN and the NQNs of the Connect data).
pub fn write_nul_padded(field: &mut [u8], value: &str, name: &'static str) -> Result<(), Error> {
    let max = field.len().saturating_sub(1);
    if value.len() > max {
        return Err(Error::FieldTooLong { field: name, len: value.len(), max });
    }
    if value.bytes().any(|b| b == 0) {
        return Err(Error::NotPrintableAscii { field: name });
    }
    field.fill(0);
    field[..value.len()].copy_from_slice(value.as_bytes());
    Ok(())
}

/// Reads a space-padded ASCII field, without the trailing spaces; `None` if it holds bytes outside printable
/// ASCII (a NUL padding, which some implementations use, ends the string).
pub fn read_space_padded(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let s = core::str::from_utf8(&field[..end]).ok()?;
    s.bytes().all(|b| (0x20..0x7f).contains(&b)).then(|| s.trim_end_matches(' '))
}

/// Reads a NUL-terminated UTF-8 string field; `None` if no NUL terminates it within the field or it is not
/// UTF-8.
pub fn read_nul_terminated(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0)?;
    core::str::from_utf8(&field[..end]).ok()
}

fn check_ascii(value: &str, max: usize, name: &'static str) -> Result<(), Error> {
    if value.len() > max {
        return Err(Error::FieldTooLong { field: name, len: value.len(), max });
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::NotPrintableAscii { field: name });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_strings() {
        let mut sn = [0u8; 20];
        write_space_padded(&mut sn, "DPU0001", "sn").unwrap();
        assert_eq!(&sn, b"DPU0001             ");
        assert_eq!(read_space_padded(&sn), Some("DPU0001"));
        assert_eq!(
            write_space_padded(&mut sn, "x".repeat(21).as_str(), "sn"),
            Err(Error::FieldTooLong { field: "sn", len: 21, max: 20 })
        );
        assert_eq!(write_space_padded(&mut sn, "caf\u{e9}", "sn"), Err(Error::NotPrintableAscii { field: "sn" }));

        let mut nqn = [0xffu8; 8];
        write_nul_padded(&mut nqn, "nqn.a", "subnqn").unwrap();
        assert_eq!(&nqn, b"nqn.a\0\0\0");
        assert_eq!(read_nul_terminated(&nqn), Some("nqn.a"));
        assert!(write_nul_padded(&mut nqn, "12345678", "subnqn").is_err(), "no room for the terminator");
        assert_eq!(read_nul_terminated(b"no-terminator"), None);
        assert_eq!(read_nul_terminated(b"\xff\xfe\0"), None);
        assert_eq!(read_space_padded(b"abc\x01  "), None);
    }
}
