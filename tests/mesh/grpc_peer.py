#!/usr/bin/env python3
"""A gRPC peer for the mesh interop test, built on grpcio's generic handlers (no generated stubs): messages are
raw bytes.

    grpc_peer.py serve --port P          serves mesh.test.Echo: Unary (echoes), Fail (NOT_FOUND), Slow (2 s)
    grpc_peer.py check --addr HOST:PORT  calls the three methods through ADDR; prints PASS/FAIL per check and
                                         exits 1 if any failed
"""
import argparse
import sys
import time
from concurrent import futures

import grpc

SERVICE = "mesh.test.Echo"
FAIL_DETAILS = "no such thing"
SLOW_SECONDS = 2.0


def serve(port: int) -> None:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-served-by", "grpc-peer"),))
        return request

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, FAIL_DETAILS)

    def slow(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(SLOW_SECONDS)
        return request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"grpc peer serving on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def check(addr: str) -> int:
    failures = 0

    def report(ok: bool, name: str, detail: str) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        print(f"{'PASS' if ok else 'FAIL'}: grpc {name}: {detail}", flush=True)

    with grpc.insecure_channel(addr) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        call = lambda method: channel.unary_unary(f"/{SERVICE}/{method}")  # noqa: E731 - bytes in, bytes out

        try:
            reply, state = call("Unary").with_call(b"ping through the mesh", timeout=5)
            trailers = dict(state.trailing_metadata() or ())
            report(
                reply == b"ping through the mesh" and trailers.get("x-served-by") == "grpc-peer",
                "unary",
                f"reply {reply!r}, trailers {trailers}",
            )
        except grpc.RpcError as e:
            report(False, "unary", f"{e.code()} {e.details()}")

        try:
            reply = call("Fail")(b"", timeout=5)
            report(False, "status error kept", f"expected NOT_FOUND, got a reply {reply!r}")
        except grpc.RpcError as e:
            report(
                e.code() == grpc.StatusCode.NOT_FOUND and e.details() == FAIL_DETAILS,
                "status error kept",
                f"{e.code()} {e.details()!r}",
            )

        start = time.monotonic()
        try:
            reply = call("Slow")(b"", timeout=0.5)
            report(False, "deadline", f"expected DEADLINE_EXCEEDED, got a reply {reply!r}")
        except grpc.RpcError as e:
            elapsed = time.monotonic() - start
            report(
                e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < SLOW_SECONDS,
                "deadline",
                f"{e.code()} {e.details()!r} after {elapsed:.2f} s (grpc-timeout 500m, server takes {SLOW_SECONDS} s)",
            )
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("check")
    c.add_argument("--addr", required=True)
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.port)
        return 0
    return check(a.addr)


if __name__ == "__main__":
    sys.exit(main())
