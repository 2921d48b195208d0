#!/usr/bin/env python3
"""Control plane and Envoy-side client for scripts/relay-cost.sh (what the agent costs per
relayed MiB of a large, non-ECDS response).

Needs nothing but grpcio: generic handlers / method calls with raw bytes, protobuf encoded
and scanned by hand (no generated classes).

    relay_cost.py server --port-file F --clusters N --max-responses K [--done-file D]
        Listens on 127.0.0.1 (a free port, written to F). On every ADS stream (SotW or Delta)
        the first CDS request gets one pre-encoded response of N clusters; each ACK of the
        latest nonce gets the next, identical but for version/nonce, up to K responses. When the
        K-th response is ACKed, D is created. Logs one line per event on stdout.

    relay_cost.py client --target 127.0.0.1:P --flavor sotw|delta --count K [--wait-file D]
        Opens the stream, sends a CDS request with a node, receives each response whole, ACKs
        it (version + nonce), and after K responses (and their ACKs) waits for D (if given,
        i.e. until the control plane has seen the last ACK), then ends the stream. Prints one
        line: `received K responses B bytes T s` (B counts each gRPC message with its 5-byte
        header).

    relay_cost.py port
        Prints a free 127.0.0.1 TCP port.

    relay_cost.py topdiff --low CG1 --high CG5 --mib M [--top 25]
        Per-function self Ir of callgrind profile CG5 minus CG1 (callgrind_annotate of each):
        where the marginal instructions of M extra relayed MiB go, heaviest first.

    relay_cost.py report --out DIR --low 1 --high 5
        Reads the run directories DIR/<flavor>-k<K>-<mode>-<rep>/ that relay-cost.sh left
        (client.out, cg.*.out, perf.csv, strace.txt) and prints the markdown tables: the
        marginal cost per relayed MiB, (X(K=high) - X(K=low)) / (MiB(high) - MiB(low)), which
        cancels start-up, stream set-up and shutdown, then the raw totals.
"""

import argparse
import os
import queue
import socket
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW = SERVICE + "StreamAggregatedResources"
DELTA = SERVICE + "DeltaAggregatedResources"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
NODE_ID = "sidecar~127.0.0.1~bench.default~default.svc.cluster.local"
NODE_CLUSTER = "bench"
OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]


# ---- protobuf by hand -------------------------------------------------------------------

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


def ld(field, data):
    """A length-delimited field (string, bytes, message)."""
    if isinstance(data, str):
        data = data.encode()
    return varint(field << 3 | 2) + varint(len(data)) + data


def vi(field, n):
    """A varint field."""
    return varint(field << 3) + varint(n)


