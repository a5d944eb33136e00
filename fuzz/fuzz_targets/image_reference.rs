//! Arbitrary text as an image reference from a containerd label: parsing gives a reference or an error, never
//! a panic; a parsed reference prints as text that parses back to it, and the names derived from it are valid.
#![no_main]

use std::collections::BTreeMap;

use dpu_host::dpu::reference::{Reference, image_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(reference) = Reference::parse(text) else { return };
    assert_eq!(Reference::parse(&reference.to_string()).as_ref(), Ok(&reference));
    let rewrites = BTreeMap::from([("registry.local:5000".to_owned(), "10.0.0.5:5000".to_owned())]);
    if let Ok(converted) = reference.rewritten(&rewrites).converted("-lazy") {
        let id = image_id(&converted);
        assert!(id.len() <= 63 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }
});
