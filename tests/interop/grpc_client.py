"""An independent gRPC client (Python grpcio, descriptors from server reflection only) run against dpu-agent.

It knows nothing of dpu.v1 ahead of time: it lists the services over reflection, builds the message classes
from the descriptors the server sends, and calls them. Exit 0 when every check holds.
"""

import argparse
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def channel_for(args):
    if not args.ca:
        return grpc.insecure_channel(args.addr)
    read = lambda path: open(path, "rb").read() if path else None
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca), private_key=read(args.key), certificate_chain=read(args.cert)
    )
    return grpc.secure_channel(args.addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])


def unary(channel, pool, service, method, request_fields):
    desc = pool.FindServiceByName(service).FindMethodByName(method)
    request_class = message_factory.GetMessageClass(desc.input_type)
    response_class = message_factory.GetMessageClass(desc.output_type)
    call = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    return call(request_class(**request_fields), timeout=10)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", required=True)
    parser.add_argument("--ca")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--expect-arch")
    parser.add_argument("--expect-refused", action="store_true", help="the connection must fail at TLS")
    parser.add_argument("--expect-viewer", action="store_true", help="mutations must be PERMISSION_DENIED")
    args = parser.parse_args()

    channel = channel_for(args)
    if args.expect_refused:
        try:
            grpc.channel_ready_future(channel).result(timeout=5)
            ProtoReflectionDescriptorDatabase(channel).get_services()
        except (grpc.FutureTimeoutError, grpc.RpcError) as err:
            print(f"refused as expected: {type(err).__name__} {getattr(err, 'code', lambda: '')()}")
            return 0
        print("FAIL: a client without a valid certificate was served")
        return 1

    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    print("services:", " ".join(sorted(services)))
    for wanted in ("dpu.v1.AgentService", "grpc.health.v1.Health"):
        if wanted not in services:
            print(f"FAIL: reflection does not list {wanted}")
            return 1
    pool = descriptor_pool.DescriptorPool(database)

    health = unary(channel, pool, "grpc.health.v1.Health", "Check", {"service": "dpu.v1.AgentService"})
    status = pool.FindEnumTypeByName("grpc.health.v1.HealthCheckResponse.ServingStatus").values_by_number[health.status].name
    print("health:", status)
    if status != "SERVING":
        return 1

    info = unary(channel, pool, "dpu.v1.AgentService", "GetAgentInfo", {})
    print(f"agent: version={info.version} arch={info.target_arch} kernel={info.kernel_release}")
    print("capabilities:", ", ".join(f"{c.name}={c.state}" for c in info.capabilities))
    if args.expect_arch and info.target_arch != args.expect_arch:
        print(f"FAIL: arch {info.target_arch!r}, expected {args.expect_arch!r}")
        return 1
    if len(info.capabilities) < 8:
        print("FAIL: capabilities missing")
        return 1

    try:
        unary(channel, pool, "dpu.v1.AgentService", "UpdateAgentSettings",
              {"settings": {"labels": {"checked-by": "grpcio"}}, "update_mask": {"paths": ["labels"]}})
        denied = False
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.PERMISSION_DENIED:
            print(f"FAIL: UpdateAgentSettings: {err.code()} {err.details()}")
            return 1
        denied = True
    if denied != args.expect_viewer:
        print(f"FAIL: UpdateAgentSettings denied={denied}, expected denied={args.expect_viewer}")
        return 1
    print("update:", "PERMISSION_DENIED" if denied else "accepted")

    try:
        unary(channel, pool, "dpu.v1.AgentService", "UpdateAgentSettings",
              {"settings": {"log_filter": "info,[[["}})
        print("FAIL: an invalid filter was accepted")
        return 1
    except grpc.RpcError as err:
        expected = grpc.StatusCode.PERMISSION_DENIED if args.expect_viewer else grpc.StatusCode.INVALID_ARGUMENT
        if err.code() != expected:
            print(f"FAIL: invalid filter gave {err.code()}, expected {expected}")
            return 1
        print("invalid input:", err.code().name, err.details())
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
