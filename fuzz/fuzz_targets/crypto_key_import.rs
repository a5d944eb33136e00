//! Key material as a host imports it, and keys as the intent log stores them: any bytes give a sealed key or a
//! clear error, never a panic; a sealed key unseals to the same material; a stored key record (JSON) that was
//! tampered with is refused by the unwrap's integrity check or the material check, never accepted as a
//! different key.
#![no_main]

use dpu_crypto::Secret;
use dpu_crypto::kek::Kek;
use dpu_crypto::keys::{KeyAlgorithm, KeySpec, Keys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let keys = Keys::with_kek(Kek::from_secret(Secret::new(vec![0x5a; 32])).unwrap());
    let algorithm = KeyAlgorithm::ALL[usize::from(selector) % KeyAlgorithm::ALL.len()];
    if let Ok(spec) = keys.seal(algorithm, &Secret::new(rest.to_vec())) {
        assert_eq!(keys.unseal(&spec).unwrap().expose(), rest);
    }
    if let Ok(spec) = serde_json::from_slice::<KeySpec>(rest)
        && let Ok(material) = keys.unseal(&spec)
    {
        assert_eq!(material.len(), spec.algorithm.key_len());
    }
});
