//! Identify command data (NVMe Base Specification 2.0, "Identify command", "Identify Controller Data
//! Structure", "Namespace Identification Descriptor"; NVM Command Set Specification 1.0, "Identify Namespace
//! Data Structure").

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::command::Sqe;
use super::{read_nul_terminated, read_space_padded, write_nul_padded, write_space_padded};
use crate::Error;

/// Size of every Identify data structure.
pub const IDENTIFY_DATA_SIZE: usize = 4096;

/// Controller or Namespace Structure values (CDW10 bits 7:0 of Identify).
pub mod cns {
    /// Identify Namespace data structure for the NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list: up to 1024 active NSIDs greater than the NSID, ascending.
    pub const ACTIVE_NAMESPACE_LIST: u8 = 0x02;
    /// Namespace Identification Descriptor list for the NSID.
    pub const NAMESPACE_ID_DESCRIPTORS: u8 = 0x03;
    /// I/O Command Set specific Identify Namespace data structure (CSI in CDW11).
    pub const CS_NAMESPACE: u8 = 0x05;
    /// I/O Command Set specific Identify Controller data structure (CSI in CDW11).
    pub const CS_CONTROLLER: u8 = 0x06;
    /// I/O Command Set Independent Identify Namespace data structure.
    pub const CS_INDEPENDENT_NAMESPACE: u8 = 0x08;
}

/// Controller Multi-Path I/O and Namespace Sharing Capabilities (CMIC) bits.
pub mod cmic {
    /// The NVM subsystem may have more than one port.
    pub const MULTI_PORT: u8 = 1 << 0;
    /// The NVM subsystem may have more than one controller.
    pub const MULTI_CONTROLLER: u8 = 1 << 1;
    /// Asymmetric Namespace Access reporting.
    pub const ANA: u8 = 1 << 3;
}

/// Optional Asynchronous Events Supported (OAES) bits; the same bit positions enable them in the
/// Asynchronous Event Configuration feature.
pub mod oaes {
    /// Namespace Attribute Notices.
    pub const NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
    /// Firmware Activation Notices.
    pub const FIRMWARE_ACTIVATION: u32 = 1 << 9;
    /// Asymmetric Namespace Access Change Notices.
    pub const ANA_CHANGE: u32 = 1 << 11;
    /// Discovery Log Page Change Notices (discovery controllers).
    pub const DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
}

/// Controller Attributes (CTRATT) bits.
pub mod ctratt {
    /// 128-bit Host Identifier supported (required over fabrics).
    pub const HOST_ID_128: u32 = 1 << 0;
    /// Traffic Based Keep Alive supported.
    pub const TBKAS: u32 = 1 << 6;
}

/// Controller Type (CNTRLTYPE) values.
pub mod cntrltype {
    /// I/O controller.
    pub const IO: u8 = 1;
    /// Discovery controller.
    pub const DISCOVERY: u8 = 2;
    /// Administrative controller.
    pub const ADMINISTRATIVE: u8 = 3;
}

/// Log Page Attributes (LPA) bits.
pub mod lpa {
    /// Commands Supported and Effects log page supported.
    pub const COMMAND_EFFECTS: u8 = 1 << 1;
    /// Extended data for Get Log Page (NUMDU, LPO) supported.
    pub const EXTENDED_DATA: u8 = 1 << 2;
}

/// Optional NVM Command Support (ONCS) bits.
pub mod oncs {
    /// Compare.
    pub const COMPARE: u16 = 1 << 0;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u16 = 1 << 2;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u16 = 1 << 3;
    /// Reservations.
    pub const RESERVATIONS: u16 = 1 << 5;
    /// Timestamp feature.
    pub const TIMESTAMP: u16 = 1 << 6;
}

/// Volatile Write Cache (VWC) bit 0: a volatile write cache is present (Flush is meaningful).
pub const VWC_PRESENT: u8 = 1 << 0;

/// SGL Support (SGLS) bits.
pub mod sgls {
    /// SGLs supported, no alignment requirement (bits 1:0 = 01b).
    pub const SUPPORTED: u32 = 0b01;
    /// Keyed SGL Data Block descriptor supported (RDMA).
    pub const KEYED: u32 = 1 << 2;
    /// The Address field of an SGL Data Block may be an offset (in-capsule data).
    pub const OFFSET_ADDRESS: u32 = 1 << 20;
}

