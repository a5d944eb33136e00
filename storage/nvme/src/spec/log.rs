//! Log pages (NVMe Base Specification 2.0, "Get Log Page command", "Error Information", "SMART / Health
//! Information", "Changed Namespace List", "Discovery" log pages; NVMe over Fabrics Specification 1.1,
//! "Discovery Log Page").

use core::fmt;

use zerocopy::little_endian::{U16, U32, U64, U128};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::command::Sqe;
use super::{read_nul_terminated, read_space_padded, write_nul_padded, write_space_padded};
use crate::Error;

/// Log Page Identifiers.
pub mod lid {
    /// Supported Log Pages.
    pub const SUPPORTED_LOG_PAGES: u8 = 0x00;
    /// Error Information.
    pub const ERROR_INFORMATION: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART_HEALTH: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NAMESPACE_LIST: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const COMMAND_EFFECTS: u8 = 0x05;
    /// Asymmetric Namespace Access.
    pub const ANA: u8 = 0x0c;
    /// Discovery (discovery controllers only).
    pub const DISCOVERY: u8 = 0x70;
}

/// The fields of a Get Log Page command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GetLogPageArgs {
    /// Log Page Identifier (CDW10 bits 7:0), see [`lid`].
    pub lid: u8,
    /// Log Specific Parameter (CDW10 bits 14:8).
    pub lsp: u8,
    /// Retain Asynchronous Event (CDW10 bit 15).
    pub rae: bool,
    /// Number of dwords to return: NUMDU (CDW11 bits 15:0) and NUMDL (CDW10 bits 31:16), converted from 0's
    /// based to a count.
    pub numd: u64,
    /// Log Specific Identifier (CDW11 bits 31:16).
    pub lsi: u16,
    /// Log Page Offset in bytes: LPOU (CDW13) and LPOL (CDW12).
    pub lpo: u64,
    /// UUID Index (CDW14 bits 6:0).
    pub uuid_index: u8,
    /// Command Set Identifier (CDW14 bits 31:24).
    pub csi: u8,
}

impl GetLogPageArgs {
    /// Number of bytes the host asked for.
    pub fn len_bytes(&self) -> u64 {
        self.numd * 4
    }

    /// Command Dwords 10 to 15 carrying these fields (`numd` must be 1 to 2^32).
    pub fn to_cdws(&self) -> [u32; 6] {
        let numd0 = self.numd.saturating_sub(1) as u32;
        [
            u32::from(self.lid) | u32::from(self.lsp & 0x7f) << 8 | u32::from(self.rae) << 15 | (numd0 & 0xffff) << 16,
            numd0 >> 16 | u32::from(self.lsi) << 16,
            self.lpo as u32,
            (self.lpo >> 32) as u32,
            u32::from(self.uuid_index & 0x7f) | u32::from(self.csi) << 24,
            0,
        ]
    }
}

impl Sqe {
    /// The fields of a Get Log Page command.
    pub fn get_log_page(&self) -> GetLogPageArgs {
        let (cdw10, cdw11) = (self.cdw10(), self.cdw11());
        GetLogPageArgs {
            lid: cdw10 as u8,
            lsp: ((cdw10 >> 8) & 0x7f) as u8,
            rae: cdw10 & 1 << 15 != 0,
            numd: (u64::from(cdw11 & 0xffff) << 16 | u64::from(cdw10 >> 16)) + 1,
            lsi: (cdw11 >> 16) as u16,
            lpo: u64::from(self.cdw13()) << 32 | u64::from(self.cdw12()),
            uuid_index: (self.cdw14() & 0x7f) as u8,
            csi: (self.cdw14() >> 24) as u8,
        }
    }
}

