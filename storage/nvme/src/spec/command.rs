//! Submission and completion queue entries, SGL descriptors, opcodes and status values
//! (NVMe Base Specification 2.0: "Submission Queue Entry", "Scatter Gather List (SGL)", "Completion Queue
//! Entry", "Status Field Definition", "Admin Command Set", NVM Command Set Specification 1.0: "I/O Commands").

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Admin command opcodes (NVMe Base Specification 2.0, "Admin Command Set", Opcodes for Admin Commands).
pub mod admin_opcode {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    /// Namespace Management.
    pub const NAMESPACE_MANAGEMENT: u8 = 0x0d;
    /// Namespace Attachment.
    pub const NAMESPACE_ATTACHMENT: u8 = 0x15;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Directive Send.
    pub const DIRECTIVE_SEND: u8 = 0x19;
    /// Directive Receive.
    pub const DIRECTIVE_RECEIVE: u8 = 0x1a;
}

/// NVM command set I/O opcodes (NVM Command Set Specification 1.0, "Opcodes for NVM Commands").
pub mod io_opcode {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    /// Verify.
    pub const VERIFY: u8 = 0x0c;
}

/// SGL descriptor types, bits 7:4 of the SGL Identifier (NVMe Base Specification 2.0, "SGL Descriptor Type").
pub mod sgl_type {
    /// SGL Data Block descriptor.
    pub const DATA_BLOCK: u8 = 0x0;
    /// SGL Bit Bucket descriptor.
    pub const BIT_BUCKET: u8 = 0x1;
    /// SGL Segment descriptor.
    pub const SEGMENT: u8 = 0x2;
    /// SGL Last Segment descriptor.
    pub const LAST_SEGMENT: u8 = 0x3;
    /// Keyed SGL Data Block descriptor (RDMA).
    pub const KEYED_DATA_BLOCK: u8 = 0x4;
    /// Transport SGL Data Block descriptor.
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5;
}

/// SGL descriptor sub types, bits 3:0 of the SGL Identifier (NVMe Base Specification 2.0, "SGL Descriptor
/// Sub Type"; NVMe/TCP Transport Specification 1.0, "SGL Descriptor Sub Type" for `0xA`).
pub mod sgl_subtype {
    /// The Address field is an absolute address.
    pub const ADDRESS: u8 = 0x0;
    /// The Address field is an offset into the in-capsule data.
    pub const OFFSET: u8 = 0x1;
    /// Transport specific: NVMe/TCP transfers the data with R2T/H2CData or C2HData PDUs.
    pub const TRANSPORT: u8 = 0xa;
}

/// SGL Identifier byte `(type << 4) | subtype` the Linux NVMe/TCP host puts in commands with in-capsule data.
pub const SGL_ID_IN_CAPSULE: u8 = (sgl_type::DATA_BLOCK << 4) | sgl_subtype::OFFSET;
/// SGL Identifier byte for data moved by R2T/H2CData (writes) or C2HData (reads), and for commands without data.
pub const SGL_ID_TRANSPORT: u8 = (sgl_type::TRANSPORT_DATA_BLOCK << 4) | sgl_subtype::TRANSPORT;

/// PSDT value (CDW0 bits 15:14) selecting SGLs with the metadata pointer as a single buffer; NVMe over Fabrics
/// commands always use SGLs.
pub const PSDT_SGL_MPTR_BUFFER: u8 = 0b01;

/// SGL descriptor, 16 bytes (NVMe Base Specification 2.0, "Scatter Gather List (SGL)": SGL Data Block,
/// Transport SGL Data Block and, through [`SglDescriptor::keyed_length`], Keyed SGL Data Block layouts).
#[derive(Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SglDescriptor {
    address: U64,
    length: U32,
    reserved: [u8; 3],
    identifier: u8,
}

