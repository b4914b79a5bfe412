"""An independent gRPC peer: Python grpcio calls the demo Echo service through the Tether
gateway's transparent relay, and checks metadata, trailers and status codes.

Messages are encoded by hand (two fields of tether.demo.v1.EchoRequest), so nothing here shares
code with the Rust implementation.

Usage: relay_client.py --target HOST:PORT --ca CA --cert CERT --key KEY --agent TENANT/AGENT
Exit 0 when every check passes; 1 with the failing check otherwise.
"""

import argparse
import sys

import grpc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def echo_request(message, fail_with_code=0):
    body = message.encode()
    msg = b"\x0a" + varint(len(body)) + body
    if fail_with_code:
        msg += b"\x20" + varint(fail_with_code)
    return msg


def read_varint(buf, i):
    """The varint at buf[i:], and the index after it."""
    v, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return v, i


def parse(buf):
    """Decodes length-delimited and varint fields: {field: [values]}."""
    fields, i = {}, 0
    while i < len(buf):
        key, i = read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = read_varint(buf, i)
        elif wire == 2:
            n, i = read_varint(buf, i)
            v = buf[i:i + n]
            i += n
        else:
            raise ValueError(f"unexpected wire type {wire}")
        fields.setdefault(field, []).append(v)
    return fields


ident = lambda b: b  # noqa: E731  (raw bytes in and out)

checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


def main():
    p = argparse.ArgumentParser()
    for a in ("--target", "--ca", "--cert", "--key", "--agent"):
        p.add_argument(a, required=True)
    args = p.parse_args()
    read = lambda path: open(path, "rb").read()  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
    channel = grpc.secure_channel(args.target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
    route = [("tether-agent", args.agent)]

    unary = channel.unary_unary("/tether.demo.v1.Echo/Unary", request_serializer=ident, response_deserializer=ident)
    resp, call = unary.with_call(echo_request("from python"), metadata=route + [("x-py", "1")], timeout=10)
    fields = parse(resp)
    check(fields[1][0] == b"from python", "unary echo message")
    check(b"x-py=1" in fields.get(4, []), f"request metadata seen upstream: {fields.get(4)}")
    check(("x-echo-initial", "yes") in call.initial_metadata(), f"response metadata: {call.initial_metadata()}")
    check(call.code() == grpc.StatusCode.OK, "unary status OK")

    try:
        unary(echo_request("exists already", fail_with_code=6), metadata=route, timeout=10)
        check(False, "failing call must raise")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.ALREADY_EXISTS, f"status code: {e.code()}")
        check(e.details() == "exists already", f"status message: {e.details()}")
        check(("x-echo-trailer", "failed-on-purpose") in e.trailing_metadata(), f"trailers: {e.trailing_metadata()}")

    bidi = channel.stream_stream("/tether.demo.v1.Echo/BidiStream", request_serializer=ident, response_deserializer=ident)
    replies = [parse(r)[1][0] for r in bidi(iter([echo_request(f"b{i}") for i in range(3)]), metadata=route, timeout=10)]
    check(replies == [b"b0", b"b1", b"b2"], f"bidi replies: {replies}")

    try:
        unary(echo_request("x"), metadata=[("tether-agent", "nobody/here")], timeout=10)
        check(False, "unknown agent must raise")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, f"unknown agent: {e.code()}")

    try:
        unary(echo_request("x"), metadata=route + [("tether-service", "billing")], timeout=10)
        check(False, "service outside the allow-list must raise")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.PERMISSION_DENIED, f"not allow-listed: {e.code()}")

    print(f"{checks} passed, 0 failed")


if __name__ == "__main__":
    main()
