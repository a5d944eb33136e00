//! NVMe over Fabrics commands: Connect, Property Get/Set, Disconnect, and NVMe Qualified Names
//! (NVMe over Fabrics Specification 1.1: "Fabrics Command Set", "Connect Command and Response",
//! "Property Get Command", "Property Set Command"; NVMe Base Specification 2.0: "NVMe Qualified Names").

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::command::{PSDT_SGL_MPTR_BUFFER, SglDescriptor, Sqe};
use super::{read_nul_terminated, write_nul_padded};
use crate::Error;

/// Opcode of every Fabrics command; the command is selected by the Fabrics Command Type (byte 4).
pub const FABRICS_OPCODE: u8 = 0x7f;

/// Fabrics Command Types (NVMe over Fabrics Specification 1.1, "Fabrics Command Types").
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTHENTICATION_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTHENTICATION_RECEIVE: u8 = 0x06;
    /// Disconnect.
    pub const DISCONNECT: u8 = 0x08;
}

/// The well-known NQN of a discovery controller (NVMe Base Specification 2.0, "NVMe Qualified Names").
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Prefix of the UUID based NQN format.
pub const UUID_NQN_PREFIX: &str = "nqn.2014-08.org.nvmexpress:uuid:";
/// Maximum length of an NQN in bytes, not counting the NUL terminator.
pub const NQN_MAX_LEN: usize = 223;

/// Connect CNTLID requesting the dynamic controller model.
pub const CNTLID_DYNAMIC: u16 = 0xffff;
/// Highest controller ID a controller may be given.
pub const CNTLID_MAX: u16 = 0xffef;
/// Connect Attributes bit 2: Disable SQ Flow Control (the host ignores SQHD).
pub const CATTR_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;

/// Connect command, 64 bytes (NVMe over Fabrics Specification 1.1, "Connect Command - Submission Queue Entry").
/// The Connect data ([`ConnectData`]) travels as in-capsule data described by the SGL.
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnectCommand {
    opcode: u8,
    flags: u8,
    cid: U16,
    fctype: u8,
    reserved1: [u8; 19],
    sgl: SglDescriptor,
    recfmt: U16,
    qid: U16,
    sqsize: U16,
    cattr: u8,
    reserved2: u8,
    kato: U32,
    reserved3: [u8; 12],
}

impl ConnectCommand {
    /// A Connect command for queue `qid` with a 0's based `sqsize`, Connect Attributes `cattr`, Keep Alive
    /// Timeout `kato_ms` (admin queue only) and the SGL describing the 1024-byte Connect data.
    pub const fn new(cid: u16, qid: u16, sqsize: u16, cattr: u8, kato_ms: u32, sgl: SglDescriptor) -> Self {
        Self {
            opcode: FABRICS_OPCODE,
            flags: PSDT_SGL_MPTR_BUFFER << 6,
            cid: U16::new(cid),
            fctype: fctype::CONNECT,
            reserved1: [0; 19],
            sgl,
            recfmt: U16::new(0),
            qid: U16::new(qid),
            sqsize: U16::new(sqsize),
            cattr,
            reserved2: 0,
            kato: U32::new(kato_ms),
            reserved3: [0; 12],
        }
    }

    /// Command Identifier.
    pub fn cid(&self) -> u16 {
        self.cid.get()
    }

    /// Record Format (bytes 41:40); 0 is the only defined format.
    pub fn recfmt(&self) -> u16 {
        self.recfmt.get()
    }

    /// Queue ID (bytes 43:42): 0 for the admin queue.
    pub fn qid(&self) -> u16 {
        self.qid.get()
    }

    /// Submission Queue Size (bytes 45:44), 0's based.
    pub fn sqsize(&self) -> u16 {
        self.sqsize.get()
    }

    /// Connect Attributes (byte 46).
    pub fn cattr(&self) -> u8 {
        self.cattr
    }

    /// Keep Alive Timeout in milliseconds (bytes 51:48); meaningful on the admin queue.
    pub fn kato_ms(&self) -> u32 {
        self.kato.get()
    }

    /// SGL Descriptor 1 describing the Connect data.
    pub fn sgl(&self) -> &SglDescriptor {
        &self.sgl
    }

    /// The command as a generic submission queue entry.
    pub fn as_sqe(&self) -> &Sqe {
        zerocopy::transmute_ref!(self)
    }
}

impl fmt::Debug for ConnectCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectCommand")
            .field("cid", &self.cid())
            .field("recfmt", &self.recfmt())
            .field("qid", &self.qid())
            .field("sqsize", &self.sqsize())
            .field("cattr", &self.cattr())
            .field("kato_ms", &self.kato_ms())
            .field("sgl", &self.sgl)
            .finish()
    }
}