/// Error Information log page entry, 64 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorLogEntry {
    /// Error Count: a unique, incrementing identifier of the error (0: entry invalid).
    pub error_count: U64,
    /// Submission Queue ID.
    pub sqid: U16,
    /// Command ID.
    pub cmdid: U16,
    /// Status Field as in the completion (bit 0 is the phase tag).
    pub status: U16,
    /// Parameter Error Location: byte (bits 7:0) and bit (bits 10:8) in the command.
    pub param_error_location: U16,
    /// LBA of the error.
    pub lba: U64,
    /// Namespace.
    pub nsid: U32,
    /// Vendor Specific Information Available.
    pub vs: u8,
    /// Reserved here (bytes 31:29).
    pub reserved29: [u8; 3],
    /// Command Specific Information.
    pub cs: U64,
    /// Reserved here (bytes 63:40).
    pub reserved40: [u8; 24],
}

/// SMART / Health Information log page, 512 bytes.
#[derive(Debug, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SmartLog {
    /// Critical Warning bits.
    pub critical_warning: u8,
    /// Composite Temperature in Kelvin.
    pub composite_temperature: U16,
    /// Available Spare, percent.
    pub available_spare: u8,
    /// Available Spare Threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage Used.
    pub percentage_used: u8,
    /// Endurance Group Critical Warning Summary.
    pub endurance_group_critical_warning: u8,
    /// Reserved (bytes 31:7).
    pub reserved7: [u8; 25],
    /// Data Units Read, in thousands of 512-byte units.
    pub data_units_read: U128,
    /// Data Units Written, in thousands of 512-byte units.
    pub data_units_written: U128,
    /// Host Read Commands.
    pub host_read_commands: U128,
    /// Host Write Commands.
    pub host_write_commands: U128,
    /// Controller Busy Time, minutes.
    pub controller_busy_time: U128,
    /// Power Cycles.
    pub power_cycles: U128,
    /// Power On Hours.
    pub power_on_hours: U128,
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: U128,
    /// Media and Data Integrity Errors.
    pub media_errors: U128,
    /// Number of Error Information Log Entries.
    pub error_log_entries: U128,
    /// Warning Composite Temperature Time, minutes.
    pub warning_temperature_time: U32,
    /// Critical Composite Temperature Time, minutes.
    pub critical_temperature_time: U32,
    /// Temperature Sensors 1 to 8, Kelvin.
    pub temperature_sensors: [U16; 8],
    /// Thermal Management Temperature 1 Transition Count.
    pub thermal_1_transitions: U32,
    /// Thermal Management Temperature 2 Transition Count.
    pub thermal_2_transitions: U32,
    /// Total Time For Thermal Management Temperature 1, seconds.
    pub thermal_1_time: U32,
    /// Total Time For Thermal Management Temperature 2, seconds.
    pub thermal_2_time: U32,
    /// Reserved (bytes 511:232).
    pub reserved232: [u8; 280],
}

/// Number of entries of the Changed Namespace List log page.
pub const CHANGED_NAMESPACE_LIST_ENTRIES: usize = 1024;

/// Encodes the Changed Namespace List log page (4096 bytes): the changed NSIDs, zero filled; when more than
/// 1024 changed, the first entry is FFFFFFFFh and the rest zero.
pub fn changed_namespace_list(changed: &[u32]) -> [u8; CHANGED_NAMESPACE_LIST_ENTRIES * 4] {
    let mut ids = [U32::new(0); CHANGED_NAMESPACE_LIST_ENTRIES];
    if changed.len() > CHANGED_NAMESPACE_LIST_ENTRIES {
        ids[0].set(u32::MAX);
    } else {
        for (slot, &nsid) in ids.iter_mut().zip(changed) {
            slot.set(nsid);
        }
    }
    let mut out = [0u8; CHANGED_NAMESPACE_LIST_ENTRIES * 4];
    out.copy_from_slice(ids.as_bytes());
    out
}

