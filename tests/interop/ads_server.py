#!/usr/bin/env python3
"""A minimal ADS control plane built on Python grpcio, for tests/interop.rs.

It answers each stream (SotW or Delta) with fixed response messages, as raw bytes: the agent
must relay what a non-Rust control plane sends, byte for byte, including fields it does not
know and field orders other encoders use.

    ads_server.py --responses FILE

FILE holds one response message per line, in hex. The server listens on 127.0.0.1 (a free
port, printed on stdout as the first line), and on every stream waits for the first request,
sends every response, then keeps the stream open until the client ends it.
"""

import argparse
import sys
from concurrent import futures

import grpc

SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
METHODS = {SERVICE + "StreamAggregatedResources", SERVICE + "DeltaAggregatedResources"}


class Ads(grpc.GenericRpcHandler):
    def __init__(self, responses):
        self.responses = responses

    def service(self, details):
        if details.method not in METHODS:
            return None
        # No (de)serializers: messages cross as bytes.
        return grpc.stream_stream_rpc_method_handler(self.stream)

    def stream(self, requests, context):
        next(requests, None)
        yield from self.responses
        for _ in requests:
            pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--responses", required=True)
    args = p.parse_args()
    with open(args.responses) as f:
        responses = [bytes.fromhex(line) for line in f.read().split()]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_send_message_length", -1),
                 ("grpc.max_receive_message_length", -1)],
    )
    server.add_generic_rpc_handlers((Ads(responses),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    sys.exit(main())