/// Connect data, 1024 bytes (NVMe over Fabrics Specification 1.1, "Connect Command - Data").
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConnectData {
    /// Host Identifier (128-bit, bytes 15:00).
    pub hostid: [u8; 16],
    /// Controller ID (bytes 17:16): [`CNTLID_DYNAMIC`] on the admin queue of a dynamic controller.
    pub cntlid: U16,
    /// Reserved (bytes 255:18).
    pub reserved1: [u8; 238],
    /// Subsystem NQN, NUL terminated (bytes 511:256).
    pub subnqn: [u8; 256],
    /// Host NQN, NUL terminated (bytes 767:512).
    pub hostnqn: [u8; 256],
    /// Reserved (bytes 1023:768).
    pub reserved2: [u8; 256],
}

impl ConnectData {
    /// Connect data for `hostid`, `cntlid` and the two NQNs (each validated with [`validate_nqn`]).
    pub fn new(hostid: [u8; 16], cntlid: u16, subnqn: &str, hostnqn: &str) -> Result<Self, Error> {
        validate_nqn(subnqn)?;
        validate_nqn(hostnqn)?;
        let mut data = Self::new_zeroed();
        data.hostid = hostid;
        data.cntlid.set(cntlid);
        write_nul_padded(&mut data.subnqn, subnqn, "subnqn")?;
        write_nul_padded(&mut data.hostnqn, hostnqn, "hostnqn")?;
        Ok(data)
    }

    /// Views received in-capsule data as Connect data, `None` unless it is exactly 1024 bytes.
    pub fn parse(bytes: &[u8]) -> Option<&Self> {
        Self::ref_from_bytes(bytes).ok()
    }

    /// The Subsystem NQN, if NUL terminated UTF-8 (validate it with [`validate_nqn`] before use).
    pub fn subnqn(&self) -> Option<&str> {
        read_nul_terminated(&self.subnqn)
    }

    /// The Host NQN, if NUL terminated UTF-8.
    pub fn hostnqn(&self) -> Option<&str> {
        read_nul_terminated(&self.hostnqn)
    }

    /// Controller ID.
    pub fn cntlid(&self) -> u16 {
        self.cntlid.get()
    }
}

impl fmt::Debug for ConnectData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectData")
            .field("hostid", &self.hostid)
            .field("cntlid", &self.cntlid())
            .field("subnqn", &self.subnqn())
            .field("hostnqn", &self.hostnqn())
            .finish_non_exhaustive()
    }
}

/// Byte offsets within [`ConnectData`] for the Invalid Parameter Offset of a Connect Invalid Parameters
/// completion.
pub mod connect_data_offset {
    /// HOSTID.
    pub const HOSTID: u16 = 0;
    /// CNTLID.
    pub const CNTLID: u16 = 16;
    /// SUBNQN.
    pub const SUBNQN: u16 = 256;
    /// HOSTNQN.
    pub const HOSTNQN: u16 = 512;
}

/// Byte offsets within the Connect submission queue entry for the Invalid Parameter Offset.
pub mod connect_command_offset {
    /// RECFMT.
    pub const RECFMT: u16 = 40;
    /// QID.
    pub const QID: u16 = 42;
    /// SQSIZE.
    pub const SQSIZE: u16 = 44;
    /// CATTR.
    pub const CATTR: u16 = 46;
    /// KATO.
    pub const KATO: u16 = 48;
}

/// Dword 0 of a successful Connect completion: Controller ID (bits 15:0) and the Authentication Requirements
/// (bits 31:16; 0 when no in-band authentication is needed).
pub const fn connect_success_dw0(cntlid: u16, authreq: u16) -> u32 {
    (authreq as u32) << 16 | cntlid as u32
}

/// Dword 0 of a Connect Invalid Parameters completion: Invalid Parameter Offset (bits 15:0) and Invalid
/// Attribute (bit 16: set when the offset is into the Connect data, clear when into the command).
pub const fn connect_ipo_iattr(offset: u16, in_connect_data: bool) -> u32 {
    (in_connect_data as u32) << 16 | offset as u32
}

/// Property Get and Property Set commands, 64 bytes (NVMe over Fabrics Specification 1.1, "Property Get
/// Command", "Property Set Command"); the Value field is used by Property Set only.
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PropertyCommand {
    opcode: u8,
    flags: u8,
    cid: U16,
    fctype: u8,
    reserved1: [u8; 35],
    attrib: u8,
    reserved2: [u8; 3],
    offset: U32,
    value: U64,
    reserved3: [u8; 8],
}

impl PropertyCommand {
    /// Property Get of the 4- or 8-byte property at `offset`.
    pub fn get(cid: u16, offset: u32, eight_bytes: bool) -> Self {
        Self::build(cid, fctype::PROPERTY_GET, offset, eight_bytes, 0)
    }

