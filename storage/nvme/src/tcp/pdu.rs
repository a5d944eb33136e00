//! PDU types, flags and header layouts (NVMe/TCP Transport Specification 1.0, "PDU Common Header" and the
//! sections of each PDU type).

use core::fmt;

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::spec::{Cqe, Sqe};

/// Length of the PDU common header.
pub const CH_LEN: usize = 8;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// PDU Format Version 1.0, the only one defined.
pub const PFV_1_0: u16 = 0;
/// Largest HPDA/CPDA value: data aligned to (31 + 1) * 4 = 128 bytes.
pub const MAX_PDA: u8 = 31;
/// Smallest MAXH2CDATA a controller may report (the Linux host refuses less, and values not a multiple of 4).
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Most bytes of the offending PDU header a Terminate Connection Request carries.
pub const TERM_REQ_MAX_ERROR_DATA: usize = 128;
/// Largest PLEN of a Terminate Connection Request: its 24-byte header plus [`TERM_REQ_MAX_ERROR_DATA`].
pub const TERM_REQ_MAX_PLEN: u32 = 24 + TERM_REQ_MAX_ERROR_DATA as u32;
/// Most in-capsule data a host may send with an admin or Fabrics command regardless of IOCCSZ (8 KiB, as the
/// Linux host does).
pub const ADMIN_IN_CAPSULE_DATA: u32 = 8192;
/// IANA port of NVMe/TCP I/O controllers.
pub const PORT: u16 = 4420;
/// IANA port of NVMe/TCP discovery controllers.
pub const DISCOVERY_PORT: u16 = 8009;

/// Who sends a PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host to controller: ICReq, H2CTermReq, CapsuleCmd, H2CData. A controller decodes these.
    HostToController,
    /// Controller to host: ICResp, C2HTermReq, CapsuleResp, C2HData, R2T. A host decodes these.
    ControllerToHost,
}

/// PDU-Type values of the common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PduType {
    /// Initialize Connection Request.
    IcReq = 0x00,
    /// Initialize Connection Response.
    IcResp = 0x01,
    /// Host to Controller Terminate Connection Request.
    H2CTermReq = 0x02,
    /// Controller to Host Terminate Connection Request.
    C2HTermReq = 0x03,
    /// Command Capsule.
    CapsuleCmd = 0x04,
    /// Response Capsule.
    CapsuleResp = 0x05,
    /// Host to Controller Data.
    H2CData = 0x06,
    /// Controller to Host Data.
    C2HData = 0x07,
    /// Ready to Transfer.
    R2T = 0x09,
}

impl PduType {
    /// The type for a PDU-Type value, `None` for reserved values.
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2CTermReq,
            0x03 => Self::C2HTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2CData,
            0x07 => Self::C2HData,
            0x09 => Self::R2T,
            _ => return None,
        })
    }

    /// The fixed HLEN of this type.
    pub const fn header_len(self) -> u8 {
        match self {
            Self::IcReq | Self::IcResp => 128,
            Self::CapsuleCmd => 72,
            Self::H2CTermReq | Self::C2HTermReq | Self::CapsuleResp | Self::H2CData | Self::C2HData | Self::R2T => 24,
        }
    }

    /// Who sends PDUs of this type.
    pub const fn direction(self) -> Direction {
        match self {
            Self::IcReq | Self::H2CTermReq | Self::CapsuleCmd | Self::H2CData => Direction::HostToController,
            Self::IcResp | Self::C2HTermReq | Self::CapsuleResp | Self::C2HData | Self::R2T => {
                Direction::ControllerToHost
            }
        }
    }

    /// Whether negotiated digests apply: ICReq, ICResp and the Terminate Connection Requests never carry them.
    pub const fn has_digests(self) -> bool {
        !matches!(self, Self::IcReq | Self::IcResp | Self::H2CTermReq | Self::C2HTermReq)
    }

    /// Whether PDU data located by PDO may follow the header (CapsuleCmd in-capsule data, H2CData, C2HData).
    pub const fn may_carry_data(self) -> bool {
        matches!(self, Self::CapsuleCmd | Self::H2CData | Self::C2HData)
    }
}

