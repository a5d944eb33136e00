//! Arbitrary text as the filter expressions of a containerd `List` request (one per line): parsing gives a
//! filter or an error, never a panic, and a filter evaluates against a snapshot without panicking.
#![no_main]

use std::time::SystemTime;

use dpu_host::snapshot::{Filter, Info, Kind, Labels};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let expressions: Vec<&str> = text.split('\n').collect();
    let Ok(filter) = Filter::parse_all(&expressions) else { return };
    let info = Info {
        name: "sha256:abc".into(),
        parent: Some("sha256:def".into()),
        kind: Kind::Committed,
        created: SystemTime::UNIX_EPOCH,
        updated: SystemTime::UNIX_EPOCH,
        labels: Labels::from([
            ("containerd.io/gc.root".into(), "2026-12-05".into()),
            ("containerd.io/snapshot.ref".into(), "sha256:abc".into()),
        ]),
    };
    let _ = filter.matches(&info);
});
