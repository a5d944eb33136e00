"""A watch client in Python grpcio (descriptors from server reflection only) against dpu-agent's WatchEvents.

It opens a stream filtered to volumes, creates volumes through StorageService, drops the stream mid-way, changes
intent while disconnected and resumes with the last cursor: nothing may be missed or repeated. With --upgrade-pid
it then sends SIGHUP to the agent (it hands over to a new process of itself) while the stream is open: the stream
must end with a bookmark or a status, the client reconnects with its cursor to the new process and goes on without
being told to relist. A malformed cursor must be INVALID_ARGUMENT. Exit 0 when every check holds.
"""

import argparse
import os
import queue
import signal
import sys
import threading
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

AGENT = "dpu.v1.AgentService"
STORAGE = "dpu.v1.StorageService"


class Api:
    def __init__(self, addr):
        self.channel = grpc.insecure_channel(addr)
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(self.channel))
        self.types = self.pool.FindEnumTypeByName("dpu.v1.WatchEventType")

    def method(self, service, name):
        desc = self.pool.FindServiceByName(service).FindMethodByName(name)
        return desc, message_factory.GetMessageClass(desc.input_type), message_factory.GetMessageClass(desc.output_type)

    def unary(self, service, method, **fields):
        _, request, response = self.method(service, method)
        call = self.channel.unary_unary(
            f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString)
        return call(request(**fields), timeout=10)

    def create_volume(self, vid):
        _, request, _ = self.method(STORAGE, "CreateVolume")
        volume_class = message_factory.GetMessageClass(self.pool.FindMessageTypeByName("dpu.v1.Volume"))
        volume = volume_class(size_bytes=1 << 20)
        volume.malloc.SetInParent()
        for attempt in range(50):
            try:
                return self.unary(STORAGE, "CreateVolume", volume_id=vid, volume=volume)
            except grpc.RpcError as err:
                # During a hand-over the old process refuses writes with UNAVAILABLE: retry, as the API says.
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == 49:
                    raise
                time.sleep(0.1)

    def delete_volume(self, vid):
        return self.unary(STORAGE, "DeleteVolume", name=f"volumes/{vid}")

    def watch(self, resume_after=""):
        """A running stream: events arrive on .events (None at its end, an RpcError if it failed)."""
        return Stream(self, resume_after)

    def type_name(self, event):
        return self.types.values_by_number[event.type].name.replace("WATCH_EVENT_TYPE_", "")


class Interrupted(AssertionError):
    """A stream that ended before what was awaited: its status code and the events it delivered."""

    def __init__(self, item, seen, message):
        super().__init__(message)
        self.code = item.code() if isinstance(item, grpc.RpcError) else None
        self.seen = seen


