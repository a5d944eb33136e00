//! PDU encoders appending to a caller-owned buffer (NVMe/TCP Transport Specification 1.0, PDU layouts).
//!
//! Data PDUs are written header first: the caller sends the header bytes, then the data straight from its
//! own buffers, then (with data digests) the [`super::data_digest`] of that data.

use zerocopy::IntoBytes;

use super::digest::{data_digest, header_digest};
use super::pdu::{
    CH_LEN, CapsuleCmd, CapsuleResp, CommonHeader, DIGEST_LEN, DataHeader, Direction, FatalErrorStatus, IcReq, IcResp,
    MAX_PDA, PduType, R2t, TERM_REQ_MAX_ERROR_DATA, TermReq, flags,
};
use crate::spec::{Cqe, Sqe};

/// How this side frames the PDUs it sends, fixed by the ICReq/ICResp exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxOptions {
    /// Header digests negotiated.
    pub header_digest: bool,
    /// Data digests negotiated.
    pub data_digest: bool,
    /// The alignment the peer asked for (HPDA when a controller sends, CPDA when a host sends): PDU data
    /// starts at a multiple of (pda + 1) * 4 bytes.
    pub pda: u8,
}

impl TxOptions {
    fn hdgst_len(&self) -> usize {
        if self.header_digest { DIGEST_LEN } else { 0 }
    }

    fn ddgst_len(&self) -> usize {
        if self.data_digest { DIGEST_LEN } else { 0 }
    }

    fn header_flags(&self) -> u8 {
        if self.header_digest { flags::HDGSTF } else { 0 }
    }

    /// PDO for a header of `hlen` bytes: past the header digest, rounded up to the alignment.
    fn data_offset(&self, hlen: u8) -> usize {
        let align = (usize::from(self.pda.min(MAX_PDA)) + 1) * 4;
        (usize::from(hlen) + self.hdgst_len()).div_ceil(align) * align
    }

    /// Appends `header`, its digest and zero padding up to `pdo`.
    fn put_header(&self, out: &mut Vec<u8>, header: &[u8], pdo: usize) {
        out.extend_from_slice(header);
        if self.header_digest {
            out.extend_from_slice(&header_digest(header));
        }
        out.resize(out.len() + pdo.saturating_sub(header.len() + self.hdgst_len()), 0);
    }
}

/// Appends an ICReq (host): PFV 0, `hpda`, the digests the host asks for and the 0's based `maxr2t`.
/// Returns the bytes appended (128).
pub fn encode_ic_req(out: &mut Vec<u8>, hpda: u8, header_digest: bool, data_digest: bool, maxr2t: u32) -> usize {
    let pdu = IcReq::new(hpda, header_digest, data_digest, maxr2t);
    out.extend_from_slice(pdu.as_bytes());
    pdu.as_bytes().len()
}

/// Appends an ICResp (controller): PFV 0, `cpda`, the digests enabled and `maxh2cdata` (at least 4096 and a
/// multiple of 4). Returns the bytes appended (128).
pub fn encode_ic_resp(out: &mut Vec<u8>, cpda: u8, header_digest: bool, data_digest: bool, maxh2cdata: u32) -> usize {
    let pdu = IcResp::new(cpda, header_digest, data_digest, maxh2cdata);
    out.extend_from_slice(pdu.as_bytes());
    pdu.as_bytes().len()
}

/// Appends a complete CapsuleCmd (host): header, header digest, padding, the in-capsule `data` (may be empty)
/// and its digest. The SQE's SGL must describe the data ([`crate::spec::SglDescriptor::in_capsule`]).
/// Returns the bytes appended.
pub fn encode_capsule_cmd(out: &mut Vec<u8>, sqe: &Sqe, data: &[u8], opts: TxOptions) -> usize {
    let start = out.len();
    let hlen = PduType::CapsuleCmd.header_len();
    let (pdo, plen, ddgst) = if data.is_empty() {
        (0, usize::from(hlen) + opts.hdgst_len(), false)
    } else {
        let pdo = opts.data_offset(hlen);
        (pdo, pdo + data.len() + opts.ddgst_len(), opts.data_digest)
    };
    let pdu_flags = opts.header_flags() | if ddgst { flags::DDGSTF } else { 0 };
    let header = CapsuleCmd::new(pdu_flags, pdo as u8, plen as u32, *sqe);
    opts.put_header(out, header.as_bytes(), pdo);
    out.extend_from_slice(data);
    if ddgst {
        out.extend_from_slice(&data_digest([data]));
    }
    out.len() - start
}