/// Identify Controller data structure, 4096 bytes (NVMe Base Specification 2.0, "Identify Controller Data
/// Structure"), including the NVMe over Fabrics fields at bytes 2047:1792.
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: U16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: U16,
    /// Serial Number, ASCII, space padded.
    pub sn: [u8; 20],
    /// Model Number, ASCII, space padded.
    pub mn: [u8; 40],
    /// Firmware Revision, ASCII, space padded.
    pub fr: [u8; 8],
    /// Recommended Arbitration Burst.
    pub rab: u8,
    /// IEEE OUI Identifier.
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities, see [`cmic`].
    pub cmic: u8,
    /// Maximum Data Transfer Size as a power of two in units of CAP.MPSMIN; 0 means no limit.
    pub mdts: u8,
    /// Controller ID; must equal the CNTLID returned by the admin queue Connect.
    pub cntlid: U16,
    /// Version, see [`crate::spec::properties::version`].
    pub ver: U32,
    /// RTD3 Resume Latency.
    pub rtd3r: U32,
    /// RTD3 Entry Latency.
    pub rtd3e: U32,
    /// Optional Asynchronous Events Supported, see [`oaes`].
    pub oaes: U32,
    /// Controller Attributes, see [`ctratt`].
    pub ctratt: U32,
    /// Reserved (bytes 110:100).
    pub reserved100: [u8; 11],
    /// Controller Type, see [`cntrltype`].
    pub cntrltype: u8,
    /// FRU Globally Unique Identifier.
    pub fguid: [u8; 16],
    /// Command Retry Delay Time 1.
    pub crdt1: U16,
    /// Command Retry Delay Time 2.
    pub crdt2: U16,
    /// Command Retry Delay Time 3.
    pub crdt3: U16,
    /// Reserved (bytes 255:134).
    pub reserved134: [u8; 122],
    /// Optional Admin Command Support.
    pub oacs: U16,
    /// Abort Command Limit, 0's based.
    pub acl: u8,
    /// Asynchronous Event Request Limit, 0's based.
    pub aerl: u8,
    /// Firmware Updates.
    pub frmw: u8,
    /// Log Page Attributes, see [`lpa`].
    pub lpa: u8,
    /// Error Log Page Entries, 0's based.
    pub elpe: u8,
    /// Number of Power States Support, 0's based.
    pub npss: u8,
    /// Admin Vendor Specific Command Configuration.
    pub avscc: u8,
    /// Autonomous Power State Transition Attributes.
    pub apsta: u8,
    /// Warning Composite Temperature Threshold (Kelvin).
    pub wctemp: U16,
    /// Critical Composite Temperature Threshold (Kelvin).
    pub cctemp: U16,
    /// Maximum Time for Firmware Activation.
    pub mtfa: U16,
    /// Host Memory Buffer Preferred Size.
    pub hmpre: U32,
    /// Host Memory Buffer Minimum Size.
    pub hmmin: U32,
    /// Total NVM Capacity (bytes, 128-bit).
    pub tnvmcap: [u8; 16],
    /// Unallocated NVM Capacity (bytes, 128-bit).
    pub unvmcap: [u8; 16],
    /// Replay Protected Memory Block Support.
    pub rpmbs: U32,
    /// Extended Device Self-test Time.
    pub edstt: U16,
    /// Device Self-test Options.
    pub dsto: u8,
    /// Firmware Update Granularity.
    pub fwug: u8,
    /// Keep Alive Support: granularity of the Keep Alive Timer in 100 ms units; 0 means unsupported, which the
    /// Linux host refuses for an I/O controller over fabrics.
    pub kas: U16,
    /// Host Controlled Thermal Management Attributes.
    pub hctma: U16,
    /// Minimum Thermal Management Temperature.
    pub mntmt: U16,
    /// Maximum Thermal Management Temperature.
    pub mxtmt: U16,
    /// Sanitize Capabilities.
    pub sanicap: U32,
    /// Host Memory Buffer Minimum Descriptor Entry Size.
    pub hmminds: U32,
    /// Host Memory Maximum Descriptors Entries.
    pub hmmaxd: U16,
    /// NVM Set Identifier Maximum.
    pub nsetidmax: U16,
    /// Endurance Group Identifier Maximum.
    pub endgidmax: U16,
    /// ANA Transition Time.
    pub anatt: u8,
    /// Asymmetric Namespace Access Capabilities.
    pub anacap: u8,
    /// ANA Group Identifier Maximum.
    pub anagrpmax: U32,
    /// Number of ANA Group Identifiers.
    pub nanagrpid: U32,
    /// Reserved here (bytes 511:352).
    pub reserved352: [u8; 160],
    /// Submission Queue Entry Size: required (bits 3:0) and maximum (bits 7:4) as powers of two, 0x66 for 64 B.
    pub sqes: u8,
    /// Completion Queue Entry Size: required and maximum, 0x44 for 16 B.
    pub cqes: u8,
    /// Maximum Outstanding Commands (fabrics); the Linux host refuses 0 in older kernels.
    pub maxcmd: U16,
    /// Number of Namespaces: the largest valid NSID.
    pub nn: U32,
    /// Optional NVM Command Support, see [`oncs`].
    pub oncs: U16,
    /// Fused Operation Support.
    pub fuses: U16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache, see [`VWC_PRESENT`].
    pub vwc: u8,
    /// Atomic Write Unit Normal, 0's based logical blocks.
    pub awun: U16,
    /// Atomic Write Unit Power Fail, 0's based logical blocks.
    pub awupf: U16,
    /// I/O Command Set Vendor Specific Command Configuration.
    pub icsvscc: u8,
    /// Namespace Write Protection Capabilities.
    pub nwpc: u8,
    /// Atomic Compare & Write Unit.
    pub acwu: U16,
    /// Reserved here (bytes 535:534).
    pub reserved534: [u8; 2],
    /// SGL Support, see [`sgls`].
    pub sgls: U32,
    /// Maximum Number of Allowed Namespaces.
    pub mnan: U32,
    /// Reserved here (bytes 767:544).
    pub reserved544: [u8; 224],
    /// NVM Subsystem NVMe Qualified Name, UTF-8, NUL terminated.
    pub subnqn: [u8; 256],
    /// Reserved (bytes 1791:1024).
    pub reserved1024: [u8; 768],
    /// I/O Queue Command Capsule Supported Size in 16-byte units: 64-byte SQE plus in-capsule data.
    pub ioccsz: U32,
    /// I/O Queue Response Capsule Supported Size in 16-byte units.
    pub iorcsz: U32,
    /// In Capsule Data Offset in 16-byte units; NVMe/TCP uses 0.
    pub icdoff: U16,
    /// Fabrics Controller Attributes.
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors.
    pub msdbd: u8,
    /// Optional Fabric Commands Support.
    pub ofcs: U16,
    /// Discovery Controller Type.
    pub dctype: u8,
    /// Reserved (bytes 2047:1807).
    pub reserved1807: [u8; 241],
    /// Power State Descriptors 0 to 31, 32 bytes each.
    pub psd: [[u8; 32]; 32],
    /// Vendor Specific.
    pub vs: [u8; 1024],
}

