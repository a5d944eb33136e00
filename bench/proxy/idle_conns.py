#!/usr/bin/env python3
"""Opens N HTTP/1.1 keep-alive connections to HOST:PORT, sends one GET on each and reads its response, then holds
them all open and idle until stdin closes (or SIGTERM). Prints `holding N` once every connection is open.

    idle_conns.py --port P [--host 127.0.0.1] [-n 10000] [--path /] [--parallel 200]

Raise `ulimit -n` above N first. Exits 1 naming the first failure if any connection cannot be opened or its
response is not 200.
"""
import argparse
import asyncio
import sys


async def one(host: str, port: int, path: str, gate: asyncio.Semaphore, held: list) -> None:
    async with gate:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench.test\r\nConnection: keep-alive\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if b" 200 " not in status + b" ":
            raise RuntimeError(f"response {status!r}")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        held.append(writer)


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--path", default="/")
    p.add_argument("--parallel", type=int, default=200)
    a = p.parse_args()
    gate = asyncio.Semaphore(a.parallel)
    held: list = []
    results = await asyncio.gather(*(one(a.host, a.port, a.path, gate, held) for _ in range(a.n)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        print(f"{len(errors)} of {a.n} connections failed; first: {errors[0]!r}", file=sys.stderr, flush=True)
        return 1
    print(f"holding {len(held)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for w in held:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