/// Appends a CapsuleResp (controller) with the completion and, if negotiated, its header digest. Returns the
/// bytes appended.
pub fn encode_capsule_resp(out: &mut Vec<u8>, cqe: &Cqe, opts: TxOptions) -> usize {
    let plen = usize::from(PduType::CapsuleResp.header_len()) + opts.hdgst_len();
    let header = CapsuleResp::new(opts.header_flags(), plen as u32, *cqe);
    opts.put_header(out, header.as_bytes(), 0);
    plen
}

/// The fields of an H2CData or C2HData PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataPdu {
    /// Command Capsule CID.
    pub cccid: u16,
    /// Transfer Tag from the R2T (H2CData; ignored for C2HData).
    pub ttag: u16,
    /// Data Offset within the command's data.
    pub datao: u32,
    /// Data Length of this PDU, at least 1.
    pub datal: u32,
    /// LAST_PDU.
    pub last: bool,
    /// SUCCESS (C2HData only, requires `last`): the host completes the command without a CapsuleResp. Only
    /// for hosts that disabled SQ flow control at Connect (CATTR bit 2), since no SQHD reaches them.
    pub success: bool,
}

/// Appends the header part of a C2HData PDU (controller): header, header digest and padding. The caller then
/// sends `datal` bytes of data and, with data digests, their [`super::data_digest`]. Returns the bytes
/// appended, which is also the PDO.
pub fn encode_c2h_data_header(out: &mut Vec<u8>, pdu: &DataPdu, opts: TxOptions) -> usize {
    let success = if pdu.success && pdu.last { flags::DATA_SUCCESS } else { 0 };
    encode_data_header(out, PduType::C2HData, DataPdu { ttag: 0, ..*pdu }, success, opts)
}

/// Appends the header part of an H2CData PDU (host), like [`encode_c2h_data_header`].
pub fn encode_h2c_data_header(out: &mut Vec<u8>, pdu: &DataPdu, opts: TxOptions) -> usize {
    encode_data_header(out, PduType::H2CData, *pdu, 0, opts)
}

fn encode_data_header(out: &mut Vec<u8>, pdu_type: PduType, pdu: DataPdu, extra: u8, opts: TxOptions) -> usize {
    let pdo = opts.data_offset(pdu_type.header_len());
    let plen = pdo + pdu.datal as usize + opts.ddgst_len();
    let pdu_flags = opts.header_flags()
        | if opts.data_digest { flags::DDGSTF } else { 0 }
        | if pdu.last { flags::DATA_LAST } else { 0 }
        | extra;
    let ch = CommonHeader::new(pdu_type, pdu_flags, pdo as u8, plen as u32);
    let header = DataHeader::new(ch, pdu.cccid, pdu.ttag, pdu.datao, pdu.datal);
    opts.put_header(out, header.as_bytes(), pdo);
    pdo
}

/// Appends an R2T (controller) asking for `r2tl` bytes at offset `r2to` of command `cccid`, tagged `ttag`.
/// Returns the bytes appended.
pub fn encode_r2t(out: &mut Vec<u8>, cccid: u16, ttag: u16, r2to: u32, r2tl: u32, opts: TxOptions) -> usize {
    let plen = usize::from(PduType::R2T.header_len()) + opts.hdgst_len();
    let header = R2t::new(opts.header_flags(), plen as u32, cccid, ttag, r2to, r2tl);
    opts.put_header(out, header.as_bytes(), 0);
    plen
}

/// Appends a Terminate Connection Request: a C2HTermReq when a controller sends it (`sender`
/// [`Direction::ControllerToHost`]), an H2CTermReq from a host, with the Fatal Error Status and Information
/// (from [`super::PduError::fes`] and [`super::PduError::fei`]) and the first 128 bytes of `offending`, the received PDU
/// header that caused the error (see [`offending_header`]). TermReqs carry no digests. Returns the bytes
/// appended.
pub fn encode_term_req(
    out: &mut Vec<u8>,
    sender: Direction,
    fes: FatalErrorStatus,
    fei: u32,
    offending: &[u8],
) -> usize {
    let pdu_type = match sender {
        Direction::ControllerToHost => PduType::C2HTermReq,
        Direction::HostToController => PduType::H2CTermReq,
    };
    let copied = &offending[..offending.len().min(TERM_REQ_MAX_ERROR_DATA)];
    let header = TermReq::new(pdu_type, fes, fei, copied.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(copied);
    header.as_bytes().len() + copied.len()
}

/// The header of the PDU at the start of `buf` to quote in a Terminate Connection Request: HLEN bytes (at
/// least the 8-byte common header, at most 128), as far as they were received.
pub fn offending_header(buf: &[u8]) -> &[u8] {
    let hlen = buf.get(2).map_or(CH_LEN, |&h| usize::from(h).max(CH_LEN));
    &buf[..buf.len().min(hlen).min(TERM_REQ_MAX_ERROR_DATA)]
}
