//! xfrm dump messages as the kernel sends them back (states and policies, anyone's): any bytes give a decoded
//! state or policy, "not ours to manage" or a clear error, never a panic; what decodes encodes again to bytes
//! that decode to the same thing.
#![no_main]

use dpu_fabric::ipsec::xfrm::{Policy, State};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    if selector % 2 == 0 {
        if let Ok(Some(state)) = State::decode(rest) {
            let again = State::decode(&state.encode()).expect("our encoding decodes").expect("and is ours");
            assert!(again.same_config(&state));
        }
    } else if let Ok(Some(policy)) = Policy::decode(rest) {
        assert_eq!(Policy::decode(&policy.encode()).expect("our encoding decodes"), Some(policy));
    }
});