impl IdentifyController {
    /// Sets the Serial Number (printable ASCII, at most 20 bytes, space padded).
    pub fn set_sn(&mut self, sn: &str) -> Result<(), Error> {
        write_space_padded(&mut self.sn, sn, "sn")
    }

    /// Sets the Model Number (printable ASCII, at most 40 bytes, space padded).
    pub fn set_mn(&mut self, mn: &str) -> Result<(), Error> {
        write_space_padded(&mut self.mn, mn, "mn")
    }

    /// Sets the Firmware Revision (printable ASCII, at most 8 bytes, space padded).
    pub fn set_fr(&mut self, fr: &str) -> Result<(), Error> {
        write_space_padded(&mut self.fr, fr, "fr")
    }

    /// Sets the Subsystem NQN (validated, NUL padded).
    pub fn set_subnqn(&mut self, nqn: &str) -> Result<(), Error> {
        super::fabrics::validate_nqn(nqn)?;
        write_nul_padded(&mut self.subnqn, nqn, "subnqn")
    }

    /// The Serial Number without padding.
    pub fn sn(&self) -> Option<&str> {
        read_space_padded(&self.sn)
    }

    /// The Model Number without padding.
    pub fn mn(&self) -> Option<&str> {
        read_space_padded(&self.mn)
    }