/// What an SGL descriptor in a command's Data Pointer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SglKind {
    /// Data Block with the Offset sub type: the data is in the command capsule, at `offset` bytes into the
    /// in-capsule data.
    InCapsule { offset: u64, length: u32 },
    /// Transport SGL Data Block with the NVMe/TCP transport sub type: the data moves in H2CData PDUs after
    /// R2Ts (host to controller) or in C2HData PDUs (controller to host). A length of 0 means no data.
    Transport { length: u32 },
    /// Keyed SGL Data Block (RDMA only).
    Keyed,
    /// Any other type/sub type combination; NVMe/TCP does not use it.
    Other { descriptor_type: u8, subtype: u8 },
}

impl SglDescriptor {
    /// Data Block descriptor with the Offset sub type, for `length` bytes of in-capsule data at `offset`.
    pub const fn in_capsule(offset: u64, length: u32) -> Self {
        Self { address: U64::new(offset), length: U32::new(length), reserved: [0; 3], identifier: SGL_ID_IN_CAPSULE }
    }

    /// Transport SGL Data Block descriptor for `length` bytes moved by R2T/H2CData or C2HData PDUs
    /// (`length` 0: the command transfers no data).
    pub const fn transport(length: u32) -> Self {
        Self { address: U64::new(0), length: U32::new(length), reserved: [0; 3], identifier: SGL_ID_TRANSPORT }
    }

    /// Address field (bytes 7:0).
    pub fn address(&self) -> u64 {
        self.address.get()
    }

    /// Length field of an unkeyed descriptor (bytes 11:8).
    pub fn length(&self) -> u32 {
        self.length.get()
    }

    /// Length field of a Keyed SGL Data Block descriptor (bytes 10:8, 24 bits).
    pub fn keyed_length(&self) -> u32 {
        self.length.get() & 0x00ff_ffff
    }

    /// SGL Identifier (byte 15).
    pub fn identifier(&self) -> u8 {
        self.identifier
    }

    /// SGL Descriptor Type (byte 15 bits 7:4), see [`sgl_type`].
    pub fn descriptor_type(&self) -> u8 {
        self.identifier >> 4
    }

    /// SGL Descriptor Sub Type (byte 15 bits 3:0), see [`sgl_subtype`].
    pub fn subtype(&self) -> u8 {
        self.identifier & 0x0f
    }

    /// Classifies the descriptor for an NVMe/TCP controller.
    pub fn kind(&self) -> SglKind {
        match (self.descriptor_type(), self.subtype()) {
            (sgl_type::DATA_BLOCK, sgl_subtype::OFFSET) => {
                SglKind::InCapsule { offset: self.address(), length: self.length() }
            }
            (sgl_type::TRANSPORT_DATA_BLOCK, sgl_subtype::TRANSPORT) => SglKind::Transport { length: self.length() },
            (sgl_type::KEYED_DATA_BLOCK, _) => SglKind::Keyed,
            (descriptor_type, subtype) => SglKind::Other { descriptor_type, subtype },
        }
    }
}

impl fmt::Debug for SglDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SglDescriptor")
            .field("address", &self.address())
            .field("length", &self.length())
            .field("identifier", &format_args!("{:#04x}", self.identifier))
            .finish()
    }
}

/// Submission queue entry, 64 bytes (NVMe Base Specification 2.0, "Common Command Format"). Over NVMe/TCP it is
/// the body of a CapsuleCmd PDU and the Data Pointer is always one SGL descriptor.
#[derive(Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Sqe {
    opcode: u8,
    flags: u8,
    cid: U16,
    nsid: U32,
    cdw2: U32,
    cdw3: U32,
    mptr: U64,
    dptr: SglDescriptor,
    cdw10: U32,
    cdw11: U32,
    cdw12: U32,
    cdw13: U32,
    cdw14: U32,
    cdw15: U32,
}

impl Sqe {
    /// A command with `opcode` and `cid`, SGL data transfer (PSDT 01b) and an empty transport SGL; the other
    /// fields are zero.
    pub const fn new(opcode: u8, cid: u16) -> Self {
        Self {
            opcode,
            flags: PSDT_SGL_MPTR_BUFFER << 6,
            cid: U16::new(cid),
            nsid: U32::new(0),
            cdw2: U32::new(0),
            cdw3: U32::new(0),
            mptr: U64::new(0),
            dptr: SglDescriptor::transport(0),
            cdw10: U32::new(0),
            cdw11: U32::new(0),
            cdw12: U32::new(0),
            cdw13: U32::new(0),
            cdw14: U32::new(0),
            cdw15: U32::new(0),
        }
    }