/// Discovery Log Page header, 1024 bytes.
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscoveryLogHeader {
    /// Generation Counter: changes whenever the log page contents change.
    pub genctr: U64,
    /// Number of Records that follow the header.
    pub numrec: U64,
    /// Record Format; 0.
    pub recfmt: U16,
    /// Reserved (bytes 1023:18).
    pub reserved: [u8; 1006],
}

impl DiscoveryLogHeader {
    /// A header for `numrec` entries at generation `genctr`.
    pub fn new(genctr: u64, numrec: u64) -> Self {
        let mut h = Self::new_zeroed();
        h.genctr.set(genctr);
        h.numrec.set(numrec);
        h
    }
}

impl fmt::Debug for DiscoveryLogHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryLogHeader")
            .field("genctr", &self.genctr.get())
            .field("numrec", &self.numrec.get())
            .field("recfmt", &self.recfmt.get())
            .finish()
    }
}

/// Transport Type (TRTYPE) values.
pub mod trtype {
    /// RDMA.
    pub const RDMA: u8 = 1;
    /// Fibre Channel.
    pub const FC: u8 = 2;
    /// TCP.
    pub const TCP: u8 = 3;
}

/// Address Family (ADRFAM) values.
pub mod adrfam {
    /// IPv4.
    pub const IPV4: u8 = 1;
    /// IPv6.
    pub const IPV6: u8 = 2;
}

/// Subsystem Type (SUBTYPE) values.
pub mod subtype {
    /// Referral to another discovery service.
    pub const DISCOVERY_REFERRAL: u8 = 1;
    /// NVM subsystem.
    pub const NVME: u8 = 2;
    /// The current discovery subsystem.
    pub const CURRENT_DISCOVERY: u8 = 3;
}

/// Transport Requirements (TREQ) values.
pub mod treq {
    /// Secure channel requirement not specified.
    pub const SECURE_CHANNEL_NOT_SPECIFIED: u8 = 0b00;
    /// Secure channel required.
    pub const SECURE_CHANNEL_REQUIRED: u8 = 0b01;
    /// Secure channel not required.
    pub const SECURE_CHANNEL_NOT_REQUIRED: u8 = 0b10;
    /// The controller supports disabling SQ flow control.
    pub const SQ_FLOW_CONTROL_DISABLE_SUPPORTED: u8 = 1 << 2;
}

/// TCP Security Type (TSAS byte 0, SECTYPE) values.
pub mod sectype {
    /// No security.
    pub const NONE: u8 = 0;
    /// TLS 1.2.
    pub const TLS12: u8 = 1;
    /// TLS 1.3.
    pub const TLS13: u8 = 2;
}

/// Discovery Log Page entry, 1024 bytes.
#[derive(Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DiscoveryLogEntry {
    /// Transport Type, see [`trtype`].
    pub trtype: u8,
    /// Address Family, see [`adrfam`].
    pub adrfam: u8,
    /// Subsystem Type, see [`subtype`].
    pub subtype: u8,
    /// Transport Requirements, see [`treq`].
    pub treq: u8,
    /// Port ID.
    pub portid: U16,
    /// Controller ID: FFFFh for the dynamic controller model.
    pub cntlid: U16,
    /// Admin Max SQ Size.
    pub asqsz: U16,
    /// Entry Flags.
    pub eflags: U16,
    /// Reserved (bytes 31:12).
    pub reserved12: [u8; 20],
    /// Transport Service Identifier: the TCP port number in decimal ASCII, space padded.
    pub trsvcid: [u8; 32],
    /// Reserved (bytes 255:64).
    pub reserved64: [u8; 192],
    /// NVM Subsystem Qualified Name, NUL terminated.
    pub subnqn: [u8; 256],
    /// Transport Address: the IP address in ASCII, space padded.
    pub traddr: [u8; 256],
    /// Transport Specific Address Subtype; for TCP byte 0 is SECTYPE.
    pub tsas: [u8; 256],
}