    /// The Firmware Revision without padding.
    pub fn fr(&self) -> Option<&str> {
        read_space_padded(&self.fr)
    }

    /// The Subsystem NQN.
    pub fn subnqn(&self) -> Option<&str> {
        read_nul_terminated(&self.subnqn)
    }
}

impl fmt::Debug for IdentifyController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentifyController")
            .field("vid", &self.vid.get())
            .field("sn", &self.sn())
            .field("mn", &self.mn())
            .field("fr", &self.fr())
            .field("cntlid", &self.cntlid.get())
            .field("cntrltype", &self.cntrltype)
            .field("nn", &self.nn.get())
            .field("subnqn", &self.subnqn())
            .field("ioccsz", &self.ioccsz.get())
            .finish_non_exhaustive()
    }
}

/// LBA Format data structure, 4 bytes (NVM Command Set Specification 1.0, "LBA Format Data Structure").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LbaFormat {
    /// Metadata Size in bytes per logical block.
    pub ms: U16,
    /// LBA Data Size as a power of two (9 for 512 bytes, 12 for 4096).
    pub lbads: u8,
    /// Relative Performance (bits 1:0).
    pub rp: u8,
}

/// Namespace Features (NSFEAT) bits.
pub mod nsfeat {
    /// Thin provisioning: NCAP may be less than NSZE.
    pub const THIN_PROVISIONING: u8 = 1 << 0;
    /// NAWUN, NAWUPF and NACWU are valid.
    pub const NAMESPACE_ATOMICS: u8 = 1 << 1;
    /// Deallocated or Unwritten Logical Block errors supported.
    pub const DEALLOCATED_ERROR: u8 = 1 << 2;
    /// NPWG, NPWA, NPDG, NPDA and NOWS are valid.
    pub const OPTIMAL_IO: u8 = 1 << 4;
}

/// Identify Namespace data structure for the NVM command set, 4096 bytes (NVM Command Set Specification 1.0,
/// "Identify Namespace Data Structure").
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct IdentifyNamespace {
    /// Namespace Size in logical blocks.
    pub nsze: U64,
    /// Namespace Capacity in logical blocks.
    pub ncap: U64,
    /// Namespace Utilization in logical blocks.
    pub nuse: U64,
    /// Namespace Features, see [`nsfeat`].
    pub nsfeat: u8,
    /// Number of LBA Formats, 0's based.
    pub nlbaf: u8,
    /// Formatted LBA Size: format index in bits 3:0 (and 6:5 for indexes above 15), extended metadata bit 4.
    pub flbas: u8,
    /// Metadata Capabilities.
    pub mc: u8,
    /// End-to-end Data Protection Capabilities.
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings.
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities (bit 0: may be shared).
    pub nmic: u8,
    /// Reservation Capabilities.
    pub rescap: u8,
    /// Format Progress Indicator.
    pub fpi: u8,
    /// Deallocate Logical Block Features (bits 2:0 read behaviour after deallocation, bit 3 Write Zeroes may
    /// deallocate).
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal.
    pub nawun: U16,
    /// Namespace Atomic Write Unit Power Fail.
    pub nawupf: U16,
    /// Namespace Atomic Compare & Write Unit.
    pub nacwu: U16,
    /// Namespace Atomic Boundary Size Normal.
    pub nabsn: U16,
    /// Namespace Atomic Boundary Offset.
    pub nabo: U16,
    /// Namespace Atomic Boundary Size Power Fail.
    pub nabspf: U16,
    /// Namespace Optimal I/O Boundary in logical blocks.
    pub noiob: U16,
    /// NVM Capacity in bytes (128-bit).
    pub nvmcap: [u8; 16],
    /// Namespace Preferred Write Granularity.
    pub npwg: U16,
    /// Namespace Preferred Write Alignment.
    pub npwa: U16,
    /// Namespace Preferred Deallocate Granularity.
    pub npdg: U16,
    /// Namespace Preferred Deallocate Alignment.
    pub npda: U16,
    /// Namespace Optimal Write Size.
    pub nows: U16,
    /// Reserved here (bytes 91:74).
    pub reserved74: [u8; 18],
    /// ANA Group Identifier.
    pub anagrpid: U32,
    /// Reserved (bytes 98:96).
    pub reserved96: [u8; 3],
    /// Namespace Attributes (bit 0: write protected).
    pub nsattr: u8,
    /// NVM Set Identifier.
    pub nvmsetid: U16,
    /// Endurance Group Identifier.
    pub endgid: U16,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier.
    pub eui64: [u8; 8],
    /// LBA Format 0 to 63 Support.
    pub lbaf: [LbaFormat; 64],
    /// Vendor Specific.
    pub vs: [u8; 3712],
}

