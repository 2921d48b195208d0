#!/usr/bin/env python3
"""A minimal ADS client built on Python grpcio, for tests/interop.rs.

Why it exists: Envoy is not the only client of the agent's Unix socket. gRPC clients built on
grpc C-core (grpcio here) send the socket path, percent-encoded, as the HTTP/2 `:authority`, and
grpc-java sends the raw path (reproduced with --authority). Stock h2 refuses both; the patched h2
in vendor/h2 accepts them. This client proves, with a real non-Rust gRPC stack, that requests
and responses cross the agent over the socket unchanged.

No generated stubs: messages are raw bytes, given and printed as hex, one message per line.

    ads_client.py --target unix:/path [--authority VALUE] --method sotw|delta --count N

Reads request messages (hex lines) from stdin until EOF, sends them all and keeps the stream
open (no half-close) until N responses have been printed (hex lines on stdout), then exits 0.
Exit 3: the RPC failed (status code name and details on stderr). Exit 4: no N responses in 15 s.
"""

import argparse
import os
import sys
import threading

import grpc

SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
METHODS = {
    "sotw": SERVICE + "StreamAggregatedResources",
    "delta": SERVICE + "DeltaAggregatedResources",
}
TIMEOUT_S = 15


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="gRPC target, e.g. unix:/tmp/x/XDS")
    p.add_argument("--authority", help="sets grpc.default_authority (e.g. the raw socket path)")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--count", required=True, type=int, help="responses to wait for")
    args = p.parse_args()

    requests = [bytes.fromhex(line) for line in sys.stdin.read().split()]

    def give_up():
        print(f"timed out after {TIMEOUT_S} s waiting for {args.count} responses",
              file=sys.stderr, flush=True)
        os._exit(4)

    watchdog = threading.Timer(TIMEOUT_S, give_up)
    watchdog.daemon = True
    watchdog.start()

    options = [("grpc.max_receive_message_length", -1)]
    if args.authority is not None:
        options.append(("grpc.default_authority", args.authority))
    channel = grpc.insecure_channel(args.target, options=options)
    rpc = channel.stream_stream(
        METHODS[args.method], request_serializer=None, response_deserializer=None
    )

    done = threading.Event()

    def request_iterator():
        yield from requests
        done.wait()  # ending the iterator would half-close the stream: not before we are done

    call = rpc(request_iterator())
    received = 0
    try:
        if args.count > 0:
            for response in call:
                print(response.hex(), flush=True)
                received += 1
                if received == args.count:
                    break
    except grpc.RpcError as e:
        print(f"rpc error: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
        return 3
    finally:
        done.set()
        call.cancel()
        channel.close()
    if received < args.count:
        print(f"stream ended with OK after {received} of {args.count} responses",
              file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