    /// Property Set of the 4- or 8-byte property at `offset` to `value`.
    pub fn set(cid: u16, offset: u32, eight_bytes: bool, value: u64) -> Self {
        Self::build(cid, fctype::PROPERTY_SET, offset, eight_bytes, value)
    }

    fn build(cid: u16, fctype: u8, offset: u32, eight_bytes: bool, value: u64) -> Self {
        Self {
            opcode: FABRICS_OPCODE,
            flags: PSDT_SGL_MPTR_BUFFER << 6,
            cid: U16::new(cid),
            fctype,
            reserved1: [0; 35],
            attrib: u8::from(eight_bytes),
            reserved2: [0; 3],
            offset: U32::new(offset),
            value: U64::new(value),
            reserved3: [0; 8],
        }
    }

    /// Fabrics Command Type: [`fctype::PROPERTY_GET`] or [`fctype::PROPERTY_SET`].
    pub fn fctype(&self) -> u8 {
        self.fctype
    }

    /// Attributes (byte 40): Size in bits 2:0, 0 for 4 bytes, 1 for 8 bytes, other values reserved.
    pub fn attrib(&self) -> u8 {
        self.attrib
    }

    /// The property size in bytes, `None` for a reserved Size value.
    pub fn size(&self) -> Option<u8> {
        match self.attrib & 0x7 {
            0 => Some(4),
            1 => Some(8),
            _ => None,
        }
    }

    /// Offset (bytes 47:44) of the property, see [`crate::spec::properties`].
    pub fn offset(&self) -> u32 {
        self.offset.get()
    }

    /// Value (bytes 55:48) of a Property Set; for a 4-byte property only bits 31:0 are meaningful.
    pub fn value(&self) -> u64 {
        self.value.get()
    }

    /// Command Identifier.
    pub fn cid(&self) -> u16 {
        self.cid.get()
    }

    /// The command as a generic submission queue entry.
    pub fn as_sqe(&self) -> &Sqe {
        zerocopy::transmute_ref!(self)
    }
}

impl fmt::Debug for PropertyCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PropertyCommand")
            .field("fctype", &self.fctype)
            .field("cid", &self.cid())
            .field("size", &self.size())
            .field("offset", &format_args!("{:#x}", self.offset()))
            .field("value", &format_args!("{:#x}", self.value()))
            .finish()
    }
}

impl Sqe {
    /// Whether this is a Fabrics command (opcode 7Fh).
    pub fn is_fabrics(&self) -> bool {
        self.opcode() == FABRICS_OPCODE
    }

    /// This entry viewed as a Connect command (meaningful when [`Sqe::fctype`] is [`fctype::CONNECT`]).
    pub fn as_connect(&self) -> &ConnectCommand {
        zerocopy::transmute_ref!(self)
    }

    /// This entry viewed as a Property Get/Set command.
    pub fn as_property(&self) -> &PropertyCommand {
        zerocopy::transmute_ref!(self)
    }

    /// Record Format of a Disconnect command (bytes 41:40).
    pub fn disconnect_recfmt(&self) -> u16 {
        (self.cdw10() & 0xffff) as u16
    }
}