impl IdentifyNamespace {
    /// Index of the formatted LBA format (FLBAS bits 3:0 and, for more than 16 formats, bits 6:5).
    pub fn lba_format_index(&self) -> usize {
        usize::from(self.flbas & 0x0f) | usize::from((self.flbas >> 5) & 0x3) << 4
    }

    /// Logical block size in bytes of the formatted LBA format, `None` if LBADS is out of range.
    pub fn block_size(&self) -> Option<u32> {
        let lbads = self.lbaf.get(self.lba_format_index())?.lbads;
        (9..32).contains(&lbads).then(|| 1u32 << lbads)
    }
}

impl fmt::Debug for IdentifyNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentifyNamespace")
            .field("nsze", &self.nsze.get())
            .field("ncap", &self.ncap.get())
            .field("nuse", &self.nuse.get())
            .field("flbas", &self.flbas)
            .field("block_size", &self.block_size())
            .field("nguid", &self.nguid)
            .field("eui64", &self.eui64)
            .finish_non_exhaustive()
    }
}

/// A Namespace Identification Descriptor (NVMe Base Specification 2.0, "Namespace Identification Descriptor",
/// Namespace Identifier Type values 1h to 4h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsIdDescriptor {
    /// IEEE Extended Unique Identifier, NIDT 1h, 8 bytes.
    Eui64([u8; 8]),
    /// Namespace Globally Unique Identifier, NIDT 2h, 16 bytes.
    Nguid([u8; 16]),
    /// Namespace UUID, NIDT 3h, 16 bytes.
    Uuid([u8; 16]),
    /// Command Set Identifier, NIDT 4h, 1 byte (0 for the NVM command set).
    Csi(u8),
}

impl NsIdDescriptor {
    /// Namespace Identifier Type.
    pub fn nidt(&self) -> u8 {
        match self {
            Self::Eui64(_) => 1,
            Self::Nguid(_) => 2,
            Self::Uuid(_) => 3,
            Self::Csi(_) => 4,
        }
    }

    fn nid(&self) -> &[u8] {
        match self {
            Self::Eui64(id) => id,
            Self::Nguid(id) | Self::Uuid(id) => id,
            Self::Csi(csi) => core::slice::from_ref(csi),
        }
    }
}

/// Encodes the Namespace Identification Descriptor list (CNS 03h): each descriptor is NIDT, NIDL, two
/// reserved bytes and the identifier; the rest of the 4096 bytes is zero, which ends the list.
pub fn ns_id_descriptor_list(descriptors: &[NsIdDescriptor]) -> [u8; IDENTIFY_DATA_SIZE] {
    let mut out = [0u8; IDENTIFY_DATA_SIZE];
    let mut at = 0;
    // Four descriptor types of at most 20 bytes each cannot overflow the page; longer lists are truncated at
    // a descriptor boundary.
    for d in descriptors {
        let nid = d.nid();
        let Some(slot) = out.get_mut(at..at + 4 + nid.len()) else { break };
        slot[0] = d.nidt();
        slot[1] = nid.len() as u8;
        slot[4..].copy_from_slice(nid);
        at += 4 + nid.len();
    }
    out
}