    /// Opcode (CDW0 bits 7:0).
    pub fn opcode(&self) -> u8 {
        self.opcode
    }

    /// CDW0 bits 15:8: FUSE in bits 1:0 and PSDT in bits 7:6.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Fused Operation (CDW0 bits 9:8).
    pub fn fuse(&self) -> u8 {
        self.flags & 0b11
    }

    /// PRP or SGL for Data Transfer (CDW0 bits 15:14); NVMe over Fabrics requires SGLs (01b or 10b).
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }

    /// Command Identifier (CDW0 bits 31:16).
    pub fn cid(&self) -> u16 {
        self.cid.get()
    }

    /// Namespace Identifier (CDW1).
    pub fn nsid(&self) -> u32 {
        self.nsid.get()
    }

    /// Fabrics Command Type (byte 4) of a Fabrics command (opcode [`crate::spec::fabrics::FABRICS_OPCODE`]).
    pub fn fctype(&self) -> u8 {
        self.nsid.get().to_le_bytes()[0]
    }

    /// Metadata Pointer (CDW5:CDW4).
    pub fn mptr(&self) -> u64 {
        self.mptr.get()
    }

    /// Data Pointer as SGL Entry 1 (CDW9:CDW6).
    pub fn sgl(&self) -> &SglDescriptor {
        &self.dptr
    }

    /// Command Dword 2.
    pub fn cdw2(&self) -> u32 {
        self.cdw2.get()
    }

    /// Command Dword 3.
    pub fn cdw3(&self) -> u32 {
        self.cdw3.get()
    }

    /// Command Dword 10.
    pub fn cdw10(&self) -> u32 {
        self.cdw10.get()
    }

    /// Command Dword 11.
    pub fn cdw11(&self) -> u32 {
        self.cdw11.get()
    }

    /// Command Dword 12.
    pub fn cdw12(&self) -> u32 {
        self.cdw12.get()
    }

    /// Command Dword 13.
    pub fn cdw13(&self) -> u32 {
        self.cdw13.get()
    }

    /// Command Dword 14.
    pub fn cdw14(&self) -> u32 {
        self.cdw14.get()
    }

    /// Command Dword 15.
    pub fn cdw15(&self) -> u32 {
        self.cdw15.get()
    }

    /// Sets CDW0 bits 15:8 (FUSE and PSDT).
    pub fn set_flags(&mut self, flags: u8) -> &mut Self {
        self.flags = flags;
        self
    }

    /// Sets the Namespace Identifier.
    pub fn set_nsid(&mut self, nsid: u32) -> &mut Self {
        self.nsid.set(nsid);
        self
    }

    /// Sets the Data Pointer.
    pub fn set_sgl(&mut self, sgl: SglDescriptor) -> &mut Self {
        self.dptr = sgl;
        self
    }

    /// Sets Command Dwords 10 to 15, in order.
    pub fn set_cdws(&mut self, cdw: [u32; 6]) -> &mut Self {
        for (field, value) in
            [&mut self.cdw10, &mut self.cdw11, &mut self.cdw12, &mut self.cdw13, &mut self.cdw14, &mut self.cdw15]
                .into_iter()
                .zip(cdw)
        {
            field.set(value);
        }
        self
    }

    /// The Read/Write/Write Zeroes fields: Starting LBA (CDW11:CDW10) and the 0's based Number of Logical Blocks
    /// (CDW12 bits 15:0) converted to a count (NVM Command Set Specification 1.0, "Read command").
    pub fn lba_range(&self) -> (u64, u32) {
        let slba = u64::from(self.cdw11.get()) << 32 | u64::from(self.cdw10.get());
        (slba, (self.cdw12.get() & 0xffff) + 1)
    }
}

