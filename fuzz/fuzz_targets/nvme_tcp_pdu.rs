//! Arbitrary bytes as an NVMe/TCP stream, decoded by both sides with digests off and on: every PDU is
//! framed or rejected, never a panic; frames lie inside the buffer; every accessor of a decoded header
//! works; and the Terminate Connection Request built for a fatal error is itself a valid PDU for the peer.
#![no_main]

use dpu_nvme::spec::fabrics::{ConnectData, fctype, validate_nqn};
use dpu_nvme::tcp::{Decoded, Decoder, Direction, PduHeader, encode_term_req, offending_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for direction in [Direction::HostToController, Direction::ControllerToHost] {
        for digests in [false, true] {
            for pda in [0, 7] {
                let decoder =
                    Decoder { header_digest: digests, data_digest: digests, pda, ..Decoder::new(direction, 16 * 1024) };
                run(&decoder, data);
            }
        }
    }
});

fn run(decoder: &Decoder, mut buf: &[u8]) {
    loop {
        match decoder.decode(buf) {
            Ok(Decoded::NeedMore(need)) => {
                assert!(need > buf.len());
                return;
            }
            Ok(Decoded::Frame { header, data, len }) => {
                assert!(len <= buf.len() && data.start <= data.end && data.end <= len);
                assert_eq!(header.as_bytes().len(), usize::from(header.common().hlen()));
                inspect(&header, &buf[data]);
                buf = &buf[len..];
            }
            Err(err) if !err.is_fatal() => {
                let dpu_nvme::tcp::PduError::DataDigest { len, .. } = err else { panic!("{err}") };
                assert!(len <= buf.len() && err.fes().is_none());
                buf = &buf[len..];
            }
            Err(err) => {
                let fes = err.fes().expect("fatal errors have a status");
                let sender = match decoder.direction {
                    Direction::HostToController => Direction::ControllerToHost,
                    Direction::ControllerToHost => Direction::HostToController,
                };
                let mut out = Vec::new();
                let n = encode_term_req(&mut out, sender, fes, err.fei(), offending_header(buf));
                let peer = Decoder { direction: sender, ..*decoder };
                assert!(matches!(peer.decode(&out), Ok(Decoded::Frame { len, .. }) if len == n), "{err}");
                return;
            }
        }
    }
}

fn inspect(header: &PduHeader, data: &[u8]) {
    let ch = header.common();
    let _ = (ch.pdu_type(), ch.flags(), ch.pdo(), ch.plen(), header.pdu_type(), header.command_id());
    match header {
        PduHeader::IcReq(h) => {
            let _ = (h.pfv(), h.hpda(), h.header_digest(), h.data_digest(), h.maxr2t());
        }
        PduHeader::IcResp(h) => {
            let _ = (h.pfv(), h.cpda(), h.header_digest(), h.data_digest(), h.maxh2cdata());
        }
        PduHeader::H2CTermReq(h) | PduHeader::C2HTermReq(h) => {
            let _ = (h.fes(), h.fatal_error_status(), h.fei());
        }
        PduHeader::CapsuleCmd(h) => {
            let sqe = h.sqe();
            let _ = (sqe.opcode(), sqe.flags(), sqe.fuse(), sqe.psdt(), sqe.cid(), sqe.nsid(), sqe.fctype());
            let _ = (sqe.mptr(), sqe.cdw2(), sqe.cdw3(), sqe.cdw10(), sqe.cdw11(), sqe.cdw12());
            let _ = (sqe.cdw13(), sqe.cdw14(), sqe.cdw15(), sqe.lba_range(), sqe.disconnect_recfmt());
            let sgl = sqe.sgl();
            let _ = (sgl.kind(), sgl.address(), sgl.length(), sgl.keyed_length(), sgl.identifier());
            let _ = (sqe.identify(), sqe.feature(), sqe.get_log_page().len_bytes());
            let connect = sqe.as_connect();
            let _ = (connect.recfmt(), connect.qid(), connect.sqsize(), connect.cattr(), connect.kato_ms());
            let property = sqe.as_property();
            let _ = (property.size(), property.offset(), property.value(), property.attrib());
            if sqe.is_fabrics() && sqe.fctype() == fctype::CONNECT {
                if let Some(cdata) = ConnectData::parse(data) {
                    let _ = cdata.cntlid();
                    for nqn in [cdata.subnqn(), cdata.hostnqn()].into_iter().flatten() {
                        let _ = validate_nqn(nqn);
                    }
                }
            }
        }
        PduHeader::CapsuleResp(h) => {
            let cqe = h.cqe();
            let status = cqe.status();
            let _ = (cqe.dw0(), cqe.dw1(), cqe.result_u64(), cqe.sq_head(), cqe.sq_id(), cqe.cid());
            let _ = (status.sct(), status.sc(), status.crd(), status.more(), status.dnr(), status.is_success());
        }
        PduHeader::H2CData(h) | PduHeader::C2HData(h) => {
            assert_eq!(h.datal() as usize, data.len());
            let _ = (h.cccid(), h.ttag(), h.datao(), h.last(), h.success());
        }
        PduHeader::R2T(h) => {
            let _ = (h.cccid(), h.ttag(), h.r2to(), h.r2tl());
        }
    }
}
