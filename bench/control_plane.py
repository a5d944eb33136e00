"""Control-plane benchmark: start → serving, idle RSS, binary size; dpu-agent beside a reference gRPC server.

The reference peer is a Python grpcio server offering the same health + reflection services, started and
measured the same way in the same run. Prints a Markdown table.

usage: control_plane.py --agent PATH --aarch64-agent PATH --aarch64-dpuctl PATH [--runs N]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REFERENCE_SERVER = r"""
import sys, time
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
h = health.HealthServicer()
h.set("", health_pb2.HealthCheckResponse.SERVING)
health_pb2_grpc.add_HealthServicer_to_server(h, server)
reflection.enable_server_reflection([health.SERVICE_NAME, reflection.SERVICE_NAME], server)
server.add_insecure_port(sys.argv[1])
server.start()
server.wait_for_termination()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(port, deadline):
    """Polls until a Health.Check answers SERVING; returns the time it did."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.05):
                pass
        except OSError:
            time.sleep(0.0005)
            continue
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic()
    raise TimeoutError("not serving")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(start_cmd, runs):
    """Returns (start→serving samples in ms, idle RSS in MiB after 100 health checks)."""
    samples, rss = [], []
    for _ in range(runs):
        port = free_port()
        with tempfile.TemporaryDirectory() as data:
            t0 = time.monotonic()
            proc = subprocess.Popen(start_cmd(port, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                t1 = wait_serving(port, t0 + 10)
                samples.append((t1 - t0) * 1000)
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    for _ in range(100):
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                time.sleep(0.5)
                rss.append(rss_kib(proc.pid) / 1024)
            finally:
                proc.terminate()
                proc.wait()
    return samples, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True)
    ap.add_argument("--aarch64-agent", required=True)
    ap.add_argument("--aarch64-dpuctl", required=True)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()

    agent = lambda port, data: [args.agent, "--listen", f"127.0.0.1:{port}", "--data-dir", data,
                                "--admin-listen", "127.0.0.1:0", "--log-format", "json"]
    reference = lambda port, data: [sys.executable, "-c", REFERENCE_SERVER, f"127.0.0.1:{port}"]

    rows = []
    for name, cmd in (("dpu-agent", agent), ("python grpcio (reference)", reference)):
        samples, rss = measure(cmd, args.runs)
        q = statistics.quantiles(samples, n=10)
        rows.append((name, statistics.median(samples), q[-1], statistics.median(rss)))

    print(f"runs per server: {args.runs}; start→serving = exec until the first Health.Check answers SERVING\n")
    print("| server | start→serving p50 (ms) | p90 (ms) | idle RSS (MiB) |")
    print("|---|---:|---:|---:|")
    for name, p50, p90, rss in rows:
        print(f"| {name} | {p50:.1f} | {p90:.1f} | {rss:.1f} |")
    print()
    print("| binary | bytes | MiB |")
    print("|---|---:|---:|")
    for label, path in (("dpu-agent aarch64 musl static (release)", args.aarch64_agent),
                        ("dpuctl aarch64 musl static (release)", args.aarch64_dpuctl),
                        ("dpu-agent x86_64 gnu (release)", args.agent)):
        size = os.path.getsize(path)
        print(f"| {label} | {size} | {size / 2**20:.2f} |")


if __name__ == "__main__":
    main()
