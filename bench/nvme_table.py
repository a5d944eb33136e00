#!/usr/bin/env python3
"""Formats bench/nvme.sh results (one dpu-nvme-perf JSON object per line, plus the label and the agent's CPU
seconds) as a Markdown table. SPDK's target, with SPDK's client, is measured in the same run by
`bench/nvme.sh --engine spdk`."""

import json
import sys


def cell(value, digits=0):
    return "—" if value is None else f"{value:,.{digits}f}"


def main(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print("| workload | IOPS | MiB/s | avg µs | p50 µs | p99 µs | p99.9 µs | agent CPU µs/I/O | agent CPU % "
          "| client CPU % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lat = r["lat_us"]
        agent = r.get("agent_cpu_seconds")
        client = r.get("cpu_seconds")
        per_io = agent * 1e6 / r["ios"] if agent is not None and r["ios"] else None
        print(f"| {r['label']} | {cell(r['iops'])} | {cell(r['mib_s'], 1)} | {cell(lat['avg'], 1)} "
              f"| {cell(lat['p50'], 1)} | {cell(lat['p99'], 1)} | {cell(lat['p99_9'], 1)} | {cell(per_io, 2)} "
              f"| {cell(agent and agent * 100 / r['seconds'])} | {cell(client and client * 100 / r['seconds'])} |")


if __name__ == "__main__":
    main(sys.argv[1])