/// Encodes an Active Namespace ID list (CNS 02h): the NSIDs of `active` greater than `after`, ascending, at
/// most 1024, zero filled.
pub fn active_namespace_list(active: &[u32], after: u32) -> [u8; IDENTIFY_DATA_SIZE] {
    let mut ids = [U32::new(0); IDENTIFY_DATA_SIZE / 4];
    let mut last = after;
    for slot in &mut ids {
        let Some(next) = active.iter().copied().filter(|&id| id > last).min() else { break };
        slot.set(next);
        last = next;
    }
    let mut out = [0u8; IDENTIFY_DATA_SIZE];
    out.copy_from_slice(ids.as_bytes());
    out
}

/// The Identify fields of a submission queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyArgs {
    /// Controller or Namespace Structure (CDW10 bits 7:0), see [`cns`].
    pub cns: u8,
    /// Controller Identifier (CDW10 bits 31:16).
    pub cntid: u16,
    /// Command Set Identifier (CDW11 bits 31:24).
    pub csi: u8,
    /// Namespace Identifier.
    pub nsid: u32,
}

impl Sqe {
    /// The fields of an Identify command.
    pub fn identify(&self) -> IdentifyArgs {
        IdentifyArgs {
            cns: self.cdw10() as u8,
            cntid: (self.cdw10() >> 16) as u16,
            csi: (self.cdw11() >> 24) as u8,
            nsid: self.nsid(),
        }
    }
}

const _: () = {
    use core::mem::{offset_of, size_of};
    type C = IdentifyController;
    assert!(size_of::<C>() == IDENTIFY_DATA_SIZE);
    assert!(offset_of!(C, sn) == 4 && offset_of!(C, mn) == 24 && offset_of!(C, fr) == 64);
    assert!(offset_of!(C, rab) == 72 && offset_of!(C, ieee) == 73 && offset_of!(C, cmic) == 76);
    assert!(offset_of!(C, mdts) == 77 && offset_of!(C, cntlid) == 78 && offset_of!(C, ver) == 80);
    assert!(offset_of!(C, oaes) == 92 && offset_of!(C, ctratt) == 96 && offset_of!(C, cntrltype) == 111);
    assert!(offset_of!(C, fguid) == 112 && offset_of!(C, crdt1) == 128);
    assert!(offset_of!(C, oacs) == 256 && offset_of!(C, acl) == 258 && offset_of!(C, aerl) == 259);
    assert!(offset_of!(C, frmw) == 260 && offset_of!(C, lpa) == 261 && offset_of!(C, elpe) == 262);
    assert!(offset_of!(C, npss) == 263 && offset_of!(C, wctemp) == 266 && offset_of!(C, hmpre) == 272);
    assert!(offset_of!(C, tnvmcap) == 280 && offset_of!(C, rpmbs) == 312 && offset_of!(C, kas) == 320);
    assert!(offset_of!(C, sanicap) == 328 && offset_of!(C, anatt) == 342 && offset_of!(C, anagrpmax) == 344);
    assert!(offset_of!(C, nanagrpid) == 348);
    assert!(offset_of!(C, sqes) == 512 && offset_of!(C, cqes) == 513 && offset_of!(C, maxcmd) == 514);
    assert!(offset_of!(C, nn) == 516 && offset_of!(C, oncs) == 520 && offset_of!(C, fuses) == 522);
    assert!(offset_of!(C, fna) == 524 && offset_of!(C, vwc) == 525 && offset_of!(C, awun) == 526);
    assert!(offset_of!(C, awupf) == 528 && offset_of!(C, acwu) == 532 && offset_of!(C, sgls) == 536);
    assert!(offset_of!(C, mnan) == 540 && offset_of!(C, subnqn) == 768);
    assert!(offset_of!(C, ioccsz) == 1792 && offset_of!(C, iorcsz) == 1796 && offset_of!(C, icdoff) == 1800);
    assert!(offset_of!(C, fcatt) == 1802 && offset_of!(C, msdbd) == 1803 && offset_of!(C, ofcs) == 1804);
    assert!(offset_of!(C, dctype) == 1806 && offset_of!(C, psd) == 2048 && offset_of!(C, vs) == 3072);

    type N = IdentifyNamespace;
    assert!(size_of::<N>() == IDENTIFY_DATA_SIZE);
    assert!(size_of::<LbaFormat>() == 4);
    assert!(offset_of!(N, ncap) == 8 && offset_of!(N, nuse) == 16 && offset_of!(N, nsfeat) == 24);
    assert!(offset_of!(N, nlbaf) == 25 && offset_of!(N, flbas) == 26 && offset_of!(N, mc) == 27);
    assert!(offset_of!(N, dpc) == 28 && offset_of!(N, dps) == 29 && offset_of!(N, nmic) == 30);
    assert!(offset_of!(N, dlfeat) == 33 && offset_of!(N, nawun) == 34 && offset_of!(N, nawupf) == 36);
    assert!(offset_of!(N, noiob) == 46 && offset_of!(N, nvmcap) == 48 && offset_of!(N, npwg) == 64);
    assert!(offset_of!(N, nows) == 72 && offset_of!(N, anagrpid) == 92 && offset_of!(N, nsattr) == 99);
    assert!(offset_of!(N, nvmsetid) == 100 && offset_of!(N, endgid) == 102 && offset_of!(N, nguid) == 104);
    assert!(offset_of!(N, eui64) == 120 && offset_of!(N, lbaf) == 128 && offset_of!(N, vs) == 384);
};

