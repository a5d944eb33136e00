//! Arbitrary bytes as an intent log: opening must succeed or report corruption, never panic, and a refused
//! file must be left byte-for-byte as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("intent.log");
    std::fs::write(&log, data).unwrap();
    match dpu_intent::Store::open(dir.path()) {
        Ok(store) => drop(store),
        Err(dpu_intent::Error::Corrupt { .. }) => assert_eq!(std::fs::read(&log).unwrap(), data),
        Err(e) => panic!("unexpected error: {e}"),
    }
});
