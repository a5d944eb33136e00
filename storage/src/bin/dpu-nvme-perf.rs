//! `dpu-nvme-perf`: an NVMe/TCP load generator on the crate's initiator, in the spirit of `fio` and SPDK's
//! `perf`. It connects to a subsystem, keeps `--queue-depth` commands in flight on each of `--queues` I/O
//! queues for `--time`, and reports IOPS, throughput and latency percentiles.
//!
//! Everything runs on one thread (a current-thread runtime, so the tool can be pinned to one core). Each
//! command slot is a worker that reuses one buffer and records its latencies in its own log-linear histogram;
//! nothing is allocated per I/O.
#![allow(clippy::print_stdout)] // Printing the results is this program's job.

use std::cell::Cell;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use dpu_storage::initiator::{ConnectOptions, Initiator, IoQueue};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

/// Drive an NVMe/TCP subsystem with reads and writes and report IOPS, throughput and latency.
#[derive(Debug, Parser)]
#[command(name = "dpu-nvme-perf", version)]
struct Args {
    /// Controller address.
    #[arg(long, default_value = "127.0.0.1:4420")]
    addr: SocketAddr,
    /// Subsystem NQN.
    #[arg(long)]
    nqn: String,
    /// Host NQN (default: a UUID NQN made up for this run).
    #[arg(long)]
    hostnqn: Option<String>,
    /// Commands in flight per I/O queue.
    #[arg(long, default_value_t = 32)]
    queue_depth: u16,
    /// Bytes per I/O (suffixes k, m, g: powers of 1024).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    io_size: u64,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    rw: Pattern,
    /// Percentage of reads with --rw randrw.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmix_read: u8,
    /// How long to run (e.g. 10s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    time: Duration,
    /// I/O queues (one TCP connection each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Namespace id.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Use header digests.
    #[arg(long)]
    header_digest: bool,
    /// Use data digests.
    #[arg(long)]
    data_digest: bool,
    /// Disable SQ flow control (lets the target skip the completion of successful reads).
    #[arg(long)]
    disable_sqflow: bool,
    /// Busy-poll the sockets for this many microseconds after the last data instead of sleeping (0: never;
    /// burns the client's core, removes a wakeup per response).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Use only the first SIZE bytes of the namespace (default: all of it).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Stop after transferring this many bytes (a sequential pass over --size with --rw write fills it once).
    #[arg(long, value_parser = parse_size)]
    bytes: Option<u64>,
    /// Seed of the random offsets and read/write mix.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Self::Randread => "randread",
            Self::Randwrite => "randwrite",
            Self::Read => "read",
            Self::Write => "write",
            Self::Randrw => "randrw",
        }
    }

    fn random(self) -> bool {
        matches!(self, Self::Randread | Self::Randwrite | Self::Randrw)
    }
}

/// Parses `4096`, `4k`, `4KiB`, `128K`, `1m`, `1GiB`, ... (binary units).
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size such as 4k or 1GiB"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?} has an unknown unit (use k, m, g or t)")),
    };
    n.checked_mul(1 << shift).filter(|&v| v > 0).ok_or_else(|| format!("{text:?} is zero or too large"))
}

/// Parses `10s`, `500ms`, `2m`, `1.5s` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a duration such as 10s"))?;
    Duration::try_from_secs_f64(value * scale)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration"))
}

/// A log-linear latency histogram (the HDR histogram layout): exact below 2^(SUB_BITS+1), then 2^SUB_BITS
/// buckets per power of two, so any recorded value is within 1/2^SUB_BITS (0.8 %) of its bucket.
#[derive(Debug, Clone)]
struct Histogram {
    counts: Box<[u64]>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

const SUB_BITS: u32 = 7;

impl Histogram {
    fn new() -> Self {
        Self { counts: vec![0; Self::index(u64::MAX) + 1].into_boxed_slice(), total: 0, sum: 0, min: u64::MAX, max: 0 }
    }

    fn index(value: u64) -> usize {
        if value < 1 << (SUB_BITS + 1) {
            return value as usize;
        }
        let shift = 63 - value.leading_zeros() - SUB_BITS;
        ((shift as usize) << SUB_BITS) + (value >> shift) as usize
    }

    /// The largest value that lands in bucket `index`.
    fn highest(index: usize) -> u64 {
        if index < 1 << (SUB_BITS + 1) {
            return index as u64;
        }
        let shift = (index >> SUB_BITS) as u32 - 1;
        let sub = (index - ((shift as usize) << SUB_BITS)) as u64;
        (sub << shift) + ((1u64 << shift) - 1)
    }

    fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.total += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    fn merge(&mut self, other: &Self) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    fn mean(&self) -> f64 {
        if self.total == 0 { 0.0 } else { self.sum as f64 / self.total as f64 }
    }