/// The values of a TCP discovery log entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpDiscoveryEntry<'a> {
    /// [`adrfam::IPV4`] or [`adrfam::IPV6`].
    pub adrfam: u8,
    /// See [`subtype`].
    pub subtype: u8,
    /// See [`treq`].
    pub treq: u8,
    /// Port ID.
    pub portid: u16,
    /// Controller ID, usually [`crate::spec::fabrics::CNTLID_DYNAMIC`].
    pub cntlid: u16,
    /// Admin Max SQ Size.
    pub asqsz: u16,
    /// Entry Flags.
    pub eflags: u16,
    /// TCP port, e.g. "4420".
    pub trsvcid: &'a str,
    /// IP address, e.g. "192.0.2.10".
    pub traddr: &'a str,
    /// Subsystem NQN.
    pub subnqn: &'a str,
    /// See [`sectype`].
    pub sectype: u8,
}

impl DiscoveryLogEntry {
    /// Builds a TCP entry (TRTYPE 3), validating the NQN and the ASCII fields.
    pub fn tcp(entry: &TcpDiscoveryEntry<'_>) -> Result<Self, Error> {
        super::fabrics::validate_nqn(entry.subnqn)?;
        let mut e = Self::new_zeroed();
        e.trtype = trtype::TCP;
        e.adrfam = entry.adrfam;
        e.subtype = entry.subtype;
        e.treq = entry.treq;
        e.portid.set(entry.portid);
        e.cntlid.set(entry.cntlid);
        e.asqsz.set(entry.asqsz);
        e.eflags.set(entry.eflags);
        write_space_padded(&mut e.trsvcid, entry.trsvcid, "trsvcid")?;
        write_space_padded(&mut e.traddr, entry.traddr, "traddr")?;
        write_nul_padded(&mut e.subnqn, entry.subnqn, "subnqn")?;
        e.tsas[0] = entry.sectype;
        Ok(e)
    }

    /// Transport Service Identifier without padding.
    pub fn trsvcid(&self) -> Option<&str> {
        read_space_padded(&self.trsvcid)
    }

    /// Transport Address without padding.
    pub fn traddr(&self) -> Option<&str> {
        read_space_padded(&self.traddr)
    }

    /// Subsystem NQN.
    pub fn subnqn(&self) -> Option<&str> {
        read_nul_terminated(&self.subnqn)
    }
}

impl fmt::Debug for DiscoveryLogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscoveryLogEntry")
            .field("trtype", &self.trtype)
            .field("adrfam", &self.adrfam)
            .field("subtype", &self.subtype)
            .field("portid", &self.portid.get())
            .field("trsvcid", &self.trsvcid())
            .field("traddr", &self.traddr())
            .field("subnqn", &self.subnqn())
            .finish_non_exhaustive()
    }
}

