//! A client certificate's DER bytes (as presented in the TLS handshake) parsed for the caller's role.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = dpu_agent::api::auth::caller_from_certificate(data);
});
