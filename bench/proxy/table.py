#!/usr/bin/env python3
"""Prints the Markdown table of bench/proxy.sh from its work directory.

    table.py WORKDIR SECONDS IDLE_CONNECTIONS ROUNDS
"""
import json
import re
import statistics
import sys
from pathlib import Path


def wrk_rps(path: Path) -> float:
    text = path.read_text()
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not m:
        sys.exit(f"table.py: no Requests/sec in {path}:\n{text}")
    errors = re.search(r"^\s+Non-2xx or 3xx responses: (\d+)", text, re.M)
    if errors:
        sys.exit(f"table.py: {path} has {errors.group(1)} non-2xx responses")
    return float(m.group(1))


def oha(path: Path) -> dict:
    d = json.loads(path.read_text())
    codes = d.get("statusCodeDistribution", {})
    bad = {k: v for k, v in codes.items() if k != "200"}
    # Requests still in flight when -z ends are counted as "aborted due to deadline": not failures.
    errors = {k: v for k, v in d.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
    if bad or errors:
        sys.exit(f"table.py: {path}: status codes {codes}, errors {errors}")
    return {
        "p50_us": d["latencyPercentiles"]["p50"] * 1e6,
        "p99_us": d["latencyPercentiles"]["p99"] * 1e6,
        "rps": d["summary"]["requestsPerSec"],
        "seconds": d["summary"]["total"],
    }


def main() -> None:
    work, seconds, idle_n, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ours = ("dpu", "dpu-off", "dpu-always")
    proxies = ours + ("envoy",)
    # Fixed-rate runs per target, one per round.
    lat = {t: [oha(work / f"oha-{t}-{k}.json") for k in range(1, rounds + 1)] for t in ("direct",) + proxies}
    r = {}
    for t in ("direct",) + proxies:
        r[t] = {
            "max_rps": wrk_rps(work / f"wrk-{t}.txt"),
            "p50_us": statistics.median(run["p50_us"] for run in lat[t]),
            "p99_us": statistics.median(run["p99_us"] for run in lat[t]),
            "rps": statistics.mean(run["rps"] for run in lat[t]),
        }
    for t in proxies:
        before, after, hz = (int(x) for x in (work / f"cpu-wrk-{t}.txt").read_text().split())
        wrk_cpu_s = (after - before) / hz
        r[t]["wrk_cpu_share"] = 100 * wrk_cpu_s / seconds
        r[t]["rps_per_cpu_s"] = r[t]["max_rps"] * seconds / wrk_cpu_s if wrk_cpu_s > 0 else 0.0
        cpu_ms = 0.0
        for k in range(1, rounds + 1):
            before, after, hz = (int(x) for x in (work / f"cpu-{t}-{k}.txt").read_text().split())
            cpu_ms += (after - before) * 1000 / hz
        cpu_ms_per_s = cpu_ms / sum(run["seconds"] for run in lat[t])
        r[t]["cpu_per_krps"] = cpu_ms_per_s / (r[t]["rps"] / 1000)
        idle, loaded = (int(x) for x in (work / f"rss-{t}.txt").read_text().split())
        r[t]["rss_idle_mib"] = idle / 1024
        r[t]["rss_loaded_mib"] = loaded / 1024
        # Added latency: against the direct run of the same round, then the median over rounds.
        for q in ("p50", "p99"):
            added = [run[f"{q}_us"] - direct[f"{q}_us"] for run, direct in zip(lat[t], lat["direct"])]
            r[t][f"add_{q}_rounds"] = added
            r[t][f"add_{q}"] = statistics.median(added)

    e = r["envoy"]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×" if b > 0 else "n/a"

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    # (label, key, format, target: None or (bound, "≥"/"≤"))
    rows = [
        ("max RPS (wrk -t1 -c64)", "max_rps", "{:,.0f}", (1.3, "≥")),
        ("proxy CPU during the wrk run (% of one CPU)", "wrk_cpu_share", "{:.0f}", None),
        ("requests per proxy CPU-second (wrk run)", "rps_per_cpu_s", "{:,.0f}", None),
        ("added p50 latency at 1000 rps (µs)", "add_p50", "{:.0f}", None),
        ("added p99 latency at 1000 rps (µs)", "add_p99", "{:.0f}", (0.5, "≤")),
        (f"RSS with {idle_n:,} idle connections (MiB)", "rss_loaded_mib", "{:.1f}", (0.5, "≤")),
        ("RSS before them, idle (MiB)", "rss_idle_mib", "{:.1f}", None),
        ("CPU per 1000 rps (CPU-ms/s)", "cpu_per_krps", "{:.0f}", None),
    ]

    def cell(t: str, key: str, target) -> str:
        text = ratio(r[t][key], e[key])
        if target is None:
            return text
        bound, sense = target
        ok = r[t][key] >= bound * e[key] if sense == "≥" else e[key] > 0 and r[t][key] <= bound * e[key]
        return f"{text} (target {sense} {bound}×: {verdict(ok)})"

    print(f"Targets: RPS ≥ 1.3× Envoy, added p99 ≤ 0.5× Envoy's, RSS at {idle_n // 1000}k ≤ 0.5× Envoy's. "
          f"{seconds} s per load run; latency rows: median of {rounds} rounds. dpu-agent three times: defaults (--poll in_flight), --poll off and "
          f"--poll always (window 1 ms).\n")
    print("| | dpu-agent | poll off | poll always | Envoy | ratio | ratio, off | ratio, always |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, key, fmt, target in rows:
        values = [fmt.format(r[t][key]) for t in proxies]
        print("| " + " | ".join([label, *values, *(cell(t, key, target) for t in ours)]) + " |")
    medians = [f"{r[t]['p50_us']:.0f} / {r[t]['p99_us']:.0f}" for t in proxies]
    print("| " + " | ".join(["p50 / p99 latency at 1000 rps (µs)", *medians, "", "", ""]) + " |")
    per_round = "; ".join(
        f"{t} " + " ".join(ratio(a, b) for a, b in zip(r[t]["add_p99_rounds"], e["add_p99_rounds"])) for t in ours
    )
    print(f"\nAdded p99 against Envoy's, round by round: {per_round}.")
    dr = r["direct"]
    direct_p99 = " ".join(f"{run['p99_us']:.0f}" for run in lat["direct"])
    print(f"nginx directly: {dr['max_rps']:,.0f} RPS max; at 1000 rps p50 {dr['p50_us']:.0f} µs, "
          f"p99 {dr['p99_us']:.0f} µs (rounds: {direct_p99}). Fixed-rate runs achieved "
          + ", ".join(f"{t} {r[t]['rps']:.0f} rps" for t in ("direct",) + proxies) + ".")


if __name__ == "__main__":
    main()