impl fmt::Debug for Sqe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sqe")
            .field("opcode", &format_args!("{:#04x}", self.opcode))
            .field("flags", &format_args!("{:#04x}", self.flags))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .field("sgl", &self.dptr)
            .field("cdw10_15", &[self.cdw10(), self.cdw11(), self.cdw12(), self.cdw13(), self.cdw14(), self.cdw15()])
            .finish_non_exhaustive()
    }
}

/// Status Code Type values (NVMe Base Specification 2.0, "Status Code Type (SCT)").
pub mod sct {
    /// Generic Command Status.
    pub const GENERIC: u8 = 0x0;
    /// Command Specific Status.
    pub const COMMAND_SPECIFIC: u8 = 0x1;
    /// Media and Data Integrity Errors.
    pub const MEDIA: u8 = 0x2;
    /// Path Related Status.
    pub const PATH: u8 = 0x3;
    /// Vendor Specific.
    pub const VENDOR: u8 = 0x7;
}

/// The Status field of a completion queue entry (NVMe Base Specification 2.0, "Status Field Definition"):
/// Status Code, Status Code Type, Command Retry Delay, More and Do Not Retry.
///
/// The value is held as bits 15:0 of CQE Dword 3's upper half, so [`Status::raw`] is what goes on the wire
/// (bit 0, the Phase Tag, is always clear: NVMe over Fabrics does not use it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Status(u16);