#[cfg(test)]
mod tests {
    use zerocopy::FromZeros;

    use super::*;

    #[test]
    fn identify_controller_strings_land_at_their_offsets() {
        let mut id = IdentifyController::new_zeroed();
        id.set_sn("SN1").unwrap();
        id.set_mn("dpu-agent").unwrap();
        id.set_fr("0.1.0").unwrap();
        id.set_subnqn("nqn.2024-01.com.example:sub").unwrap();
        id.ioccsz.set((64 + 8192) / 16);
        let b = id.as_bytes();
        assert_eq!(&b[4..24], b"SN1                 ");
        assert_eq!(&b[24..33], b"dpu-agent");
        assert_eq!(b[63], b' ');
        assert_eq!(&b[64..72], b"0.1.0   ");
        assert_eq!(&b[768..772], b"nqn.");
        assert_eq!(b[768 + 27], 0);
        assert_eq!(&b[1792..1796], &516u32.to_le_bytes());
        assert_eq!(
            (id.sn(), id.mn(), id.subnqn()),
            (Some("SN1"), Some("dpu-agent"), Some("nqn.2024-01.com.example:sub"))
        );
        assert!(id.set_subnqn("not-an-nqn").is_err());
    }

    #[test]
    fn namespace_block_size() {
        let mut ns = IdentifyNamespace::new_zeroed();
        ns.lbaf[1].lbads = 12;
        ns.flbas = 1;
        assert_eq!(ns.block_size(), Some(4096));
        ns.flbas = 0x21; // index 17 with the upper bits
        assert_eq!(ns.lba_format_index(), 17);
        assert_eq!(ns.block_size(), None);
    }

    #[test]
    fn descriptor_list_encoding() {
        let list = ns_id_descriptor_list(&[
            NsIdDescriptor::Eui64([1; 8]),
            NsIdDescriptor::Nguid([2; 16]),
            NsIdDescriptor::Uuid([3; 16]),
            NsIdDescriptor::Csi(0),
        ]);
        assert_eq!(&list[..4], &[1, 8, 0, 0]);
        assert_eq!(&list[4..12], &[1; 8]);
        assert_eq!(&list[12..16], &[2, 16, 0, 0]);
        assert_eq!(&list[32..36], &[3, 16, 0, 0]);
        assert_eq!(&list[52..57], &[4, 1, 0, 0, 0]);
        assert!(list[57..].iter().all(|&b| b == 0));
    }

    #[test]
    fn active_list_is_ascending_after_nsid() {
        let list = active_namespace_list(&[7, 2, 5, 1], 1);
        assert_eq!(&list[..16], &[2, 0, 0, 0, 5, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert!(active_namespace_list(&[1], 1).iter().all(|&b| b == 0));
    }
}