/// Common header flags (byte 1).
pub mod flags {
    /// HDGSTF: a header digest follows the PDU header.
    pub const HDGSTF: u8 = 1 << 0;
    /// DDGSTF: a data digest follows the PDU data.
    pub const DDGSTF: u8 = 1 << 1;
    /// LAST_PDU of H2CData and C2HData: the last data PDU of the transfer (of the R2T for H2CData).
    pub const DATA_LAST: u8 = 1 << 2;
    /// SUCCESS of C2HData: the command completed successfully and no CapsuleResp follows; requires LAST_PDU.
    pub const DATA_SUCCESS: u8 = 1 << 3;
}

/// Digest bits (DGST) of ICReq and ICResp.
pub mod digest_bits {
    /// HDGST_ENABLE.
    pub const HEADER: u8 = 1 << 0;
    /// DDGST_ENABLE.
    pub const DATA: u8 = 1 << 1;
}

/// Fatal Error Status of a Terminate Connection Request (NVMe/TCP Transport Specification 1.0, "H2CTermReq"
/// and "C2HTermReq" Fatal Error Status values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FatalErrorStatus {
    /// Invalid PDU Header Field; FEI is the byte offset of the field.
    InvalidHeaderField = 0x01,
    /// PDU Sequence Error.
    PduSequenceError = 0x02,
    /// Header Digest Error.
    HeaderDigestError = 0x03,
    /// Data Transfer Out of Range.
    DataTransferOutOfRange = 0x04,
    /// Data Transfer Limit Exceeded (R2T limit, MAXH2CDATA or in-capsule data size).
    DataTransferLimitExceeded = 0x05,
    /// Unsupported Parameter; FEI is the byte offset of the parameter.
    UnsupportedParameter = 0x06,
}

impl FatalErrorStatus {
    /// The status for an FES value, `None` for reserved values.
    pub const fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            0x01 => Self::InvalidHeaderField,
            0x02 => Self::PduSequenceError,
            0x03 => Self::HeaderDigestError,
            0x04 => Self::DataTransferOutOfRange,
            0x05 => Self::DataTransferLimitExceeded,
            0x06 => Self::UnsupportedParameter,
            _ => return None,
        })
    }
}

/// Byte offsets of the common header fields, for the Fatal Error Information of a Terminate Connection
/// Request.
pub mod ch_offset {
    /// PDU-Type.
    pub const TYPE: u32 = 0;
    /// FLAGS.
    pub const FLAGS: u32 = 1;
    /// HLEN.
    pub const HLEN: u32 = 2;
    /// PDO.
    pub const PDO: u32 = 3;
    /// PLEN.
    pub const PLEN: u32 = 4;
}

/// PDU common header, 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CommonHeader {
    pdu_type: u8,
    flags: u8,
    hlen: u8,
    pdo: u8,
    plen: U32,
}

impl CommonHeader {
    pub(crate) const fn new(pdu_type: PduType, flags: u8, pdo: u8, plen: u32) -> Self {
        Self { pdu_type: pdu_type as u8, flags, hlen: pdu_type.header_len(), pdo, plen: U32::new(plen) }
    }

    /// PDU-Type byte.
    pub fn pdu_type(&self) -> u8 {
        self.pdu_type
    }

    /// FLAGS byte, see [`flags`].
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Header Length: bytes of the PDU header, without the header digest.
    pub fn hlen(&self) -> u8 {
        self.hlen
    }

    /// PDU Data Offset: where the PDU data starts, 0 when there is none.
    pub fn pdo(&self) -> u8 {
        self.pdo
    }

    /// PDU Length: bytes of the whole PDU, header, digests, padding and data.
    pub fn plen(&self) -> u32 {
        self.plen.get()
    }
}