impl Status {
    /// Successful Completion.
    pub const SUCCESS: Self = Self::new(sct::GENERIC, 0x00);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: Self = Self::new(sct::GENERIC, 0x01);
    /// Invalid Field in Command.
    pub const INVALID_FIELD: Self = Self::new(sct::GENERIC, 0x02);
    /// Command ID Conflict.
    pub const COMMAND_ID_CONFLICT: Self = Self::new(sct::GENERIC, 0x03);
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: Self = Self::new(sct::GENERIC, 0x04);
    /// Internal Error.
    pub const INTERNAL_ERROR: Self = Self::new(sct::GENERIC, 0x06);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: Self = Self::new(sct::GENERIC, 0x07);
    /// Command Aborted due to SQ Deletion.
    pub const ABORTED_SQ_DELETION: Self = Self::new(sct::GENERIC, 0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: Self = Self::new(sct::GENERIC, 0x0b);
    /// Command Sequence Error.
    pub const COMMAND_SEQUENCE_ERROR: Self = Self::new(sct::GENERIC, 0x0c);
    /// Invalid SGL Segment Descriptor.
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: Self = Self::new(sct::GENERIC, 0x0d);
    /// Invalid Number of SGL Descriptors.
    pub const INVALID_SGL_DESCRIPTOR_COUNT: Self = Self::new(sct::GENERIC, 0x0e);
    /// Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: Self = Self::new(sct::GENERIC, 0x0f);
    /// SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Self = Self::new(sct::GENERIC, 0x11);
    /// SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: Self = Self::new(sct::GENERIC, 0x16);
    /// Host Identifier Inconsistent Format.
    pub const HOST_ID_INCONSISTENT_FORMAT: Self = Self::new(sct::GENERIC, 0x18);
    /// Keep Alive Timer Expired.
    pub const KEEP_ALIVE_TIMER_EXPIRED: Self = Self::new(sct::GENERIC, 0x19);
    /// Keep Alive Timeout Invalid.
    pub const KEEP_ALIVE_TIMEOUT_INVALID: Self = Self::new(sct::GENERIC, 0x1a);
    /// SGL Data Block Granularity Invalid.
    pub const SGL_DATA_BLOCK_GRANULARITY_INVALID: Self = Self::new(sct::GENERIC, 0x1e);
    /// Namespace is Write Protected.
    pub const NAMESPACE_WRITE_PROTECTED: Self = Self::new(sct::GENERIC, 0x20);
    /// Transient Transport Error (used for NVMe/TCP data digest errors).
    pub const TRANSIENT_TRANSPORT_ERROR: Self = Self::new(sct::GENERIC, 0x22);
    /// LBA Out of Range (NVM command set).
    pub const LBA_OUT_OF_RANGE: Self = Self::new(sct::GENERIC, 0x80);
    /// Capacity Exceeded (NVM command set).
    pub const CAPACITY_EXCEEDED: Self = Self::new(sct::GENERIC, 0x81);
    /// Namespace Not Ready (NVM command set).
    pub const NAMESPACE_NOT_READY: Self = Self::new(sct::GENERIC, 0x82);
    /// Reservation Conflict (NVM command set).
    pub const RESERVATION_CONFLICT: Self = Self::new(sct::GENERIC, 0x83);

    /// Completion Queue Invalid.
    pub const COMPLETION_QUEUE_INVALID: Self = Self::new(sct::COMMAND_SPECIFIC, 0x00);
    /// Invalid Queue Identifier.
    pub const INVALID_QUEUE_IDENTIFIER: Self = Self::new(sct::COMMAND_SPECIFIC, 0x01);
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x02);
    /// Abort Command Limit Exceeded.
    pub const ABORT_COMMAND_LIMIT_EXCEEDED: Self = Self::new(sct::COMMAND_SPECIFIC, 0x03);
    /// Asynchronous Event Request Limit Exceeded.
    pub const ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED: Self = Self::new(sct::COMMAND_SPECIFIC, 0x05);
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x09);
    /// Invalid Format.
    pub const INVALID_FORMAT: Self = Self::new(sct::COMMAND_SPECIFIC, 0x0a);
    /// Feature Identifier Not Saveable.
    pub const FEATURE_NOT_SAVEABLE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x0d);
    /// Feature Not Changeable.
    pub const FEATURE_NOT_CHANGEABLE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x0e);
    /// Feature Not Namespace Specific.
    pub const FEATURE_NOT_NAMESPACE_SPECIFIC: Self = Self::new(sct::COMMAND_SPECIFIC, 0x0f);
    /// Conflicting Attributes (Dataset Management, Read, Write).
    pub const CONFLICTING_ATTRIBUTES: Self = Self::new(sct::COMMAND_SPECIFIC, 0x80);
    /// Attempted Write to Read Only Range.
    pub const WRITE_TO_READ_ONLY_RANGE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x82);

    /// Connect Incompatible Format (NVMe over Fabrics, Connect command specific).
    pub const CONNECT_INCOMPATIBLE_FORMAT: Self = Self::new(sct::COMMAND_SPECIFIC, 0x80);
    /// Connect Controller Busy.
    pub const CONNECT_CONTROLLER_BUSY: Self = Self::new(sct::COMMAND_SPECIFIC, 0x81);
    /// Connect Invalid Parameters; Dword 0 of the completion says where ([`crate::spec::fabrics::connect_ipo_iattr`]).
    pub const CONNECT_INVALID_PARAMETERS: Self = Self::new(sct::COMMAND_SPECIFIC, 0x82);
    /// Connect Restart Discovery.
    pub const CONNECT_RESTART_DISCOVERY: Self = Self::new(sct::COMMAND_SPECIFIC, 0x83);
    /// Connect Invalid Host.
    pub const CONNECT_INVALID_HOST: Self = Self::new(sct::COMMAND_SPECIFIC, 0x84);
    /// Invalid Queue Type.
    pub const CONNECT_INVALID_QUEUE_TYPE: Self = Self::new(sct::COMMAND_SPECIFIC, 0x85);
    /// Discover Restart (Get Log Page of the discovery log).
    pub const DISCOVER_RESTART: Self = Self::new(sct::COMMAND_SPECIFIC, 0x90);
    /// Authentication Required.
    pub const AUTHENTICATION_REQUIRED: Self = Self::new(sct::COMMAND_SPECIFIC, 0x91);

    /// Write Fault.
    pub const WRITE_FAULT: Self = Self::new(sct::MEDIA, 0x80);
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ_ERROR: Self = Self::new(sct::MEDIA, 0x81);

    /// Internal Path Error.
    pub const INTERNAL_PATH_ERROR: Self = Self::new(sct::PATH, 0x00);

    const DNR: u16 = 1 << 15;
    const MORE: u16 = 1 << 14;

    /// Status with Status Code Type `sct` (3 bits) and Status Code `sc`; More and Do Not Retry clear.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Self(((sct as u16 & 0x7) << 9) | ((sc as u16) << 1))
    }

    /// Status from the 16-bit field at CQE bytes 15:14; the Phase Tag (bit 0) is dropped.
    pub const fn from_raw(raw: u16) -> Self {
        Self(raw & !1)
    }

    /// The 16-bit field as it goes into CQE bytes 15:14 (Phase Tag clear).
    pub const fn raw(self) -> u16 {
        self.0
    }

    /// Status Code Type (bits 11:9).
    pub const fn sct(self) -> u8 {
        ((self.0 >> 9) & 0x7) as u8
    }

    /// Status Code (bits 8:1).
    pub const fn sc(self) -> u8 {
        (self.0 >> 1) as u8
    }

    /// Command Retry Delay (bits 13:12).
    pub const fn crd(self) -> u8 {
        ((self.0 >> 12) & 0x3) as u8
    }

    /// More (bit 14): more status information is in the Error Information log page.
    pub const fn more(self) -> bool {
        self.0 & Self::MORE != 0
    }

    /// Do Not Retry (bit 15).
    pub const fn dnr(self) -> bool {
        self.0 & Self::DNR != 0
    }

    /// This status with Do Not Retry set.
    pub const fn with_dnr(self) -> Self {
        Self(self.0 | Self::DNR)
    }

    /// This status with More set.
    pub const fn with_more(self) -> Self {
        Self(self.0 | Self::MORE)
    }

    /// Whether the command completed successfully (SCT 0, SC 0).
    pub const fn is_success(self) -> bool {
        self.0 & 0x0ffe == 0
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status(sct={:#x}, sc={:#04x}", self.sct(), self.sc())?;
        if self.dnr() {
            f.write_str(", dnr")?;
        }
        if self.more() {
            f.write_str(", more")?;
        }
        f.write_str(")")
    }
}

/// Completion queue entry, 16 bytes (NVMe Base Specification 2.0, "Common Completion Queue Entry Layout").
/// Over NVMe/TCP it is the body of a CapsuleResp PDU.
#[derive(Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Cqe {
    dw0: U32,
    dw1: U32,
    sq_head: U16,
    sq_id: U16,
    cid: U16,
    status: U16,
}

