//! Arbitrary UTF-8 as the headers a registry controls — `WWW-Authenticate` challenges, a redirect's `Location`,
//! `Content-Range` — and as an image reference: each is parsed or refused, never a panic. Accepted challenges
//! stay within the parser's bounds, and an accepted reference prints to a string that parses back to itself.
#![no_main]

use dpu_storage::image::registry::{self, AuthScheme, Reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match registry::parse_challenges(text) {
        Ok(challenges) => {
            assert!(!challenges.is_empty() && challenges.len() <= 16);
            for challenge in &challenges {
                assert!(challenge.params.len() <= 32);
                assert!(challenge.params.keys().all(|k| !k.is_empty() && *k == k.to_ascii_lowercase()));
                if let AuthScheme::Other(scheme) = &challenge.scheme {
                    assert_eq!(*scheme, scheme.to_ascii_lowercase());
                }
            }
            let preferred = registry::parse_www_authenticate(text).expect("the same header parses");
            assert!(challenges.contains(&preferred));
        }
        Err(_) => assert!(registry::parse_www_authenticate(text).is_err()),
    }

    let base: http::Uri = "https://registry.example:5000/v2/repo/blobs/uploads/?state=1".parse().unwrap();
    if let Ok(url) = registry::resolve_location(&base, text) {
        assert!(matches!(url.scheme_str(), Some("http" | "https")) && url.authority().is_some());
    }
    if let Some((first, last, total)) = registry::parse_content_range(text) {
        assert!(first <= last && total.is_none_or(|t| last < t));
    }
    if let Ok(reference) = text.parse::<Reference>() {
        let printed = reference.to_string();
        assert_eq!(printed.parse::<Reference>().ok().as_ref(), Some(&reference), "{printed}");
    }
});