def fields(buf):
    """Top-level (field, wire type, value) of a message; length-delimited values as memoryview
    slices, so a 15 MB response is scanned without copying its resources."""
    mv = memoryview(buf)
    i, n = 0, len(buf)
    while i < n:
        key, i = read_varint(buf, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 2:
            ln, i = read_varint(buf, i)
            v = mv[i:i + ln]
            i += ln
        elif wt == 1:
            v = mv[i:i + 8]
            i += 8
        elif wt == 5:
            v = mv[i:i + 4]
            i += 4
        else:
            raise ValueError(f"wire type {wt} at {i}")
        yield f, wt, v


def read_varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def strings(buf, wanted):
    """The last value of each wanted string field (protobuf keeps the last)."""
    out = {}
    for f, wt, v in fields(buf):
        if wt == 2 and f in wanted:
            out[f] = bytes(v).decode()
    return out


# ---- the CDS payload --------------------------------------------------------------------

def cluster(i):
    """One deterministic Cluster (~220 B as an Any): STATIC or EDS, connect_timeout 1s, and an inline
    load_assignment of one locality with two endpoints."""
    name = f"cluster-{i:06d}"

    def lb_endpoint(j):
        sock = ld(2, f"10.{(i >> 8) & 255}.{i & 255}.{10 + j}") + vi(3, 8080 + j)  # SocketAddress
        address = ld(1, sock)                                                    # Address
        endpoint = ld(1, address)                                                # Endpoint
        return ld(2, ld(1, endpoint))                     # LocalityLbEndpoints.lb_endpoints[]

    locality = ld(1, ld(1, "us-east-1") + ld(2, f"us-east-1{'abc'[i % 3]}"))  # Locality
    lle = locality + lb_endpoint(0) + lb_endpoint(1)
    cla = ld(1, name) + ld(2, lle)                       # ClusterLoadAssignment
    kind = 3 if i % 2 else 0                             # EDS / STATIC
    body = ld(1, name)
    if kind:
        body += vi(2, kind)
    body += ld(4, vi(1, 1))                              # connect_timeout {seconds: 1}
    body += ld(28, f"outbound|8080||{name}.bench.svc")  # alt_stat_name
    body += ld(33, cla)
    return name, ld(1, CDS) + ld(2, body)                # Any


def payload(n, delta):
    """The resources part (field 2, repeated) of the response, encoded once."""
    parts = []
    for i in range(n):
        name, any_ = cluster(i)
        if delta:
            parts.append(ld(2, ld(1, "1") + ld(2, any_) + ld(3, name)))  # Resource
        else:
            parts.append(ld(2, any_))
    return b"".join(parts)


# ---- control plane ----------------------------------------------------------------------

def log(*a):
    print(*a, flush=True)


class ControlPlane(grpc.GenericRpcHandler):
    def __init__(self, n, max_responses, done_file):
        t = time.monotonic()
        self.bodies = {SOTW: payload(n, False), DELTA: payload(n, True)}
        self.max = max_responses
        self.done_file = done_file
        self.streams = 0
        self.lock = threading.Lock()
        log(f"encoded {n} clusters: sotw {len(self.bodies[SOTW])} B, "
            f"delta {len(self.bodies[DELTA])} B in {time.monotonic() - t:.2f} s")

    def service(self, details):
        if details.method not in self.bodies:
            return None
        method = details.method
        return grpc.stream_stream_rpc_method_handler(
            lambda reqs, ctx: self.stream(method, reqs, ctx))

    def stream(self, method, requests, context):
        with self.lock:
            self.streams += 1
            sid = self.streams
        delta = method == DELTA
        # DeltaDiscoveryRequest: type_url=2, response_nonce=6; DiscoveryRequest: 4, 5.
        f_type, f_nonce = (2, 6) if delta else (4, 5)
        body = self.bodies[method]
        sent = 0
        last = ""
        log(f"stream {sid} {'delta' if delta else 'sotw'} opened")
        for req in requests:
            s = strings(req, {f_type, f_nonce})
            type_url, nonce = s.get(f_type, ""), s.get(f_nonce, "")
            if type_url != CDS:
                log(f"stream {sid}: ignored request for {type_url!r}")
                continue
            if nonce != last:
                log(f"stream {sid}: ignored CDS request with stale nonce {nonce!r}")
                continue
            if sent:
                log(f"stream {sid}: ack {nonce}")
            if sent == self.max:
                if self.done_file:
                    open(self.done_file, "w").close()
                continue
            sent += 1
            last = f"n{sent}"
            # version_info / system_version_info=1, type_url=4, nonce=5: after the resources,
            # where encoders write them (the agent's early look relies on nothing else).
            msg = body + ld(1, f"v{sent}") + ld(4, CDS) + ld(5, last)
            log(f"stream {sid}: sent response {sent} ({len(msg)} B) nonce {last}")
            yield msg
        log(f"stream {sid} closed after {sent} responses")


def serve(args):
    cp = ControlPlane(args.clusters, args.max_responses, args.done_file)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=OPTIONS)
    server.add_generic_rpc_handlers((cp,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.rename(tmp, args.port_file)
    log(f"listening on 127.0.0.1:{port}")
    server.wait_for_termination()


# ---- Envoy-side client ------------------------------------------------------------------

def client(args):
    delta = args.flavor == "delta"
    node = ld(1, NODE_ID) + ld(2, NODE_CLUSTER)
    if delta:
        first = ld(1, node) + ld(2, CDS)                 # DeltaDiscoveryRequest, wildcard

        def ack(version, nonce):
            return ld(2, CDS) + ld(6, nonce)
    else:
        first = ld(2, node) + ld(4, CDS)                 # DiscoveryRequest, wildcard

        def ack(version, nonce):
            return ld(1, version) + ld(4, CDS) + ld(5, nonce)

    def give_up():
        print(f"client: timed out after {args.timeout} s", file=sys.stderr, flush=True)
        os._exit(4)

    watchdog = threading.Timer(args.timeout, give_up)
    watchdog.daemon = True
    watchdog.start()

    channel = grpc.insecure_channel(args.target, options=OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=args.timeout)
    rpc = channel.stream_stream(DELTA if delta else SOTW,
                                request_serializer=None, response_deserializer=None)
    q = queue.Queue()
    q.put(first)

    def request_iterator():
        while True:
            r = q.get()
            if r is None:
                # Never return: ending the iterator would half-close the stream.
                threading.Event().wait()
            yield r

    start = time.monotonic()
    call = rpc(request_iterator())
    received = total = 0
    try:
        for resp in call:
            received += 1
            total += len(resp) + 5
            s = strings(resp, {1, 5})
            q.put(ack(s.get(1, ""), s.get(5, "")))
            if received == args.count:
                break
    except grpc.RpcError as e:
        print(f"client: rpc error: {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
        return 3
    elapsed = time.monotonic() - start
    if args.wait_file:
        while not os.path.exists(args.wait_file):
            time.sleep(0.02)
    call.cancel()
    channel.close()
    print(f"received {received} responses {total} bytes {elapsed:.3f} s", flush=True)
    return 0


# ---- report -----------------------------------------------------------------------------

MIB = 1 << 20
# perf tracepoints shown one by one (per MiB) besides the raw_syscalls total.
BREAKDOWN = ["read", "recvfrom", "readv", "recvmsg", "write", "writev", "sendto", "sendmsg",
             "epoll_wait", "epoll_pwait", "epoll_pwait2", "futex", "sched_yield", "mmap",
             "munmap", "madvise", "mremap", "brk"]


def parse_run(d):
    """What one run directory holds: bytes relayed, Ir, perf counts, strace sizes."""
    r = {}
    try:
        words = open(os.path.join(d, "client.out")).read().split()
        r["responses"], r["bytes"], r["wall"] = int(words[1]), int(words[3]), float(words[5])
    except (OSError, IndexError, ValueError):
        return None
    for name in sorted(os.listdir(d)):
        if name.startswith("cg.") and name.endswith(".out"):
            for line in open(os.path.join(d, name)):
                if line.startswith(("totals:", "summary:")):
                    r["ir"] = int(line.split()[1])
    perf = os.path.join(d, "perf.csv")
    if os.path.exists(perf):
        for line in open(perf):
            parts = line.strip().split(",")
            if len(parts) < 3 or line.startswith("#"):
                continue
            try:
                v = float(parts[0])
            except ValueError:
                continue
            ev = parts[2]
            if ev == "task-clock":
                r["task_ms"] = v
            elif ev == "raw_syscalls:sys_enter":
                r["syscalls"] = v
            elif ev.startswith("syscalls:sys_enter_"):
                r["sc_" + ev[len("syscalls:sys_enter_"):]] = v
    st = os.path.join(d, "strace.txt")
    if os.path.exists(st):
        r["strace"] = parse_strace(st, os.path.join(d, "ports"))
    return r


def parse_strace(path, ports_file):
    """Per (peer, syscall): calls and bytes, from `strace -f -yy` of the agent. Peer is
    'envoy' (the listen port), 'upstream' (the control plane) or 'other'."""
    import re
    ports = dict(line.split() for line in open(ports_file))
    listen, up = ports["listen"], ports["upstream"]
    call_re = re.compile(r"^(\d+)\s+(\w+)\((\d+)<((?:TCP|TCPv6|UNIX)?:?\[[^\]]*\]|[^>]*)>")
    ret = r"\)\s+=\s+(-?\d+)(?: [A-Z]+ \(.*\))?\s*$"   # `) = 42` or `) = -1 EAGAIN (...)`
    resumed_re = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>.*" + ret)
    done_re = re.compile(ret)
    pending = {}
    out = {}

    def peer(fdinfo):
        if f"127.0.0.1:{listen}->" in fdinfo:
            return "envoy"
        if f"->127.0.0.1:{up}]" in fdinfo:
            return "upstream"
        return "other"

    def add(p, call, ret):
        e = out.setdefault((p, call), [0, 0, 0])   # calls, bytes, EAGAIN/errors
        e[0] += 1
        if ret >= 0:
            e[1] += ret
        else:
            e[2] += 1

    for line in open(path):
        m = call_re.match(line)
        if m:
            pid, call, _fd, info = m.groups()
            if "<unfinished ...>" in line:
                pending[pid] = (call, peer(info))
                continue
            d = done_re.search(line)
            if d:
                add(peer(info), call, int(d.group(1)))
            continue
        m = resumed_re.match(line)
        if m and m.group(1) in pending:
            call, p = pending.pop(m.group(1))
            add(p, call, int(m.group(3)))
    return out


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def report(args):
    runs = {}
    for name in sorted(os.listdir(args.out)):
        parts = name.split("-")
        if len(parts) != 4 or not parts[1].startswith("k"):
            continue
        flavor, k, mode, _rep = parts[0], int(parts[1][1:]), parts[2], parts[3]
        r = parse_run(os.path.join(args.out, name))
        if r is not None:
            runs.setdefault((flavor, k, mode), []).append(r)

    def med(flavor, k, mode, key):
        vals = [r[key] for r in runs.get((flavor, k, mode), []) if key in r]
        return median(vals) if vals else None

    def fmt(v, digits=0):
        if v is None:
            return "n/a"
        return f"{v:,.{digits}f}"

    flavors = [f for f in ("sotw", "delta") if any(key[0] == f for key in runs)]
    label = {"sotw": "SotW ADS", "delta": "Delta ADS"}
    lo, hi = args.low, args.high
    print(f"Marginal cost per relayed MiB: (K={hi}) - (K={lo}) responses on one stream "
          f"(start-up, stream set-up and shutdown cancel out); medians of "
          f"{max((len(v) for v in runs.values()), default=0)} run(s).\n")
    print("| case | MiB relayed | instructions/MiB | syscalls/MiB | task-clock ms/MiB |")
    print("|---|---:|---:|---:|---:|")
    extra = []
    for f in flavors:
        def diff(mode, key):
            a, b = med(f, hi, mode, key), med(f, lo, mode, key)
            ba, bb = med(f, hi, mode, "bytes"), med(f, lo, mode, "bytes")
            if None in (a, b, ba, bb) or ba == bb:
                return None, None
            return (a - b) / ((ba - bb) / MIB), (ba - bb) / MIB
        ir, mib_cg = diff("callgrind", "ir")
        sc, mib_pf = diff("perf", "syscalls")
        tc, _ = diff("perf", "task_ms")
        mib = mib_cg if mib_cg is not None else mib_pf
        print(f"| {label[f]} (K={hi} - K={lo}) | {fmt(mib, 1)} | {fmt(ir)} | {fmt(sc, 1)} | "
              f"{fmt(tc, 2)} |")
        per = []
        for call in BREAKDOWN:
            v, _ = diff("perf", "sc_" + call)
            if v is not None and abs(v) >= 0.05:
                per.append(f"{call} {v:.1f}")
        extra.append(f"- {label[f]} syscalls/MiB by kind (perf tracepoints): "
                     + (", ".join(per) if per else "n/a"))
    print()
    print("\n".join(extra))

    print("\nRaw totals (whole agent process; callgrind runs from exec to exit, perf attached "
          "after /healthz/ready until the client is done):\n")
    print("| run | responses | MiB relayed | Ir (callgrind) | syscalls | task-clock ms | "
          "client wall s (native) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for f in flavors:
        for k in sorted({key[1] for key in runs if key[0] == f}):
            b = med(f, k, "perf", "bytes") or med(f, k, "callgrind", "bytes")
            print(f"| {label[f]} K={k} | {k} | {fmt(b / MIB if b else None, 1)} | "
                  f"{fmt(med(f, k, 'callgrind', 'ir'))} | {fmt(med(f, k, 'perf', 'syscalls'))} | "
                  f"{fmt(med(f, k, 'perf', 'task_ms'), 1)} | {fmt(med(f, k, 'perf', 'wall'), 3)} |")

    lines = []
    for f in flavors:
        for r in runs.get((f, hi, "strace"), [])[:1]:
            mib = r["bytes"] / MIB
            parts = []
            for (p, call), (n, nbytes, errs) in sorted(r["strace"].items()):
                ok = n - errs
                avg = nbytes / ok if ok else 0
                parts.append(f"{p} {call} {n / mib:.1f}/MiB avg {avg:,.0f} B"
                             + (f" ({errs} failed)" if errs else ""))
            lines.append(f"- {label[f]} K={hi}, {mib:.1f} MiB: " + "; ".join(parts))
    if lines:
        print("\nSocket I/O sizes (separate native run under strace -f -yy, K="
              f"{hi}; 'envoy' = the listen socket, 'upstream' = the control plane, 'other' = eventfd wakers etc.; "
              "calls per MiB relayed and average bytes per successful call):\n")
        print("\n".join(lines))


def annotate(path, inclusive=False):
    """{function: Ir} from callgrind_annotate (every function, no threshold)."""
    import re
    import subprocess
    text = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", "--threshold=100",
         path], check=True, capture_output=True, text=True).stdout
    line_re = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.*\S)\s*$")
    out = {}
    for line in text.splitlines():
        m = line_re.match(line)
        if m and "PROGRAM TOTALS" not in m.group(2):
            fn = m.group(2)
            out[fn] = out.get(fn, 0) + int(m.group(1).replace(",", ""))
    return out


def topdiff(args):
    lo, hi = annotate(args.low), annotate(args.high)
    diff = {fn: hi.get(fn, 0) - lo.get(fn, 0) for fn in set(lo) | set(hi)}
    total = sum(diff.values())
    print(f"Marginal self Ir, K=high minus K=low profile: {total:,} Ir for {args.mib:.1f} MiB "
          f"= {total / args.mib:,.0f} Ir/MiB")
    print(f"{'Ir/MiB':>12} {'share':>7}  function")
    for fn, v in sorted(diff.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{v / args.mib:>12,.0f} {100 * v / total:>6.1f}%  {fn}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port-file", required=True)
    s.add_argument("--clusters", type=int, default=68000)
    s.add_argument("--max-responses", type=int, default=5)
    s.add_argument("--done-file")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--flavor", required=True, choices=["sotw", "delta"])
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--wait-file")
    c.add_argument("--timeout", type=float, default=120)
    sub.add_parser("port")
    t = sub.add_parser("topdiff")
    t.add_argument("--low", required=True)
    t.add_argument("--high", required=True)
    t.add_argument("--mib", type=float, required=True)
    t.add_argument("--top", type=int, default=25)
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--low", type=int, default=1)
    r.add_argument("--high", type=int, default=5)
    args = p.parse_args()
    if args.cmd == "server":
        serve(args)
    elif args.cmd == "client":
        sys.exit(client(args))
    elif args.cmd == "topdiff":
        topdiff(args)
    elif args.cmd == "report":
        report(args)
    else:
        free_port()


if __name__ == "__main__":
    main()