impl Cqe {
    /// A completion for command `cid` from submission queue `sq_id`, reporting the SQ Head Pointer `sq_head`,
    /// `status` and the command specific Dwords 0 and 1.
    pub const fn new(cid: u16, sq_id: u16, sq_head: u16, status: Status, dw0: u32, dw1: u32) -> Self {
        Self {
            dw0: U32::new(dw0),
            dw1: U32::new(dw1),
            sq_head: U16::new(sq_head),
            sq_id: U16::new(sq_id),
            cid: U16::new(cid),
            status: U16::new(status.raw()),
        }
    }

    /// Command specific Dword 0.
    pub fn dw0(&self) -> u32 {
        self.dw0.get()
    }

    /// Command specific Dword 1.
    pub fn dw1(&self) -> u32 {
        self.dw1.get()
    }

    /// Dwords 1:0 as one 64-bit value (Property Get of an 8-byte property).
    pub fn result_u64(&self) -> u64 {
        u64::from(self.dw1.get()) << 32 | u64::from(self.dw0.get())
    }

    /// SQ Head Pointer.
    pub fn sq_head(&self) -> u16 {
        self.sq_head.get()
    }

    /// SQ Identifier.
    pub fn sq_id(&self) -> u16 {
        self.sq_id.get()
    }

    /// Command Identifier.
    pub fn cid(&self) -> u16 {
        self.cid.get()
    }

    /// Status field.
    pub fn status(&self) -> Status {
        Status::from_raw(self.status.get())
    }
}