/// Appends the whole Discovery log page (header and `entries`) to `out`; the controller then returns the
/// `lpo..lpo + len` window of it.
pub fn write_discovery_log(out: &mut Vec<u8>, genctr: u64, entries: &[DiscoveryLogEntry]) {
    out.reserve(1024 * (entries.len() + 1));
    out.extend_from_slice(DiscoveryLogHeader::new(genctr, entries.len() as u64).as_bytes());
    for e in entries {
        out.extend_from_slice(e.as_bytes());
    }
}

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<ErrorLogEntry>() == 64);
    assert!(offset_of!(ErrorLogEntry, status) == 12 && offset_of!(ErrorLogEntry, lba) == 16);
    assert!(offset_of!(ErrorLogEntry, nsid) == 24 && offset_of!(ErrorLogEntry, cs) == 32);
    type S = SmartLog;
    assert!(size_of::<S>() == 512);
    assert!(offset_of!(S, composite_temperature) == 1 && offset_of!(S, available_spare) == 3);
    assert!(offset_of!(S, percentage_used) == 5 && offset_of!(S, data_units_read) == 32);
    assert!(offset_of!(S, data_units_written) == 48 && offset_of!(S, host_read_commands) == 64);
    assert!(offset_of!(S, power_on_hours) == 128 && offset_of!(S, error_log_entries) == 176);
    assert!(offset_of!(S, warning_temperature_time) == 192 && offset_of!(S, temperature_sensors) == 200);
    assert!(offset_of!(S, thermal_1_transitions) == 216 && offset_of!(S, thermal_2_time) == 228);
    assert!(size_of::<DiscoveryLogHeader>() == 1024);
    assert!(offset_of!(DiscoveryLogHeader, numrec) == 8 && offset_of!(DiscoveryLogHeader, recfmt) == 16);
    type E = DiscoveryLogEntry;
    assert!(size_of::<E>() == 1024);
    assert!(offset_of!(E, portid) == 4 && offset_of!(E, cntlid) == 6 && offset_of!(E, asqsz) == 8);
    assert!(offset_of!(E, eflags) == 10 && offset_of!(E, trsvcid) == 32 && offset_of!(E, subnqn) == 256);
    assert!(offset_of!(E, traddr) == 512 && offset_of!(E, tsas) == 768);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_log_page_fields_round_trip() {
        let args = GetLogPageArgs {
            lid: lid::DISCOVERY,
            lsp: 0,
            rae: true,
            numd: 0x1_0001,
            lsi: 0,
            lpo: 0x1_0000_0400,
            uuid_index: 0,
            csi: 0,
        };
        let cdws = args.to_cdws();
        assert_eq!(cdws[0], 0x0000_8070, "NUMDL 0 ... plus RAE and LID");
        assert_eq!(cdws[1], 0x0000_0001, "NUMDU");
        assert_eq!((cdws[2], cdws[3]), (0x400, 1));
        let mut sqe = Sqe::new(super::super::command::admin_opcode::GET_LOG_PAGE, 1);
        sqe.set_cdws(cdws);
        assert_eq!(sqe.get_log_page(), args);
        assert_eq!(args.len_bytes(), 0x4_0004);
    }

    #[test]
    fn discovery_entry_layout() {
        let e = DiscoveryLogEntry::tcp(&TcpDiscoveryEntry {
            adrfam: adrfam::IPV4,
            subtype: subtype::NVME,
            treq: treq::SECURE_CHANNEL_NOT_REQUIRED,
            portid: 1,
            cntlid: 0xffff,
            asqsz: 32,
            eflags: 0,
            trsvcid: "4420",
            traddr: "192.0.2.10",
            subnqn: "nqn.2024-01.com.example:vol",
            sectype: sectype::NONE,
        })
        .unwrap();
        let b = e.as_bytes();
        assert_eq!(&b[..12], &[3, 1, 2, 2, 1, 0, 0xff, 0xff, 32, 0, 0, 0]);
        assert_eq!(&b[32..38], b"4420  ");
        assert_eq!(b[63], b' ');
        assert_eq!(&b[512..522], b"192.0.2.10");
        assert_eq!(b[767], b' ');
        assert_eq!(
            (e.trsvcid(), e.traddr(), e.subnqn()),
            (Some("4420"), Some("192.0.2.10"), Some("nqn.2024-01.com.example:vol"))
        );

        let mut page = Vec::new();
        write_discovery_log(&mut page, 5, &[e.clone(), e]);
        assert_eq!(page.len(), 3 * 1024);
        assert_eq!(&page[..18], &[5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(page[1024], trtype::TCP);
    }

    #[test]
    fn changed_namespace_list_overflow() {
        let list = changed_namespace_list(&[3, 9]);
        assert_eq!(&list[..12], &[3, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0]);
        let many: Vec<u32> = (1..=1025).collect();
        let list = changed_namespace_list(&many);
        assert_eq!(&list[..4], &[0xff; 4]);
        assert!(list[4..].iter().all(|&b| b == 0));
    }
}