class Stream:
    def __init__(self, api, resume_after):
        _, request, response = api.method(AGENT, "WatchEvents")
        call = api.channel.unary_stream(
            f"/{AGENT}/WatchEvents", request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response.FromString)
        self.api = api
        self.call = call(request(kinds=["volumes"], resume_after=resume_after))
        self.events = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        try:
            for event in self.call:
                self.events.put(event)
            self.events.put(None)
        except grpc.RpcError as err:
            self.events.put(err)

    def next(self, timeout=10):
        item = self.events.get(timeout=timeout)
        if isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.CANCELLED:
            return None
        return item

    def until(self, predicate, what, timeout=15):
        """Events up to and including the first that satisfies predicate."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            item = self.next(timeout=max(0.1, deadline - time.monotonic()))
            if item is None or isinstance(item, grpc.RpcError):
                raise Interrupted(item, seen, f"stream ended ({item}) before {what}; saw {describe(self.api, seen)}")
            seen.append(item)
            if predicate(item):
                return seen


def describe(api, events):
    return [f"{api.type_name(e)} {e.name} g{e.generation}" for e in events]


def is_(api, kind, name=None):
    return lambda e: api.type_name(e) == kind and (name is None or e.name == name)


def check(condition, message):
    if not condition:
        print(f"FAIL: {message}")
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--upgrade-pid", type=int, help="SIGHUP this agent while a stream is open")
    args = parser.parse_args()
    api = Api(args.addr)

    stream = api.watch()
    opened = stream.next()
    check(api.type_name(opened) == "OPENED" and opened.cursor, f"first message {opened}")
    api.create_volume("wa")
    api.create_volume("wb")
    seen = stream.until(is_(api, "CREATED", "volumes/wb"), "CREATED volumes/wb")
    check(seen[0].name == "volumes/wa" and api.type_name(seen[0]) == "CREATED", f"order: {describe(api, seen)}")
    cursor = seen[-1].cursor
    stream.call.cancel()
    print(f"watch: stream dropped after {describe(api, seen)}; cursor {cursor}")

    # While disconnected: a create and a delete.
    api.create_volume("wc")
    api.delete_volume("wa")
    resumed = api.watch(cursor)
    check(api.type_name(resumed.next()) == "OPENED", "resumed stream opens")
    seen = resumed.until(is_(api, "DELETED", "volumes/wa"), "DELETED volumes/wa")
    changes = [(api.type_name(e), e.name) for e in seen if api.type_name(e) != "STATUS"]
    check(("CREATED", "volumes/wb") not in changes, f"an event before the cursor came again: {changes}")
    check(changes == [("CREATED", "volumes/wc"), ("DELETED", "volumes/wa")], f"missed or extra events: {changes}")
    print(f"watch: resumed without loss or repeats: {changes}")
    cursor = seen[-1].cursor

    if args.upgrade_pid:
        os.kill(args.upgrade_pid, signal.SIGHUP)
        tail = []
        while True:
            item = resumed.next(timeout=60)
            if item is None or isinstance(item, grpc.RpcError):
                print(f"watch: the old agent ended the stream: {getattr(item, 'details', lambda: 'end')()}")
                break
            tail.append(item)
            cursor = item.cursor
        check(all(api.type_name(e) in ("BOOKMARK", "STATUS") for e in tail), f"after SIGHUP: {describe(api, tail)}")
        # Reconnect to whichever process serves now, with the last cursor, as an informer does: a stream refused or
        # ended with UNAVAILABLE (the old process still draining) is resumed after the last cursor seen.
        seen, created, deadline = [], False, time.monotonic() + 60
        while True:
            check(time.monotonic() < deadline, f"no stream from the new process; saw {describe(api, seen)}")
            after = api.watch(cursor)
            try:
                first = after.next()
            except queue.Empty:
                continue
            if isinstance(first, grpc.RpcError) and first.code() == grpc.StatusCode.UNAVAILABLE:
                time.sleep(0.1)
                continue
            check(first is not None and not isinstance(first, grpc.RpcError), f"reconnecting: {first}")
            check(api.type_name(first) == "OPENED", f"reconnected stream starts with {api.type_name(first)}")
            if not created:
                api.create_volume("wd")
                created = True
            try:
                part = after.until(is_(api, "CREATED", "volumes/wd"), "CREATED volumes/wd on the new process")
                seen.extend(part)
                break
            except Interrupted as stop:
                seen.extend(stop.seen)
                cursor = stop.seen[-1].cursor if stop.seen else cursor
                check(stop.code == grpc.StatusCode.UNAVAILABLE, f"stream ended with {stop}")
                print(f"watch: resuming again after {stop.code.name}")
        kinds = {api.type_name(e) for e in seen}
        check("RELIST" not in kinds, f"told to relist across the upgrade: {describe(api, seen)}")
        check(not [e for e in seen if api.type_name(e) in ("CREATED", "DELETED") and e.name != "volumes/wd"],
              f"repeated changes after the upgrade: {describe(api, seen)}")
        print(f"watch: resumed on the new agent process: {describe(api, seen)}")
        after.call.cancel()

    try:
        bad = api.watch("not-a-cursor")
        item = bad.next()
        check(isinstance(item, grpc.RpcError) and item.code() == grpc.StatusCode.INVALID_ARGUMENT,
              f"a malformed cursor: {item}")
    except queue.Empty:
        check(False, "a malformed cursor got no answer")
    print("watch: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
