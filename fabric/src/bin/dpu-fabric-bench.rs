//! Benchmark of the fabric's netlink backend against iproute2 (not a test): installs N flower rules on one
//! device through [`dpu_fabric::reconcile::sync`] (the path the reconciler takes) and the same rules on another
//! device with `tc -batch`, then runs the unchanged-rules pass again and checks it writes nothing. Prints a
//! table. Run as root with two veth pairs:
//!
//! `dpu-fabric-bench --rules 10000 --dev b0 --peer b0p --tc-dev b1 --tc-peer b1p --tc /sbin/tc`

#![allow(clippy::print_stdout)] // The table is the output.

use std::io::Write as _;
use std::time::Instant;

use anyhow::{Context as _, bail};
use dpu_fabric::model::MacAddr;
use dpu_fabric::ports::InventoryConfig;
use dpu_fabric::reconcile::{plan, sync};
use dpu_fabric::rules::{Action, Keys, PROTO_ALL, Rule};
use dpu_fabric::switch::{NetlinkSwitch, Switch};

struct Args {
    rules: u32,
    dev: String,
    peer: String,
    tc_dev: String,
    tc_peer: String,
    tc: String,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rules: 10_000,
        dev: String::new(),
        peer: String::new(),
        tc_dev: String::new(),
        tc_peer: String::new(),
        tc: "tc".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rules" => a.rules = value.parse().context("--rules")?,
            "--dev" => a.dev = value,
            "--peer" => a.peer = value,
            "--tc-dev" => a.tc_dev = value,
            "--tc-peer" => a.tc_peer = value,
            "--tc" => a.tc = value,
            other => bail!("unknown option {other}"),
        }
    }
    if a.dev.is_empty() || a.peer.is_empty() || a.tc_dev.is_empty() || a.tc_peer.is_empty() {
        bail!("usage: dpu-fabric-bench [--rules N] --dev D --peer P --tc-dev D2 --tc-peer P2 [--tc PATH]");
    }
    if a.rules == 0 || a.rules > 0x00ff_ffff {
        bail!("--rules must be 1..=16777215");
    }
    Ok(a)
}

fn mac(i: u32) -> MacAddr {
    let [_, b, c, d] = i.to_be_bytes();
    MacAddr([0x02, 0xbb, 0, b, c, d])
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let switch = NetlinkSwitch::open(InventoryConfig::default())?;
    let rules: Vec<Rule> = (1..=a.rules)
        .map(|i| Rule {
            prio: 30,
            protocol: PROTO_ALL,
            handle: i,
            keys: Keys { dst_mac: Some((mac(i), MacAddr([0xff; 6]))), ..Keys::default() },
            actions: vec![Action::Redirect { dev: a.peer.clone() }],
            owner: "bench".into(),
        })
        .collect();

    let started = Instant::now();
    let writes = sync(&switch, &a.dev, &rules, false)?;
    let agent = started.elapsed().as_secs_f64();

    let batch = std::env::temp_dir().join("dpu-fabric-bench.batch");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&batch)?);
    writeln!(file, "qdisc add dev {} clsact", a.tc_dev)?;
    for i in 1..=a.rules {
        writeln!(
            file,
            "filter add dev {} ingress protocol all prio 30 handle {i} flower skip_hw dst_mac {} action mirred egress redirect dev {}",
            a.tc_dev,
            mac(i),
            a.tc_peer
        )?;
    }
    file.flush()?;
    drop(file);
    let started = Instant::now();
    let status = std::process::Command::new(&a.tc).arg("-batch").arg(&batch).status().context("running tc -batch")?;
    let tc = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("tc -batch failed: {status}");
    }

    let writes_before = switch.writes();
    let started = Instant::now();
    let again = sync(&switch, &a.dev, &rules, false)?;
    let noop = started.elapsed().as_secs_f64();
    let links = switch.links()?;
    let unchanged = plan(&switch, &links, &a.dev, &rules, false)?.unchanged;
    let installed = switch.rules(&links, &a.dev)?.len();
    if again != 0 || switch.writes() != writes_before || unchanged != rules.len() || installed != rules.len() {
        bail!(
            "the unchanged pass wrote {again} times; {unchanged} of {} unchanged, {installed} installed",
            rules.len()
        );
    }
    let rate = |s: f64| f64::from(a.rules) / s.max(1e-9);
    println!("bench: | operation | rules | writes | seconds | rules/s |");
    println!("bench: |---|---|---|---|---|");
    println!("bench: | install, agent netlink backend | {} | {writes} | {agent:.2} | {:.0} |", a.rules, rate(agent));
    println!("bench: | install, tc -batch (iproute2) | {} | {} | {tc:.2} | {:.0} |", a.rules, a.rules + 1, rate(tc));
    println!(
        "bench: | reconcile, nothing changed (dump + compare) | {} | 0 | {noop:.2} | {:.0} |",
        a.rules,
        rate(noop)
    );
    println!("bench: install time ratio tc -batch / agent = {:.2}", tc / agent.max(1e-9));
    Ok(())
}
