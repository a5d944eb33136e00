//! What the kernel and the peer send a kernel TLS connection: the sock_diag reply that says where a socket's
//! TLS runs, post-handshake messages (session tickets, KeyUpdate) and alert records. Any bytes give a value or
//! a clear error, never a panic; a classification never claims more bytes than a message can need.
#![no_main]

use dpu_crypto::ktls::{PostHandshake, alert, parse_diag_reply, post_handshake};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 3 {
        0 => {
            if let Ok(Some(info)) = parse_diag_reply(rest) {
                let _ = (info.tx.as_str(), info.rx.is_hardware());
            }
        }
        1 => {
            if let PostHandshake::Incomplete(need) = post_handshake(rest) {
                assert!(need > 0 && need <= 4 + 0xff_ffff, "{need}");
            }
        }
        _ => {
            if let Some(a) = alert(rest) {
                assert_eq!(rest.len(), 2);
                assert_eq!(a.is_close_notify(), a.description == 0);
            }
        }
    }
});
