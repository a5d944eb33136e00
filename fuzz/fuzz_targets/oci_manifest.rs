//! Arbitrary bytes as a manifest or index document from a registry, with or without a `Content-Type`: parsing
//! must accept or refuse, never panic; an accepted document passes validation again and round-trips through its
//! own serialization; platform selection over an accepted index returns one of its entries for that platform.
#![no_main]

use dpu_storage::image::oci::{self, Parsed, Platform};
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [Option<&str>; 4] = [
    None,
    Some(oci::MEDIA_TYPE_OCI_INDEX),
    Some(oci::MEDIA_TYPE_DOCKER_MANIFEST),
    Some("application/json; charset=utf-8"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, document)) = data.split_first() else { return };
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    let Ok(parsed) = oci::parse_manifest(content_type, document) else { return };
    let json = match &parsed {
        Parsed::Manifest(manifest) => {
            manifest.validate().expect("an accepted manifest is valid");
            manifest.to_json()
        }
        Parsed::Index(index) => {
            index.validate().expect("an accepted index is valid");
            index.to_json()
        }
    };
    assert_eq!(oci::parse_manifest(content_type, &json).as_ref(), Ok(&parsed), "round trip");
    let Parsed::Index(index) = &parsed else { return };
    let wanted = ["linux/amd64", "linux/arm64", "linux/arm64/v8", "linux/arm/v7"].map(|p| p.parse::<Platform>());
    for platform in wanted.iter().flatten().chain([Platform::host()].iter()) {
        match oci::select_platform(index, platform) {
            Ok(entry) => {
                assert!(index.manifests.iter().any(|e| std::ptr::eq(e, entry)));
                assert!(oci::is_manifest_type(&entry.media_type));
                assert_eq!(entry.platform.as_ref().map(|p| p.os.as_str()), Some(platform.os.as_str()));
            }
            Err(e) => assert!(matches!(e, oci::OciError::NoMatchingPlatform { .. })),
        }
    }
});