impl fmt::Debug for CommonHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommonHeader")
            .field("type", &self.pdu_type)
            .field("flags", &format_args!("{:#04x}", self.flags))
            .field("hlen", &self.hlen)
            .field("pdo", &self.pdo)
            .field("plen", &self.plen())
            .finish()
    }
}

/// ICReq PDU, 128 bytes (NVMe/TCP Transport Specification 1.0, "Initialize Connection Request PDU").
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IcReq {
    ch: CommonHeader,
    pfv: U16,
    hpda: u8,
    dgst: u8,
    maxr2t: U32,
    reserved: [u8; 112],
}

impl IcReq {
    pub(crate) fn new(hpda: u8, header_digest: bool, data_digest: bool, maxr2t: u32) -> Self {
        Self {
            ch: CommonHeader::new(PduType::IcReq, 0, 0, 128),
            pfv: U16::new(PFV_1_0),
            hpda,
            dgst: dgst_byte(header_digest, data_digest),
            maxr2t: U32::new(maxr2t),
            reserved: [0; 112],
        }
    }

    /// Common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// PDU Format Version.
    pub fn pfv(&self) -> u16 {
        self.pfv.get()
    }

    /// Host PDU Data Alignment: the controller aligns C2H PDU data to (HPDA + 1) * 4 bytes.
    pub fn hpda(&self) -> u8 {
        self.hpda
    }

    /// The host asks for header digests.
    pub fn header_digest(&self) -> bool {
        self.dgst & digest_bits::HEADER != 0
    }

    /// The host asks for data digests.
    pub fn data_digest(&self) -> bool {
        self.dgst & digest_bits::DATA != 0
    }

    /// Maximum Number of Outstanding R2T per command, 0's based.
    pub fn maxr2t(&self) -> u32 {
        self.maxr2t.get()
    }
}

impl fmt::Debug for IcReq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcReq")
            .field("pfv", &self.pfv())
            .field("hpda", &self.hpda)
            .field("header_digest", &self.header_digest())
            .field("data_digest", &self.data_digest())
            .field("maxr2t", &self.maxr2t())
            .finish()
    }
}

/// ICResp PDU, 128 bytes (NVMe/TCP Transport Specification 1.0, "Initialize Connection Response PDU").
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IcResp {
    ch: CommonHeader,
    pfv: U16,
    cpda: u8,
    dgst: u8,
    maxh2cdata: U32,
    reserved: [u8; 112],
}

impl IcResp {
    pub(crate) fn new(cpda: u8, header_digest: bool, data_digest: bool, maxh2cdata: u32) -> Self {
        Self {
            ch: CommonHeader::new(PduType::IcResp, 0, 0, 128),
            pfv: U16::new(PFV_1_0),
            cpda,
            dgst: dgst_byte(header_digest, data_digest),
            maxh2cdata: U32::new(maxh2cdata),
            reserved: [0; 112],
        }
    }

    /// Common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// PDU Format Version.
    pub fn pfv(&self) -> u16 {
        self.pfv.get()
    }

    /// Controller PDU Data Alignment: the host aligns H2C PDU data to (CPDA + 1) * 4 bytes.
    pub fn cpda(&self) -> u8 {
        self.cpda
    }

    /// Header digests are enabled.
    pub fn header_digest(&self) -> bool {
        self.dgst & digest_bits::HEADER != 0
    }

    /// Data digests are enabled.
    pub fn data_digest(&self) -> bool {
        self.dgst & digest_bits::DATA != 0
    }

    /// Maximum bytes of data in one H2CData PDU.
    pub fn maxh2cdata(&self) -> u32 {
        self.maxh2cdata.get()
    }
}

impl fmt::Debug for IcResp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IcResp")
            .field("pfv", &self.pfv())
            .field("cpda", &self.cpda)
            .field("header_digest", &self.header_digest())
            .field("data_digest", &self.data_digest())
            .field("maxh2cdata", &self.maxh2cdata())
            .finish()
    }
}

