//! AES-256-XTS against a peer nobody here wrote: Python's `cryptography` package (OpenSSL underneath) encrypts
//! and decrypts random data units under random keys, and each side must read the other's output. Needs
//! `python3` with `cryptography` (Debian: python3-cryptography; tests/all.sh installs it).

use std::io::Write as _;
use std::process::{Command, Stdio};

use dpu_crypto::Secret;
use dpu_crypto::xts::XtsCipher;

const PEER: &str = r#"
import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
data = sys.stdin.buffer.read()
key, first, unit, direction, body = data[:64], int.from_bytes(data[64:72], "little"), int.from_bytes(data[72:76], "little"), data[76], data[77:]
out = bytearray()
for i in range(0, len(body), unit):
    c = Cipher(algorithms.AES(key), modes.XTS((first + i // unit).to_bytes(16, "little")))
    op = c.encryptor() if direction == 0 else c.decryptor()
    out += op.update(body[i:i + unit]) + op.finalize()
sys.stdout.buffer.write(out)
"#;

/// The peer's answer: `body` encrypted (or decrypted) as data units `first..` of `unit` bytes.
fn peer(key: &[u8], first: u64, unit: usize, encrypt: bool, body: &[u8]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .args(["-c", PEER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed");
    let mut input = key.to_vec();
    input.extend_from_slice(&first.to_le_bytes());
    input.extend_from_slice(&(unit as u32).to_le_bytes());
    input.push(u8::from(!encrypt));
    input.extend_from_slice(body);
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Python peer failed (install python3-cryptography): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn python_cryptography_reads_ours_and_we_read_theirs() {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..12 {
        let key = Secret::generate(64).unwrap();
        let cipher = XtsCipher::new(&key).unwrap();
        let unit = [512, 4096][round % 2];
        let units = 1 + (next() % 9) as usize;
        let first = match round {
            0 => 0,
            1 => u64::MAX - units as u64 + 1,
            _ => next() >> (next() % 64),
        };
        let plain: Vec<u8> = (0..unit * units).map(|_| next() as u8).collect();

        let mut ours = plain.clone();
        cipher.encrypt_units(first, unit, &mut ours).unwrap();
        assert_eq!(ours, peer(key.expose(), first, unit, true, &plain), "round {round}: ciphertexts differ");
        assert_eq!(peer(key.expose(), first, unit, false, &ours), plain, "round {round}: the peer cannot read ours");

        let theirs = peer(key.expose(), first, unit, true, &plain);
        let mut back = theirs.clone();
        cipher.decrypt_units(first, unit, &mut back).unwrap();
        assert_eq!(back, plain, "round {round}: we cannot read the peer's");
    }
}

const KEY_WRAP_PEER: &str = r#"
import sys
from cryptography.hazmat.primitives.keywrap import aes_key_wrap, aes_key_wrap_with_padding
data = sys.stdin.buffer.read()
kek, key = data[:32], data[32:]
wrap = aes_key_wrap_with_padding if len(key) % 8 else aes_key_wrap
sys.stdout.buffer.write(wrap(kek, key))
"#;

/// Key wrapping against the same peer: RFC 3394 for material in 8-byte blocks, RFC 5649 (with padding) for the
/// ESP keys (key and 4-byte salt: 20 and 36 bytes); our wrapped bytes equal theirs and unwrap again.
#[test]
fn python_cryptography_wraps_keys_as_we_do() {
    use dpu_crypto::kek::Kek;
    for len in [16, 20, 32, 36, 64] {
        let kek_bytes = Secret::generate(32).unwrap();
        let key = Secret::generate(len).unwrap();
        let kek = Kek::from_secret(Secret::new(kek_bytes.expose().to_vec())).unwrap();
        let ours = if len % 8 == 0 { kek.wrap(&key).unwrap() } else { kek.wrap_padded(&key).unwrap() };
        let mut child = Command::new("python3")
            .args(["-c", KEY_WRAP_PEER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 must be installed");
        let mut input = kek_bytes.expose().to_vec();
        input.extend_from_slice(key.expose());
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "the Python peer failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(ours, out.stdout, "{len}-byte key wrapped differently");
        let back = if len % 8 == 0 { kek.unwrap(&ours).unwrap() } else { kek.unwrap_padded(&ours).unwrap() };
        assert_eq!(back.expose(), key.expose());
    }
}
