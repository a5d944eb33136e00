//! Single-core AES-256-XTS throughput of `dpu_crypto::xts`: encrypt and decrypt, 4096-byte and 512-byte data
//! units, one unit per call as the encrypted volume does for a one-unit I/O and 32 units per call (128 KiB),
//! ~2 s per row. `bench/crypto.sh` runs it beside `openssl speed`.
//!
//!   cargo run --release -p dpu-crypto --example xts-speed [-- SECONDS_PER_ROW]
#![allow(clippy::print_stdout, reason = "a benchmark printing its table")]

use std::hint::black_box;
use std::time::{Duration, Instant};

use dpu_crypto::Secret;
use dpu_crypto::xts::XtsCipher;

fn main() {
    let seconds: f64 = std::env::args().nth(1).map_or(2.0, |s| s.parse().expect("seconds per row: a number"));
    let budget = Duration::from_secs_f64(seconds);
    let cipher = XtsCipher::new(&Secret::generate(64).expect("random key")).expect("AES-256-XTS key");

    println!("engine: {}", cipher.engine().name());
    println!();
    println!("| data unit | units per call | encrypt GB/s | decrypt GB/s |");
    println!("|---|---|---|---|");
    for (unit, per_call) in [(4096, 32), (4096, 1), (512, 1), (512, 256)] {
        let enc = rate(budget, unit, per_call, |first, buf| cipher.encrypt_units(first, unit, buf));
        let dec = rate(budget, unit, per_call, |first, buf| cipher.decrypt_units(first, unit, buf));
        println!("| {unit} | {per_call} | {enc:.2} | {dec:.2} |");
    }
}

/// Bytes per second (in 10^9) over `budget`, one call of `per_call` units at a time, the data unit number
/// advancing like a sequential write.
fn rate(
    budget: Duration,
    unit: usize,
    per_call: usize,
    mut op: impl FnMut(u64, &mut [u8]) -> Result<(), dpu_crypto::CryptoError>,
) -> f64 {
    let mut buf = vec![0x5a_u8; unit * per_call];
    let mut first = 0u64;
    // Warm up (caches, frequency), then measure in batches so the clock is read rarely.
    let warm = Instant::now();
    while warm.elapsed() < budget / 10 {
        op(first, black_box(&mut buf)).expect("whole data units");
        first += per_call as u64;
    }
    let batch = (1 << 22) / buf.len();
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < budget {
        for _ in 0..batch.max(1) {
            op(black_box(first), black_box(&mut buf)).expect("whole data units");
            first += per_call as u64;
            bytes += buf.len() as u64;
        }
    }
    black_box(&buf);
    bytes as f64 / start.elapsed().as_secs_f64() / 1e9
}