/// H2CTermReq and C2HTermReq header, 24 bytes (NVMe/TCP Transport Specification 1.0, "Host to Controller
/// Terminate Connection Request PDU"); the offending PDU header, up to 128 bytes, follows as PDU data.
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TermReq {
    ch: CommonHeader,
    fes: U16,
    fei: U32,
    reserved: [u8; 10],
}

impl TermReq {
    pub(crate) fn new(pdu_type: PduType, fes: FatalErrorStatus, fei: u32, error_data_len: usize) -> Self {
        Self {
            ch: CommonHeader::new(pdu_type, 0, 0, 24 + error_data_len as u32),
            fes: U16::new(fes as u16),
            fei: U32::new(fei),
            reserved: [0; 10],
        }
    }

    /// Common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// Fatal Error Status value.
    pub fn fes(&self) -> u16 {
        self.fes.get()
    }

    /// Fatal Error Status, `None` for a reserved value.
    pub fn fatal_error_status(&self) -> Option<FatalErrorStatus> {
        FatalErrorStatus::from_u16(self.fes())
    }

    /// Fatal Error Information: the byte offset of the field in error for FES 01h and 06h.
    pub fn fei(&self) -> u32 {
        self.fei.get()
    }
}

impl fmt::Debug for TermReq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TermReq").field("ch", &self.ch).field("fes", &self.fes()).field("fei", &self.fei()).finish()
    }
}

/// CapsuleCmd header, 72 bytes: common header and the submission queue entry (NVMe/TCP Transport
/// Specification 1.0, "Command Capsule PDU"); in-capsule data may follow at PDO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CapsuleCmd {
    ch: CommonHeader,
    sqe: Sqe,
}

impl CapsuleCmd {
    pub(crate) fn new(flags: u8, pdo: u8, plen: u32, sqe: Sqe) -> Self {
        Self { ch: CommonHeader::new(PduType::CapsuleCmd, flags, pdo, plen), sqe }
    }

    /// Common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// The command.
    pub fn sqe(&self) -> &Sqe {
        &self.sqe
    }
}

/// CapsuleResp PDU, 24 bytes: common header and the completion queue entry (NVMe/TCP Transport
/// Specification 1.0, "Response Capsule PDU").
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct CapsuleResp {
    ch: CommonHeader,
    cqe: Cqe,
}

impl CapsuleResp {
    pub(crate) fn new(flags: u8, plen: u32, cqe: Cqe) -> Self {
        Self { ch: CommonHeader::new(PduType::CapsuleResp, flags, 0, plen), cqe }
    }

    /// Common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// The completion.
    pub fn cqe(&self) -> &Cqe {
        &self.cqe
    }
}

/// H2CData and C2HData header, 24 bytes (NVMe/TCP Transport Specification 1.0, "Host to Controller Data
/// Transfer PDU", "Controller to Host Data Transfer PDU"); the TTAG field is reserved in C2HData.
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DataHeader {
    ch: CommonHeader,
    cccid: U16,
    ttag: U16,
    datao: U32,
    datal: U32,
    reserved: [u8; 4],
}

impl DataHeader {
    pub(crate) fn new(ch: CommonHeader, cccid: u16, ttag: u16, datao: u32, datal: u32) -> Self {
        Self {
            ch,
            cccid: U16::new(cccid),
            ttag: U16::new(ttag),
            datao: U32::new(datao),
            datal: U32::new(datal),
            reserved: [0; 4],
        }
    }

    /// Common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// Command Capsule CID of the command the data belongs to.
    pub fn cccid(&self) -> u16 {
        self.cccid.get()
    }

    /// Transfer Tag copied from the R2T (H2CData only).
    pub fn ttag(&self) -> u16 {
        self.ttag.get()
    }