/// Checks an NVMe Qualified Name: valid UTF-8 (guaranteed by `&str`) of 1 to 223 bytes without NUL, starting
/// with `nqn.` and either the UUID format `nqn.2014-08.org.nvmexpress:uuid:` + a 36-character UUID, or the
/// date-domain format `nqn.yyyy-mm.` + reverse domain name (+ optional `:` and a string).
pub fn validate_nqn(nqn: &str) -> Result<(), Error> {
    let invalid = |reason| Err(Error::InvalidNqn { reason });
    if nqn.is_empty() {
        return invalid("empty");
    }
    if nqn.len() > NQN_MAX_LEN {
        return invalid("longer than 223 bytes");
    }
    if nqn.bytes().any(|b| b == 0) {
        return invalid("contains a NUL byte");
    }
    if let Some(uuid) = nqn.strip_prefix(UUID_NQN_PREFIX) {
        return if is_uuid(uuid) { Ok(()) } else { invalid("the uuid format needs a 36-character UUID") };
    }
    let Some(rest) = nqn.strip_prefix("nqn.") else {
        return invalid("does not start with \"nqn.\"");
    };
    let date = rest.as_bytes();
    let digits = |range: core::ops::Range<usize>| date.get(range).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if !(digits(0..4) && date.get(4) == Some(&b'-') && digits(5..7) && date.get(7) == Some(&b'.')) {
        return invalid("the date must follow \"nqn.\" as yyyy-mm.");
    }
    let month = (date[5] - b'0') * 10 + (date[6] - b'0');
    if !(1..=12).contains(&month) {
        return invalid("the month is not 01 to 12");
    }
    let domain = rest[8..].split(':').next().unwrap_or_default();
    if domain.is_empty() || domain.starts_with('.') || domain.ends_with('.') {
        return invalid("the reverse domain name is missing");
    }
    Ok(())
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<ConnectCommand>() == 64);
    assert!(offset_of!(ConnectCommand, fctype) == 4);
    assert!(offset_of!(ConnectCommand, sgl) == 24);
    assert!(offset_of!(ConnectCommand, recfmt) == connect_command_offset::RECFMT as usize);
    assert!(offset_of!(ConnectCommand, qid) == connect_command_offset::QID as usize);
    assert!(offset_of!(ConnectCommand, sqsize) == connect_command_offset::SQSIZE as usize);
    assert!(offset_of!(ConnectCommand, cattr) == connect_command_offset::CATTR as usize);
    assert!(offset_of!(ConnectCommand, kato) == connect_command_offset::KATO as usize);
    assert!(size_of::<ConnectData>() == 1024);
    assert!(offset_of!(ConnectData, cntlid) == connect_data_offset::CNTLID as usize);
    assert!(offset_of!(ConnectData, subnqn) == connect_data_offset::SUBNQN as usize);
    assert!(offset_of!(ConnectData, hostnqn) == connect_data_offset::HOSTNQN as usize);
    assert!(size_of::<PropertyCommand>() == 64);
    assert!(offset_of!(PropertyCommand, attrib) == 40);
    assert!(offset_of!(PropertyCommand, offset) == 44);
    assert!(offset_of!(PropertyCommand, value) == 48);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nqn_rules() {
        for ok in [
            DISCOVERY_NQN,
            "nqn.2024-01.com.example:vol-1",
            "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            "nqn.2016-06.io.spdk:cnode1",
        ] {
            assert_eq!(validate_nqn(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "iqn.2024-01.com.example",
            "nqn.2024-13.com.example",
            "nqn.24-01.com.example",
            "nqn.2024-01.",
            "nqn.2024-01.:x",
            "nqn.2014-08.org.nvmexpress:uuid:not-a-uuid",
            "nqn.2024-01.com.ex\0ample",
        ] {
            assert!(matches!(validate_nqn(bad), Err(Error::InvalidNqn { .. })), "{bad:?}");
        }
        let long = format!("nqn.2024-01.com.example:{}", "x".repeat(NQN_MAX_LEN - 24));
        assert_eq!(long.len(), NQN_MAX_LEN);
        assert_eq!(validate_nqn(&long), Ok(()));
        assert!(validate_nqn(&format!("{long}x")).is_err());
    }

    #[test]
    fn connect_views() {
        let cmd = ConnectCommand::new(7, 0, 31, 0, 5000, SglDescriptor::in_capsule(0, 1024));
        let sqe = *cmd.as_sqe();
        assert!(sqe.is_fabrics());
        assert_eq!(sqe.fctype(), fctype::CONNECT);
        assert_eq!(sqe.cid(), 7);
        let view = sqe.as_connect();
        assert_eq!((view.qid(), view.sqsize(), view.kato_ms(), view.recfmt()), (0, 31, 5000, 0));
        assert_eq!(view.sgl().length(), 1024);

        let data = ConnectData::new([1; 16], CNTLID_DYNAMIC, "nqn.2024-01.com.example:sub", DISCOVERY_NQN).unwrap();
        let parsed = ConnectData::ref_from_bytes(data.as_bytes()).unwrap();
        assert_eq!(parsed.subnqn(), Some("nqn.2024-01.com.example:sub"));
        assert_eq!(parsed.hostnqn(), Some(DISCOVERY_NQN));
        assert_eq!(parsed.cntlid(), 0xffff);
        assert_eq!(&data.as_bytes()[16..18], &[0xff, 0xff]);
        assert_eq!(&data.as_bytes()[256..260], b"nqn.");

        let mut unterminated = ConnectData::new_zeroed();
        unterminated.subnqn.fill(b'a');
        assert_eq!(unterminated.subnqn(), None);
    }

    #[test]
    fn property_commands() {
        let get = PropertyCommand::get(1, 0, true);
        let b = get.as_bytes();
        assert_eq!((b[0], b[4], b[40]), (0x7f, fctype::PROPERTY_GET, 1));
        assert_eq!(get.as_sqe().as_property().size(), Some(8));
        let set = PropertyCommand::set(2, 0x14, false, 0x46_0001);
        assert_eq!(&set.as_bytes()[44..52], &[0x14, 0, 0, 0, 0x01, 0, 0x46, 0]);
        assert_eq!((set.size(), set.offset(), set.value()), (Some(4), 0x14, 0x46_0001));
        assert_eq!(connect_ipo_iattr(connect_data_offset::SUBNQN, true), 0x1_0100);
        assert_eq!(connect_success_dw0(1, 0), 1);
    }
}
