//! `dpu-image-chunks`: how the chunk size of converted layers trades off, measured on a real image and a real
//! start-up. It converts every layer of an OCI image layout to its EROFS filesystem, cuts it at each chunk size,
//! and prints per size: chunks, index size, stored (compressed) bytes, and — given a start-up trace recorded
//! with 4 KiB chunks (the blocks the start read, as the DPU stores it beside the image) — the chunks that start
//! touches, the bytes it fetches and the ranged requests it needs. Each size is cut once per compression asked
//! for, with the time compressing took.
#![allow(clippy::print_stdout)] // Printing the table is this program's job.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dpu_storage::image::chunk::{Compression, chunk_image};
use dpu_storage::image::convert::{LayerOptions, Layout, layer_filesystem};
use dpu_storage::image::oci::Platform;
use dpu_storage::image::trace::Trace;

#[derive(Debug, Parser)]
#[command(name = "dpu-image-chunks", version)]
struct Args {
    /// OCI image layout directory and tag, DIR:TAG.
    #[arg(long)]
    layout: String,
    /// Start-up trace (JSON, as stored beside a converted image) recorded with 4 KiB chunks.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Chunk sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [4096u32, 16384, 65536, 262_144, 1_048_576])]
    sizes: Vec<u32>,
    /// Compressions: lz4, zstd (the converter's default level) or zstd-N.
    #[arg(long, value_delimiter = ',', default_values_t = [Compression::DEFAULT])]
    compressions: Vec<Compression>,
    /// Scratch space for unpacking layers.
    #[arg(long, default_value = "/tmp/dpu-image-chunks")]
    work_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The directory ends at its first colon, as in skopeo's oci:PATH:REFERENCE (a tag may hold colons).
    let (dir, tag) = args.layout.split_once(':').context("--layout is DIR:TAG")?;
    let layout = Layout { dir: PathBuf::from(dir) };
    let (manifest, _) = layout.manifest(Some(tag), &Platform::host())?;
    let trace: Option<Trace> = match &args.trace {
        Some(path) => Some(serde_json::from_slice(&std::fs::read(path)?).context("reading the trace")?),
        None => None,
    };
    let options = LayerOptions::new(&args.work_dir);
    let mut layers = Vec::new();
    for layer in &manifest.layers {
        let blob = layout.blob_path(&layer.digest);
        let (image, _) = layer_filesystem(&blob, &layer.media_type, &layer.digest, &options)?;
        // The blocks the start read: the trace's chunk numbers are 4 KiB blocks.
        let blocks: BTreeSet<u64> = trace
            .as_ref()
            .and_then(|t| t.layers.get(&layer.digest))
            .map(|chunks| chunks.iter().map(|&c| u64::from(c)).collect())
            .unwrap_or_default();
        layers.push((image, blocks));
    }
    let total: u64 = layers.iter().map(|(image, _)| image.len() as u64).sum();
    let read: u64 = layers.iter().map(|(_, blocks)| blocks.len() as u64 * 4096).sum();
    println!("layers: {}  filesystem: {:.1} MiB  read by the start: {:.1} MiB", layers.len(), mib(total), mib(read));
    println!(
        "| chunk | compression | chunks | index KiB | stored MiB | ratio | cut s | start: chunks | fetched MiB \
         | of stored | requests |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let runs = args.sizes.iter().flat_map(|&size| args.compressions.iter().map(move |&c| (size, c)));
    for (size, compression) in runs {
        let (mut chunks, mut index_bytes, mut stored, mut touched, mut fetched, mut requests) = (0, 0, 0, 0, 0, 0);
        let mut cutting = std::time::Duration::ZERO;
        for (image, blocks) in &layers {
            let started = std::time::Instant::now();
            let chunked = chunk_image(image, size, compression)?;
            cutting += started.elapsed();
            chunks += chunked.index.chunks.len();
            index_bytes += chunked.index.encode().len();
            stored += chunked.data.len() as u64;
            let wanted: BTreeSet<usize> = blocks.iter().map(|b| (b * 4096 / u64::from(size)) as usize).collect();
            // Each stored range once (identical chunks share one), then runs of adjacent ranges: one request each.
            let ranges: BTreeSet<(u64, u64)> = wanted
                .iter()
                .filter_map(|&c| chunked.index.chunks.get(c))
                .map(|e| (e.stored().start, e.stored().end))
                .collect();
            touched += wanted.len();
            fetched += ranges.iter().map(|(a, b)| b - a).sum::<u64>();
            let mut end = None;
            for (a, b) in ranges {
                if end != Some(a) {
                    requests += 1;
                }
                end = Some(b);
            }
        }
        println!(
            "| {} KiB | {compression} | {chunks} | {:.0} | {:.1} | {:.2} | {:.1} | {touched} | {:.1} | {:.1}% \
             | {requests} |",
            size / 1024,
            index_bytes as f64 / 1024.0,
            mib(stored),
            total as f64 / stored.max(1) as f64,
            cutting.as_secs_f64(),
            mib(fetched),
            100.0 * fetched as f64 / stored.max(1) as f64,
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}
