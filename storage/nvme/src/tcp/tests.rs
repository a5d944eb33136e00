use core::ops::Range;

use super::*;
use crate::spec::fabrics::{CNTLID_DYNAMIC, ConnectCommand, ConnectData, DISCOVERY_NQN, fctype};
use crate::spec::{Cqe, SglDescriptor, SglKind, Sqe, Status, command::io_opcode};

const MAX: u32 = 72 + 4 + 8192 + 4;
const SUBNQN: &str = "nqn.2024-01.com.example:vol-1";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6";
const HOSTID: [u8; 16] =
    [0xf8, 0x1d, 0x4f, 0xae, 0x7d, 0xec, 0x11, 0xd0, 0xa7, 0x65, 0x00, 0xa0, 0xc9, 0x1e, 0x6b, 0xf6];

fn target(digests: bool) -> Decoder {
    Decoder { header_digest: digests, data_digest: digests, ..Decoder::new(Direction::HostToController, MAX) }
}

fn host(digests: bool) -> Decoder {
    Decoder { header_digest: digests, data_digest: digests, ..Decoder::new(Direction::ControllerToHost, MAX) }
}

fn tx(digests: bool) -> TxOptions {
    TxOptions { header_digest: digests, data_digest: digests, pda: 0 }
}

#[track_caller]
fn frame(decoder: &Decoder, buf: &[u8]) -> (PduHeader, Range<usize>, usize) {
    match decoder.decode(buf) {
        Ok(Decoded::Frame { header, data, len }) => (header, data, len),
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// The Connect capsule the Linux host sends on the admin queue: SQE flags 0x40 (SGL), fctype Connect, an
/// in-capsule Data Block/Offset SGL of 1024 bytes at offset 0 (ICDOFF), SQSIZE 31, KATO 5000 ms, then the
/// Connect data with CNTLID FFFFh.
fn linux_admin_connect(cid: u16) -> Vec<u8> {
    let mut pdu = vec![0x04, 0x00, 72, 72, 0x48, 0x04, 0x00, 0x00]; // CapsuleCmd, HLEN 72, PDO 72, PLEN 1096
    let mut sqe = [0u8; 64];
    sqe[0] = 0x7f;
    sqe[1] = 0x40;
    sqe[2..4].copy_from_slice(&cid.to_le_bytes());
    sqe[4] = 0x01;
    sqe[32..36].copy_from_slice(&[0x00, 0x04, 0x00, 0x00]);
    sqe[39] = 0x01;
    sqe[44..46].copy_from_slice(&[0x1f, 0x00]);
    sqe[48..52].copy_from_slice(&[0x88, 0x13, 0x00, 0x00]);
    pdu.extend_from_slice(&sqe);
    let mut data = [0u8; 1024];
    data[..16].copy_from_slice(&HOSTID);
    data[16..18].copy_from_slice(&[0xff, 0xff]);
    data[256..256 + SUBNQN.len()].copy_from_slice(SUBNQN.as_bytes());
    data[512..512 + HOSTNQN.len()].copy_from_slice(HOSTNQN.as_bytes());
    pdu.extend_from_slice(&data);
    pdu
}

fn connect_pdu(cid: u16, opts: TxOptions) -> Vec<u8> {
    let cmd = ConnectCommand::new(cid, 0, 31, 0, 5000, SglDescriptor::in_capsule(0, 1024));
    let data = ConnectData::new(HOSTID, CNTLID_DYNAMIC, SUBNQN, HOSTNQN).unwrap();
    let mut out = Vec::new();
    encode_capsule_cmd(&mut out, cmd.as_sqe(), zerocopy::IntoBytes::as_bytes(&data), opts);
    out
}

#[test]
fn icreq_as_the_linux_host_sends_it() {
    // Linux: HLEN = PLEN = 128, PDO 0, PFV 0, HPDA 0, MAXR2T 0 (one R2T in flight), digest bits as configured.
    let mut expected = [0u8; 128];
    expected[..8].copy_from_slice(&[0x00, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00]);
    expected[11] = digest_bits::HEADER | digest_bits::DATA;
    let mut out = Vec::new();
    assert_eq!(encode_ic_req(&mut out, 0, true, true, 0), 128);
    assert_eq!(out, expected);

    let (header, data, len) = frame(&target(false), &expected);
    let PduHeader::IcReq(icreq) = header else { panic!("{header:?}") };
    assert_eq!((icreq.pfv(), icreq.hpda(), icreq.maxr2t()), (0, 0, 0));
    assert!(icreq.header_digest() && icreq.data_digest());
    assert_eq!((data, len), (128..128, 128));
    // An ICReq carries no digest even on a decoder that already expects them.
    assert!(matches!(target(true).decode(&expected), Ok(Decoded::Frame { .. })));
}

#[test]
fn icresp_layout() {
    let mut out = Vec::new();
    encode_ic_resp(&mut out, 0, true, false, 128 * 1024);
    assert_eq!(
        &out[..16],
        &[0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00]
    );
    assert!(out[16..].iter().all(|&b| b == 0));
    let (header, ..) = frame(&host(false), &out);
    let PduHeader::IcResp(icresp) = header else { panic!("{header:?}") };
    assert_eq!(
        (icresp.cpda(), icresp.header_digest(), icresp.data_digest(), icresp.maxh2cdata()),
        (0, true, false, 131_072)
    );
}

#[test]
fn connect_capsule_with_in_capsule_data() {
    let expected = linux_admin_connect(0x1b);
    assert_eq!(connect_pdu(0x1b, tx(false)), expected);

    let (header, data, len) = frame(&target(false), &expected);
    assert_eq!((data.clone(), len), (72..1096, 1096));
    let PduHeader::CapsuleCmd(cmd) = header else { panic!("{header:?}") };
    let sqe = cmd.sqe();
    assert!(sqe.is_fabrics());
    assert_eq!((sqe.fctype(), sqe.cid(), sqe.psdt()), (fctype::CONNECT, 0x1b, 1));
    assert_eq!(sqe.sgl().kind(), SglKind::InCapsule { offset: 0, length: 1024 });
    let connect = sqe.as_connect();
    assert_eq!((connect.qid(), connect.sqsize(), connect.kato_ms(), connect.cattr()), (0, 31, 5000, 0));
    let cdata = ConnectData::parse(&expected[data]).unwrap();
    assert_eq!((cdata.hostid, cdata.cntlid()), (HOSTID, 0xffff));
    assert_eq!((cdata.subnqn(), cdata.hostnqn()), (Some(SUBNQN), Some(HOSTNQN)));
}

#[test]
fn connect_capsule_with_digests() {
    let pdu = connect_pdu(1, tx(true));
    assert_eq!(pdu.len(), 72 + 4 + 1024 + 4);
    assert_eq!(&pdu[..8], &[0x04, flags::HDGSTF | flags::DDGSTF, 72, 76, 0x50, 0x04, 0, 0]);
    assert_eq!(pdu[72..76], crc32c(&pdu[..72]).to_le_bytes());
    assert_eq!(pdu[1100..], crc32c(&pdu[76..1100]).to_le_bytes());
    let (header, data, len) = frame(&target(true), &pdu);
    assert_eq!((header.pdu_type(), data, len), (PduType::CapsuleCmd, 76..1100, 1104));
}

#[test]
fn controller_pdus_round_trip() {
    for digests in [false, true] {
        let opts = tx(digests);
        let hdgst = if digests { 4 } else { 0 };

        let mut out = Vec::new();
        let cqe = Cqe::new(7, 1, 12, Status::LBA_OUT_OF_RANGE.with_dnr(), 0, 0);
        assert_eq!(encode_capsule_resp(&mut out, &cqe, opts), 24 + hdgst);
        let (header, data, len) = frame(&host(digests), &out);
        let PduHeader::CapsuleResp(resp) = header else { panic!("{header:?}") };
        assert_eq!((*resp.cqe(), data.is_empty(), len), (cqe, true, 24 + hdgst));

        out.clear();
        encode_r2t(&mut out, 7, 3, 4096, 8192, opts);
        let (header, _, len) = frame(&host(digests), &out);
        let PduHeader::R2T(r2t) = header else { panic!("{header:?}") };
        assert_eq!((r2t.cccid(), r2t.ttag(), r2t.r2to(), r2t.r2tl(), len), (7, 3, 4096, 8192, 24 + hdgst));

        // C2HData: header from the encoder, data sent from two separate buffers, digest over both.
        let (a, b) = (vec![0x11u8; 3000], vec![0x22u8; 1096]);
        out.clear();
        let pdu = DataPdu { cccid: 7, datao: 8192, datal: 4096, last: true, success: true, ..DataPdu::default() };
        let pdo = encode_c2h_data_header(&mut out, &pdu, opts);
        assert_eq!(pdo, 24 + hdgst);
        out.extend_from_slice(&a);
        out.extend_from_slice(&b);
        if digests {
            out.extend_from_slice(&data_digest([&a[..], &b[..]]));
        }
        let (header, data, len) = frame(&host(digests), &out);
        let PduHeader::C2HData(c2h) = header else { panic!("{header:?}") };
        assert_eq!((c2h.cccid(), c2h.datao(), c2h.datal(), c2h.last(), c2h.success()), (7, 8192, 4096, true, true));
        assert_eq!((data, len), (pdo..pdo + 4096, out.len()));
    }
}

#[test]
fn host_pdus_round_trip() {
    for digests in [false, true] {
        let opts = tx(digests);
        let mut out = Vec::new();
        let mut read = Sqe::new(io_opcode::READ, 9);
        read.set_nsid(1).set_sgl(SglDescriptor::transport(4096));
        encode_capsule_cmd(&mut out, &read, &[], opts);
        assert_eq!(out[3], 0, "no data: PDO 0");
        let (header, data, len) = frame(&target(digests), &out);
        assert_eq!((header.command_id(), data.is_empty(), len), (Some(9), true, out.len()));

        out.clear();
        let pdu = DataPdu { cccid: 9, ttag: 5, datao: 0, datal: 512, last: true, success: true };
        let pdo = encode_h2c_data_header(&mut out, &pdu, opts);
        out.extend_from_slice(&[0xabu8; 512]);
        if digests {
            out.extend_from_slice(&data_digest([&[0xabu8; 512][..]]));
        }
        let (header, data, _) = frame(&target(digests), &out);
        let PduHeader::H2CData(h2c) = header else { panic!("{header:?}") };
        assert_eq!((h2c.ttag(), h2c.last(), h2c.success(), data), (5, true, false, pdo..pdo + 512));
    }
}

#[test]
fn data_alignment_padding() {
    // HPDA 7: C2H data aligned to 32 bytes, so 24 + 4 header bytes are padded to PDO 32.
    let opts = TxOptions { header_digest: true, data_digest: false, pda: 7 };
    let mut out = Vec::new();
    let pdo = encode_c2h_data_header(&mut out, &DataPdu { cccid: 1, datal: 8, last: true, ..DataPdu::default() }, opts);
    assert_eq!((pdo, out.len(), out[3]), (32, 32, 32));
    assert_eq!(&out[28..32], &[0; 4]);
    out.extend_from_slice(&[1; 8]);
    let decoder = Decoder { pda: 7, header_digest: true, ..host(false) };
    assert_eq!(frame(&decoder, &out).1, 32..40);
    // The same PDU is misaligned for a host that asked for 64-byte alignment.
    let strict = Decoder { pda: 15, ..decoder };
    assert_eq!(strict.decode(&out), Err(PduError::InvalidHeaderField { offset: 3 }));
}

fn stream() -> (Vec<u8>, Vec<(PduType, Vec<u8>)>) {
    let opts = tx(true);
    let mut bytes = connect_pdu(1, opts);
    let mut expected = vec![(PduType::CapsuleCmd, bytes[76..1100].to_vec())];
    for i in 0..4u16 {
        let data: Vec<u8> = (0..700 + u32::from(i) * 333).map(|b| (b * 31 + u32::from(i)) as u8).collect();
        let pdu = DataPdu { cccid: i, ttag: i, datao: 0, datal: data.len() as u32, last: true, success: false };
        encode_h2c_data_header(&mut bytes, &pdu, opts);
        bytes.extend_from_slice(&data);
        bytes.extend_from_slice(&data_digest([&data[..]]));
        expected.push((PduType::H2CData, data));
        encode_capsule_cmd(&mut bytes, &Sqe::new(io_opcode::FLUSH, i), &[], opts);
        expected.push((PduType::CapsuleCmd, Vec::new()));
    }
    (bytes, expected)
}

#[test]
fn byte_by_byte_needs_more_until_complete() {
    let decoder = target(true);
    let (bytes, expected) = stream();
    let mut at = 0;
    for (pdu_type, payload) in expected {
        let rest = &bytes[at..];
        let mut n = 0;
        let len = loop {
            match decoder.decode(&rest[..n]) {
                Ok(Decoded::NeedMore(need)) => {
                    assert!(need > n, "NeedMore({need}) with {n} bytes buffered");
                    n += 1;
                }
                Ok(Decoded::Frame { header, data, len }) => {
                    assert_eq!(n, len, "the frame completes exactly at PLEN");
                    assert_eq!((header.pdu_type(), &rest[data]), (pdu_type, &payload[..]));
                    break len;
                }
                Err(e) => panic!("{e}"),
            }
        };
        at += len;
    }
    assert_eq!(at, bytes.len());
}

#[test]
fn random_chunks_reassemble_the_stream() {
    let decoder = target(true);
    let (bytes, expected) = stream();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _round in 0..50 {
        let (mut buf, mut got, mut sent) = (Vec::new(), Vec::new(), 0);
        while sent < bytes.len() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let chunk = (seed % 1500 + 1) as usize;
            let end = (sent + chunk).min(bytes.len());
            buf.extend_from_slice(&bytes[sent..end]);
            sent = end;
            while let Ok(Decoded::Frame { header, data, len }) = decoder.decode(&buf) {
                got.push((header.pdu_type(), buf[data].to_vec()));
                buf.drain(..len);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got, expected);
    }
}

#[test]
fn header_digest_error_is_fatal() {
    let mut pdu = connect_pdu(1, tx(true));
    pdu[10] ^= 1; // the SQE's CID
    let err = target(true).decode(&pdu).unwrap_err();
    assert!(matches!(err, PduError::HeaderDigest { .. }));
    assert_eq!((err.fes(), err.fei(), err.is_fatal()), (Some(FatalErrorStatus::HeaderDigestError), 0, true));
    // Detected as soon as the header and its digest are in, without waiting for the data.
    assert_eq!(target(true).decode(&pdu[..76]), Err(err));
}

#[test]
fn data_digest_error_is_not_fatal_and_keeps_the_stream_in_step() {
    let (mut bytes, _) = stream();
    bytes[500] ^= 0x80; // Connect data of command 1
    let decoder = target(true);
    let err = decoder.decode(&bytes).unwrap_err();
    let PduError::DataDigest { cccid, len, .. } = err else { panic!("{err:?}") };
    assert_eq!((cccid, len, err.is_fatal(), err.fes()), (1, 1104, false, None));
    let (header, ..) = frame(&decoder, &bytes[len..]);
    assert_eq!(header.pdu_type(), PduType::H2CData);
}

fn patched(mut pdu: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    pdu[at..at + bytes.len()].copy_from_slice(bytes);
    pdu
}

/// Recomputes the header digest of a patched header, so that the decoder gets past it.
fn redigest(mut pdu: Vec<u8>) -> Vec<u8> {
    let hlen = usize::from(pdu[2]);
    let digest = header_digest(&pdu[..hlen]);
    pdu[hlen..hlen + 4].copy_from_slice(&digest);
    pdu
}

#[test]
fn malformed_headers_map_to_fes_and_fei() {
    use PduError::{DataLimitExceeded, InvalidHeaderField as Field, UnsupportedParameter};
    let connect = linux_admin_connect(1);
    let connect_dg = connect_pdu(1, tx(true));
    let mut read = Vec::new();
    encode_capsule_cmd(&mut read, &Sqe::new(io_opcode::READ, 2), &[], tx(false));
    let mut icreq = Vec::new();
    encode_ic_req(&mut icreq, 0, false, false, 0);
    let mut h2c = Vec::new();
    encode_h2c_data_header(&mut h2c, &DataPdu { cccid: 1, datal: 16, last: true, ..DataPdu::default() }, tx(false));
    h2c.extend_from_slice(&[0; 16]);
    let mut term = Vec::new();
    encode_term_req(&mut term, Direction::HostToController, FatalErrorStatus::PduSequenceError, 0, &read);

    let aligned = Decoder { pda: 1, ..target(false) };
    let cases: Vec<(&str, Decoder, Vec<u8>, PduError)> = vec![
        ("reserved type", target(false), patched(read.clone(), 0, &[0x08]), Field { offset: 0 }),
        ("controller-to-host type", target(false), patched(read.clone(), 0, &[0x05]), Field { offset: 0 }),
        ("HLEN", target(false), patched(read.clone(), 2, &[24]), Field { offset: 2 }),
        (
            "HDGSTF without header digests",
            target(false),
            patched(read.clone(), 1, &[flags::HDGSTF]),
            Field { offset: 1 },
        ),
        ("HDGSTF missing", target(true), read.clone(), Field { offset: 1 }),
        (
            "DDGSTF without data digests",
            target(false),
            patched(connect.clone(), 1, &[flags::DDGSTF]),
            Field { offset: 1 },
        ),
        ("DDGSTF missing", Decoder { header_digest: false, ..target(true) }, connect.clone(), Field { offset: 1 }),
        ("DDGSTF without data", target(false), patched(read.clone(), 1, &[flags::DDGSTF]), Field { offset: 1 }),
        ("PLEN below HLEN", target(false), patched(read.clone(), 4, &[70]), Field { offset: 4 }),
        ("data without PDO", target(false), patched(connect.clone(), 3, &[0]), Field { offset: 4 }),
        ("PDO inside the header", target(false), patched(connect.clone(), 3, &[68]), Field { offset: 3 }),
        (
            "PDO inside the header digest",
            target(true),
            redigest(patched(connect_dg.clone(), 3, &[72])),
            Field { offset: 3 },
        ),
        ("PDO misaligned", aligned, patched(connect.clone(), 3, &[76]), Field { offset: 3 }),
        ("PDO past PLEN", target(false), patched(read.clone(), 3, &[72]), Field { offset: 3 }),
        ("PDO beyond PLEN", target(false), patched(read.clone(), 3, &[76]), Field { offset: 4 }),
        ("PDO on ICReq", target(false), patched(icreq.clone(), 3, &[8]), Field { offset: 3 }),
        (
            "PLEN over the limit",
            target(false),
            patched(connect.clone(), 4, &[0, 0, 1, 0]),
            DataLimitExceeded { plen: 65536, limit: MAX },
        ),
        ("ICReq PLEN", target(false), patched(icreq.clone(), 4, &[132]), Field { offset: 4 }),
        ("ICReq PFV", target(false), patched(icreq.clone(), 8, &[1]), UnsupportedParameter { offset: 8 }),
        ("ICReq HPDA", target(false), patched(icreq.clone(), 10, &[32]), Field { offset: 10 }),
        ("H2CData without PDO", target(false), patched(h2c.clone(), 3, &[0]), Field { offset: 3 }),
        ("H2CData DATAL", target(false), patched(h2c.clone(), 16, &[15]), Field { offset: 16 }),
        ("TermReq PLEN", target(false), patched(term.clone(), 4, &[153]), Field { offset: 4 }),
        ("TermReq DDGSTF", target(false), patched(term.clone(), 1, &[flags::DDGSTF]), Field { offset: 1 }),
        ("TermReq HDGSTF", target(true), patched(term.clone(), 1, &[flags::HDGSTF]), Field { offset: 1 }),
    ];
    for (what, decoder, pdu, expected) in cases {
        let err = decoder.decode(&pdu).expect_err(what);
        assert_eq!(err, expected, "{what}");
        assert!(err.is_fatal(), "{what}");
        assert_eq!(
            err.fei(),
            match expected {
                Field { offset } | UnsupportedParameter { offset } => offset,
                _ => 0,
            }
        );
    }
    assert_eq!(Field { offset: 0 }.fes(), Some(FatalErrorStatus::InvalidHeaderField));
    assert_eq!(UnsupportedParameter { offset: 8 }.fes(), Some(FatalErrorStatus::UnsupportedParameter));
    assert_eq!(DataLimitExceeded { plen: 1, limit: 0 }.fes(), Some(FatalErrorStatus::DataTransferLimitExceeded));
}

#[test]
fn malformed_controller_pdus() {
    use PduError::{InvalidHeaderField as Field, UnsupportedParameter};
    let mut c2h = Vec::new();
    encode_c2h_data_header(&mut c2h, &DataPdu { cccid: 1, datal: 4, last: true, ..DataPdu::default() }, tx(false));
    c2h.extend_from_slice(&[0; 4]);
    let mut r2t = Vec::new();
    encode_r2t(&mut r2t, 1, 1, 0, 4096, tx(false));
    let mut icresp = Vec::new();
    encode_ic_resp(&mut icresp, 0, false, false, 65536);
    let mut resp = Vec::new();
    encode_capsule_resp(&mut resp, &Cqe::default(), tx(false));

    let cases: Vec<(&str, Vec<u8>, PduError)> = vec![
        ("SUCCESS without LAST_PDU", patched(c2h, 1, &[flags::DATA_SUCCESS]), Field { offset: 1 }),
        ("R2TL 0", patched(r2t, 16, &[0, 0, 0, 0]), Field { offset: 16 }),
        ("MAXH2CDATA below 4096", patched(icresp.clone(), 12, &[0, 8, 0, 0]), Field { offset: 12 }),
        ("MAXH2CDATA not a multiple of 4", patched(icresp.clone(), 12, &[2, 0, 1, 0]), Field { offset: 12 }),
        ("ICResp PFV", patched(icresp.clone(), 8, &[1]), UnsupportedParameter { offset: 8 }),
        ("ICResp CPDA", patched(icresp, 10, &[40]), Field { offset: 10 }),
        ("CapsuleResp PDO", patched(resp.clone(), 3, &[24]), Field { offset: 3 }),
        ("CapsuleResp PLEN", patched(resp, 4, &[28]), Field { offset: 4 }),
        ("host-to-controller type", linux_admin_connect(1), Field { offset: 0 }),
    ];
    for (what, pdu, expected) in cases {
        assert_eq!(host(false).decode(&pdu), Err(expected), "{what}");
    }
}

#[test]
fn errors_are_reported_before_the_data_arrives() {
    // A bad type fails on the common header alone; an oversized PLEN once the header is in.
    assert_eq!(target(false).decode(&[0x05, 0, 24, 0, 24, 0, 0, 0]), Err(PduError::InvalidHeaderField { offset: 0 }));
    assert_eq!(target(false).decode(&[0x04, 0, 72, 0]), Ok(Decoded::NeedMore(CH_LEN)));
    let connect = linux_admin_connect(1);
    assert_eq!(target(false).decode(&connect[..8]), Ok(Decoded::NeedMore(72)));
    assert_eq!(target(false).decode(&connect[..72]), Ok(Decoded::NeedMore(1096)));
    let huge = patched(connect, 4, &[0, 0, 0, 0x10]);
    assert!(matches!(target(false).decode(&huge[..72]), Err(PduError::DataLimitExceeded { .. })));
}

#[test]
fn term_req_layout_and_decode() {
    let offending = linux_admin_connect(1);
    let mut out = Vec::new();
    let quoted = offending_header(&offending);
    assert_eq!(quoted.len(), 72);
    let n = encode_term_req(&mut out, Direction::ControllerToHost, FatalErrorStatus::InvalidHeaderField, 2, quoted);
    assert_eq!(n, 96);
    assert_eq!(&out[..16], &[0x03, 0x00, 24, 0x00, 96, 0, 0, 0, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0, 0]);
    assert_eq!(&out[24..], &offending[..72]);
    // A TermReq never has digests, even after they were negotiated.
    let (header, data, len) = frame(&host(true), &out);
    let PduHeader::C2HTermReq(term) = header else { panic!("{header:?}") };
    assert_eq!(
        (term.fatal_error_status(), term.fei(), data, len),
        (Some(FatalErrorStatus::InvalidHeaderField), 2, 24..96, 96)
    );

    // At most 128 bytes of the offending header are quoted.
    out.clear();
    encode_term_req(&mut out, Direction::HostToController, FatalErrorStatus::PduSequenceError, 0, &[7; 200]);
    assert_eq!((out.len(), out[0], u32::from_le_bytes([out[4], out[5], out[6], out[7]])), (152, 0x02, 152));
    assert!(matches!(target(false).decode(&out), Ok(Decoded::Frame { len: 152, .. })));

    assert_eq!(offending_header(&[0x04, 0, 255, 0]).len(), 4);
    assert_eq!(offending_header(&[0x00, 0, 200, 0, 0, 0, 0, 0, 0, 0]).len(), 10);
    assert_eq!(offending_header(&[0xab; 300]).len(), 128);
}

#[test]
fn discovery_nqn_connect_on_io_queue_uses_the_same_framing() {
    // Connect on an I/O queue: QID 1, the controller's CNTLID in the data, still in-capsule regardless of
    // IOCCSZ (Fabrics commands may carry 8 KiB in-capsule).
    let cmd = ConnectCommand::new(0, 1, 127, 0, 0, SglDescriptor::in_capsule(0, 1024));
    let data = ConnectData::new(HOSTID, 1, DISCOVERY_NQN, HOSTNQN).unwrap();
    let mut out = Vec::new();
    encode_capsule_cmd(&mut out, cmd.as_sqe(), zerocopy::IntoBytes::as_bytes(&data), tx(false));
    let (header, data, _) = frame(&target(false), &out);
    let PduHeader::CapsuleCmd(c) = header else { panic!("{header:?}") };
    assert_eq!((c.sqe().as_connect().qid(), c.sqe().as_connect().sqsize()), (1, 127));
    assert_eq!(ConnectData::parse(&out[data]).map(|d| d.cntlid()), Some(1));
}