    /// Data Offset of this PDU's data within the command's data.
    pub fn datao(&self) -> u32 {
        self.datao.get()
    }

    /// Data Length: bytes of data in this PDU.
    pub fn datal(&self) -> u32 {
        self.datal.get()
    }

    /// LAST_PDU flag.
    pub fn last(&self) -> bool {
        self.ch.flags & flags::DATA_LAST != 0
    }

    /// SUCCESS flag (C2HData only): no CapsuleResp follows.
    pub fn success(&self) -> bool {
        self.ch.flags & flags::DATA_SUCCESS != 0
    }
}

impl fmt::Debug for DataHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataHeader")
            .field("ch", &self.ch)
            .field("cccid", &self.cccid())
            .field("ttag", &self.ttag())
            .field("datao", &self.datao())
            .field("datal", &self.datal())
            .finish()
    }
}

/// R2T PDU, 24 bytes (NVMe/TCP Transport Specification 1.0, "Ready to Transfer PDU").
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct R2t {
    ch: CommonHeader,
    cccid: U16,
    ttag: U16,
    r2to: U32,
    r2tl: U32,
    reserved: [u8; 4],
}

impl R2t {
    pub(crate) fn new(flags: u8, plen: u32, cccid: u16, ttag: u16, r2to: u32, r2tl: u32) -> Self {
        Self {
            ch: CommonHeader::new(PduType::R2T, flags, 0, plen),
            cccid: U16::new(cccid),
            ttag: U16::new(ttag),
            r2to: U32::new(r2to),
            r2tl: U32::new(r2tl),
            reserved: [0; 4],
        }
    }

    /// Common header.
    pub fn common(&self) -> &CommonHeader {
        &self.ch
    }

    /// Command Capsule CID.
    pub fn cccid(&self) -> u16 {
        self.cccid.get()
    }

    /// Transfer Tag the host copies into its H2CData PDUs.
    pub fn ttag(&self) -> u16 {
        self.ttag.get()
    }

    /// R2T Offset: where in the command's data the requested range starts.
    pub fn r2to(&self) -> u32 {
        self.r2to.get()
    }

    /// R2T Length: bytes requested.
    pub fn r2tl(&self) -> u32 {
        self.r2tl.get()
    }
}

impl fmt::Debug for R2t {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("R2t")
            .field("cccid", &self.cccid())
            .field("ttag", &self.ttag())
            .field("r2to", &self.r2to())
            .field("r2tl", &self.r2tl())
            .finish()
    }
}

/// A decoded PDU header, copied out of the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduHeader {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq; the offending header is the PDU data.
    H2CTermReq(TermReq),
    /// C2HTermReq; the offending header is the PDU data.
    C2HTermReq(TermReq),
    /// CapsuleCmd; in-capsule data, if any, is the PDU data.
    CapsuleCmd(CapsuleCmd),
    /// CapsuleResp.
    CapsuleResp(CapsuleResp),
    /// H2CData.
    H2CData(DataHeader),
    /// C2HData.
    C2HData(DataHeader),
    /// R2T.
    R2T(R2t),
}