    /// The value below or at which `percent` % of the recordings fall (bucket upper bound, capped at max).
    fn percentile(&self, percent: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((percent / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::highest(i).min(self.max);
            }
        }
        self.max
    }
}

/// xorshift64*: fast and good enough to pick offsets.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // SplitMix64 step, so nearby seeds give unrelated streams (and the state is never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is negligible for n ≪ 2^64).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// What every worker does, fixed for the run.
#[derive(Debug)]
struct Plan {
    nsid: u32,
    pattern: Pattern,
    rwmix_read: u8,
    io_size: usize,
    /// Blocks per I/O.
    io_blocks: u64,
    /// I/O-sized slots in the range.
    slots: u64,
    deadline: Instant,
    byte_limit: Option<u64>,
}

/// State the workers of one run share (single-threaded).
#[derive(Debug, Default)]
struct Cursor {
    /// Next slot of a sequential pattern.
    next: Cell<u64>,
    /// Bytes issued, for `--bytes`.
    issued: Cell<u64>,
}

#[derive(Debug)]
struct Outcome {
    latency_ns: Histogram,
    reads: u64,
    writes: u64,
}

/// One command slot: issue, wait, record, repeat.
async fn worker(q: &IoQueue, plan: &Plan, cursor: &Cursor, seed: u64) -> anyhow::Result<Outcome> {
    let mut rng = Rng::new(seed);
    // Non-zero data, so a thin volume really allocates what is written.
    let mut buf: Vec<u8> = (0..plan.io_size).map(|i| (i as u64 ^ seed) as u8 | 1).collect();
    let mut out = Outcome { latency_ns: Histogram::new(), reads: 0, writes: 0 };
    loop {
        let started = Instant::now();
        if started >= plan.deadline {
            break;
        }
        if let Some(limit) = plan.byte_limit {
            let issued = cursor.issued.get() + plan.io_size as u64;
            if issued > limit {
                break;
            }
            cursor.issued.set(issued);
        }
        let slot = if plan.pattern.random() {
            rng.below(plan.slots)
        } else {
            let s = cursor.next.get();
            cursor.next.set((s + 1) % plan.slots);
            s
        };
        let read = match plan.pattern {
            Pattern::Randread | Pattern::Read => true,
            Pattern::Randwrite | Pattern::Write => false,
            Pattern::Randrw => rng.below(100) < u64::from(plan.rwmix_read),
        };
        let lba = slot * plan.io_blocks;
        let (back, result) = if read { q.read(plan.nsid, lba, buf).await } else { q.write(plan.nsid, lba, buf).await };
        buf = back;
        result
            .with_context(|| format!("{} at block {lba} on queue {}", if read { "read" } else { "write" }, q.qid()))?;
        out.latency_ns.record(started.elapsed().as_nanos() as u64);
        if read {
            out.reads += 1;
        } else {
            out.writes += 1;
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut opts = ConnectOptions::new(args.nqn.clone());
    if let Some(hostnqn) = &args.hostnqn {
        opts.hostnqn.clone_from(hostnqn);
    }
    opts.io_queues = args.queues.max(1);
    opts.queue_depth = args.queue_depth.max(1);
    opts.header_digest = args.header_digest;
    opts.data_digest = args.data_digest;
    opts.disable_sq_flow_control = args.disable_sqflow;
    opts.busy_poll = (args.poll_us > 0).then(|| Duration::from_micros(args.poll_us));
    let host = Initiator::connect(args.addr, opts)
        .await
        .with_context(|| format!("connecting to {} at {}", args.nqn, args.addr))?;
    let ns = host.namespace(args.nsid).with_context(|| format!("namespace {} is not active", args.nsid))?;
    let queues = host.io_queues();
    if queues.len() < usize::from(args.queues) {
        tracing::warn!(wanted = args.queues, granted = queues.len(), "the controller granted fewer I/O queues");
    }
    let depth = queues.first().map(IoQueue::depth).context("the controller granted no I/O queue")?;
    if depth < args.queue_depth {
        tracing::warn!(wanted = args.queue_depth, granted = depth, "queue depth lowered to what the controller allows");
    }
    let io_size = args.io_size;
    if !io_size.is_multiple_of(u64::from(ns.block_size)) {
        bail!("--io-size {io_size} is not a multiple of the namespace's {}-byte blocks", ns.block_size);
    }
    let range = args.size.unwrap_or(ns.bytes()).min(ns.bytes());
    let slots = range / io_size;
    if slots == 0 {
        bail!("the range of {range} bytes holds no {io_size}-byte I/O");
    }
    let started = Instant::now();
    let plan = Plan {
        nsid: args.nsid,
        pattern: args.rw,
        rwmix_read: args.rwmix_read,
        io_size: io_size as usize,
        io_blocks: io_size / u64::from(ns.block_size),
        slots,
        deadline: started + args.time,
        byte_limit: args.bytes,
    };
    let cursor = Cursor::default();
    let workers = queues.iter().enumerate().flat_map(|(qi, q)| {
        let (plan, cursor) = (&plan, &cursor);
        (0..depth).map(move |w| worker(q, plan, cursor, args.seed ^ ((qi as u64) << 32 | u64::from(w))))
    });
    let cpu_before = thread_cpu_time();
    // Polls only the workers whose command completed.
    let mut running: FuturesUnordered<_> = workers.collect();
    let mut total = Outcome { latency_ns: Histogram::new(), reads: 0, writes: 0 };
    while let Some(result) = running.next().await {
        let part = result?;
        total.latency_ns.merge(&part.latency_ns);
        total.reads += part.reads;
        total.writes += part.writes;
    }
    let elapsed = started.elapsed();
    let cpu = thread_cpu_time().zip(cpu_before).map(|(after, before)| after.saturating_sub(before));
    report(&args, &total, elapsed, cpu, queues.len(), depth, range);
    Ok(())
}

/// CPU time of this thread, which runs all of the tool's work (Linux: `/proc/thread-self/schedstat`).
fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().next()?.parse().ok().map(Duration::from_nanos)
}

fn report(
    args: &Args,
    total: &Outcome,
    elapsed: Duration,
    cpu: Option<Duration>,
    queues: usize,
    depth: u16,
    range: u64,
) {
    let ios = total.reads + total.writes;
    let seconds = elapsed.as_secs_f64();
    let iops = ios as f64 / seconds;
    let mib_s = iops * args.io_size as f64 / (1024.0 * 1024.0);
    let h = &total.latency_ns;
    let us = |ns: u64| ns as f64 / 1000.0;
    let (avg, min) = (h.mean() / 1000.0, if h.total == 0 { 0.0 } else { us(h.min) });
    let (p50, p99, p999, max) = (us(h.percentile(50.0)), us(h.percentile(99.0)), us(h.percentile(99.9)), us(h.max));
    if args.json {
        let value = serde_json::json!({
            "rw": args.rw.name(),
            "io_size": args.io_size,
            "queue_depth": depth,
            "queues": queues,
            "nsid": args.nsid,
            "range_bytes": range,
            "header_digest": args.header_digest,
            "data_digest": args.data_digest,
            "poll_us": args.poll_us,
            "seconds": seconds,
            "ios": ios,
            "reads": total.reads,
            "writes": total.writes,
            "iops": iops,
            "mib_s": mib_s,
            "lat_us": { "avg": avg, "min": min, "p50": p50, "p99": p99, "p99_9": p999, "max": max },
            "cpu_seconds": cpu.map(|c| c.as_secs_f64()),
        });
        println!("{value}");
        return;
    }
    println!(
        "{} {} B, {queues} queue(s) x QD {depth}, nsid {} ({range} bytes), {seconds:.2} s",
        args.rw.name(),
        args.io_size,
        args.nsid
    );
    println!("  IOPS {iops:.0}   {mib_s:.1} MiB/s   {ios} I/Os ({} reads, {} writes)", total.reads, total.writes);
    println!("  latency (us): avg {avg:.1}  min {min:.1}  p50 {p50:.1}  p99 {p99:.1}  p99.9 {p999:.1}  max {max:.1}");
    if let Some(cpu) = cpu {
        let per_io = if ios == 0 { 0.0 } else { cpu.as_secs_f64() * 1e6 / ios as f64 };
        println!("  client CPU: {:.0} % of one core, {per_io:.2} us per I/O", cpu.as_secs_f64() * 100.0 / seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_contiguous_and_tight() {
        let mut last = 0;
        for i in 1..Histogram::index(u64::MAX) {
            let top = Histogram::highest(i);
            assert_eq!(Histogram::index(top), i, "bucket {i}");
            assert_eq!(Histogram::index(top + 1), i + 1, "bucket {i}");
            assert!(top > last);
            last = top;
        }
        for v in [0, 1, 255, 256, 257, 1000, 123_456, 10_000_000_000] {
            let top = Histogram::highest(Histogram::index(v));
            assert!(top >= v && (top - v) as f64 <= v as f64 / 128.0 + 1.0, "{v} → {top}");
        }
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let close = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 / 100.0;
        assert!(close(h.percentile(50.0), 500_000), "{}", h.percentile(50.0));
        assert!(close(h.percentile(99.0), 990_000), "{}", h.percentile(99.0));
        assert!(close(h.percentile(99.9), 999_000), "{}", h.percentile(99.9));
        assert_eq!(h.percentile(100.0), 1_000_000);
        assert_eq!(h.mean(), 500_500.0);
        let mut other = Histogram::new();
        other.record(5);
        h.merge(&other);
        assert_eq!((h.total, h.min, h.max), (1001, 5, 1_000_000));
        assert_eq!(Histogram::new().percentile(99.0), 0);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("128K"), Ok(128 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("4x").is_err());
        assert!(parse_size("0").is_err());
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn random_offsets_cover_the_range() {
        let mut rng = Rng::new(1);
        let mut seen = [false; 16];
        for _ in 0..1000 {
            seen[rng.below(16) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