impl fmt::Debug for Cqe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cqe")
            .field("cid", &self.cid())
            .field("sq_id", &self.sq_id())
            .field("sq_head", &self.sq_head())
            .field("status", &self.status())
            .field("dw0", &format_args!("{:#010x}", self.dw0()))
            .field("dw1", &format_args!("{:#010x}", self.dw1()))
            .finish()
    }
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<SglDescriptor>() == 16);
    assert!(offset_of!(SglDescriptor, length) == 8);
    assert!(offset_of!(SglDescriptor, identifier) == 15);
    assert!(size_of::<Sqe>() == 64);
    assert!(offset_of!(Sqe, cid) == 2);
    assert!(offset_of!(Sqe, nsid) == 4);
    assert!(offset_of!(Sqe, mptr) == 16);
    assert!(offset_of!(Sqe, dptr) == 24);
    assert!(offset_of!(Sqe, cdw10) == 40);
    assert!(offset_of!(Sqe, cdw15) == 60);
    assert!(size_of::<Cqe>() == 16);
    assert!(offset_of!(Cqe, sq_head) == 8);
    assert!(offset_of!(Cqe, sq_id) == 10);
    assert!(offset_of!(Cqe, cid) == 12);
    assert!(offset_of!(Cqe, status) == 14);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_bits_match_the_cqe_status_field() {
        // Linux keeps the status shifted right by one: NVME_SC_CONNECT_INVALID_PARAM = 0x182, DNR = 0x4000.
        let s = Status::CONNECT_INVALID_PARAMETERS.with_dnr();
        assert_eq!(s.raw(), (0x182 | 0x4000) << 1);
        assert_eq!((s.sct(), s.sc(), s.dnr(), s.more()), (1, 0x82, true, false));
        assert_eq!(Status::LBA_OUT_OF_RANGE.raw() >> 1, 0x080);
        assert_eq!(Status::INVALID_LOG_PAGE.raw() >> 1, 0x109);
        assert_eq!(Status::TRANSIENT_TRANSPORT_ERROR.raw() >> 1, 0x022);
        assert!(Status::SUCCESS.is_success());
        assert!(Status::from_raw(1).is_success(), "the phase tag is not part of the status");
        assert!(!Status::INVALID_FIELD.is_success());
        assert!(Status::INTERNAL_ERROR.with_more().more());
    }

    #[test]
    fn cqe_layout() {
        let cqe = Cqe::new(0x1234, 3, 7, Status::INVALID_FIELD.with_dnr(), 0xaabb_ccdd, 1);
        let b = cqe.as_bytes();
        assert_eq!(&b[0..4], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        assert_eq!(&b[8..16], &[7, 0, 3, 0, 0x34, 0x12, 0x04, 0x80]);
        assert_eq!(cqe.result_u64(), 0x1_aabb_ccdd);
    }

    #[test]
    fn sgl_classification() {
        assert_eq!(SglDescriptor::in_capsule(0, 1024).kind(), SglKind::InCapsule { offset: 0, length: 1024 });
        assert_eq!(SglDescriptor::transport(4096).kind(), SglKind::Transport { length: 4096 });
        assert_eq!(SglDescriptor::transport(4096).identifier(), 0x5a);
        assert_eq!(SglDescriptor::in_capsule(0, 1).identifier(), 0x01);
        let mut raw = [0u8; 16];
        raw[15] = 0x40;
        assert_eq!(SglDescriptor::read_from_bytes(&raw[..]).map(|d| d.kind()), Ok(SglKind::Keyed));
        raw[15] = 0x20;
        assert_eq!(
            SglDescriptor::read_from_bytes(&raw[..]).map(|d| d.kind()),
            Ok(SglKind::Other { descriptor_type: 2, subtype: 0 })
        );
    }

    #[test]
    fn sqe_fields() {
        let mut sqe = Sqe::new(io_opcode::READ, 9);
        sqe.set_nsid(1).set_cdws([0x10, 0x1, 7, 0, 0, 0]).set_sgl(SglDescriptor::transport(4096));
        assert_eq!(sqe.psdt(), PSDT_SGL_MPTR_BUFFER);
        assert_eq!(sqe.lba_range(), (0x1_0000_0010, 8));
        let b = sqe.as_bytes();
        assert_eq!(&b[..8], &[0x02, 0x40, 9, 0, 1, 0, 0, 0]);
        assert_eq!(&b[32..40], &[0, 0x10, 0, 0, 0, 0, 0, 0x5a]);
        assert_eq!(&b[40..44], &[0x10, 0, 0, 0]);
    }
}