impl PduHeader {
    /// The header bytes as received (HLEN bytes).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::IcReq(h) => h.as_bytes(),
            Self::IcResp(h) => h.as_bytes(),
            Self::H2CTermReq(h) | Self::C2HTermReq(h) => h.as_bytes(),
            Self::CapsuleCmd(h) => h.as_bytes(),
            Self::CapsuleResp(h) => h.as_bytes(),
            Self::H2CData(h) | Self::C2HData(h) => h.as_bytes(),
            Self::R2T(h) => h.as_bytes(),
        }
    }

    /// The common header.
    pub fn common(&self) -> &CommonHeader {
        match self {
            Self::IcReq(h) => h.common(),
            Self::IcResp(h) => h.common(),
            Self::H2CTermReq(h) | Self::C2HTermReq(h) => h.common(),
            Self::CapsuleCmd(h) => h.common(),
            Self::CapsuleResp(h) => h.common(),
            Self::H2CData(h) | Self::C2HData(h) => h.common(),
            Self::R2T(h) => h.common(),
        }
    }

    /// The PDU type.
    pub fn pdu_type(&self) -> PduType {
        match self {
            Self::IcReq(_) => PduType::IcReq,
            Self::IcResp(_) => PduType::IcResp,
            Self::H2CTermReq(_) => PduType::H2CTermReq,
            Self::C2HTermReq(_) => PduType::C2HTermReq,
            Self::CapsuleCmd(_) => PduType::CapsuleCmd,
            Self::CapsuleResp(_) => PduType::CapsuleResp,
            Self::H2CData(_) => PduType::H2CData,
            Self::C2HData(_) => PduType::C2HData,
            Self::R2T(_) => PduType::R2T,
        }
    }

    /// The command identifier the PDU refers to (the SQE or CQE CID, or CCCID), if any.
    pub fn command_id(&self) -> Option<u16> {
        match self {
            Self::CapsuleCmd(h) => Some(h.sqe().cid()),
            Self::CapsuleResp(h) => Some(h.cqe().cid()),
            Self::H2CData(h) | Self::C2HData(h) => Some(h.cccid()),
            Self::R2T(h) => Some(h.cccid()),
            Self::IcReq(_) | Self::IcResp(_) | Self::H2CTermReq(_) | Self::C2HTermReq(_) => None,
        }
    }
}

fn dgst_byte(header: bool, data: bool) -> u8 {
    (if header { digest_bits::HEADER } else { 0 }) | if data { digest_bits::DATA } else { 0 }
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<CommonHeader>() == CH_LEN);
    assert!(offset_of!(CommonHeader, flags) == ch_offset::FLAGS as usize);
    assert!(offset_of!(CommonHeader, hlen) == ch_offset::HLEN as usize);
    assert!(offset_of!(CommonHeader, pdo) == ch_offset::PDO as usize);
    assert!(offset_of!(CommonHeader, plen) == ch_offset::PLEN as usize);
    assert!(size_of::<IcReq>() == PduType::IcReq.header_len() as usize);
    assert!(offset_of!(IcReq, pfv) == 8 && offset_of!(IcReq, hpda) == 10);
    assert!(offset_of!(IcReq, dgst) == 11 && offset_of!(IcReq, maxr2t) == 12);
    assert!(size_of::<IcResp>() == PduType::IcResp.header_len() as usize);
    assert!(offset_of!(IcResp, cpda) == 10 && offset_of!(IcResp, dgst) == 11);
    assert!(offset_of!(IcResp, maxh2cdata) == 12);
    assert!(size_of::<TermReq>() == PduType::H2CTermReq.header_len() as usize);
    assert!(offset_of!(TermReq, fes) == 8 && offset_of!(TermReq, fei) == 10);
    assert!(size_of::<CapsuleCmd>() == PduType::CapsuleCmd.header_len() as usize);
    assert!(offset_of!(CapsuleCmd, sqe) == 8);
    assert!(size_of::<CapsuleResp>() == PduType::CapsuleResp.header_len() as usize);
    assert!(offset_of!(CapsuleResp, cqe) == 8);
    assert!(size_of::<DataHeader>() == PduType::H2CData.header_len() as usize);
    assert!(offset_of!(DataHeader, cccid) == 8 && offset_of!(DataHeader, ttag) == 10);
    assert!(offset_of!(DataHeader, datao) == 12 && offset_of!(DataHeader, datal) == 16);
    assert!(size_of::<R2t>() == PduType::R2T.header_len() as usize);
    assert!(offset_of!(R2t, cccid) == 8 && offset_of!(R2t, ttag) == 10);
    assert!(offset_of!(R2t, r2to) == 12 && offset_of!(R2t, r2tl) == 16);
};
