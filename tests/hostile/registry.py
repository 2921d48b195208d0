"""A misbehaving OCI registry for tests/hostile.rs, written outside Rust on purpose.

The repository name picks the misbehaviour (tag "1.0" for all):
  many-layers/*   a manifest with 10 000 layers
  huge-index/*    an index with 10 000 entries (each child manifest: a config-only image)
  lie-manifest/*  asked by digest, serves a manifest whose sha256 is another
  lie-blob/*      the module layer's bytes do not match its digest
  html/*          the manifest comes as text/html
  stall/*         manifest headers sent, then the body never comes
  huge/*          a 100 MiB manifest (with Content-Length)
  endless/*       a manifest body that keeps coming (no Content-Length, 100 MiB until close)
  stall-blob/*    a good manifest; the layer's headers sent, then the body never comes
  to-storage/*    the layer answers 307 to /storage/wasm on this server (object storage)
  to-blocked/*    the layer answers 307 to 127.0.0.2 (the test puts it on the block list)
With --token MODE every registry request asks for a Bearer token at
http://tokens.hostile.test:PORT/token (a name, so the realm guard lets it through; the test
reaches it by pointing HTTP_PROXY at this server, which also answers proxy requests), and the
token endpoint misbehaves: `silent` never answers, `stall` sends headers and then nothing,
`huge` answers with a 100 MiB token body.
Every request is logged as a JSON line to --log. Prints the port on stdout.
"""
import argparse
import hashlib
import json
import sys
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WASM = b"\0asm\x01\0\0\0"
LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def digest(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def manifest(layers):
    cfg = b"{}"
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.module.wasm.config.v1+json", "digest": digest(cfg), "size": 2},
        "layers": layers,
    }).encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", required=True)
    ap.add_argument("--token", choices=["silent", "stall", "huge"])
    args = ap.parse_args()
    wasm_layer = {"mediaType": LAYER, "digest": digest(WASM), "size": len(WASM)}
    plain = manifest([wasm_layer])
    child = manifest([{"mediaType": "application/vnd.example.not-wasm", "digest": digest(b"x"), "size": 1}])

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send(self, code, body=b"", ctype="application/json", extra=()):
            try:
                self.send_raw(code, body, ctype, extra)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def send_raw(self, code, body, ctype, extra):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def token(self):
            if args.token == "silent":
                time.sleep(60)
                return
            if args.token == "stall":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.flush()
                time.sleep(60)
                return
            body = b'{"token":"' + b"t" * (100 << 20) + b'"}'
            return self.send(200, body)

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            with open(args.log, "a") as f:
                f.write(json.dumps({"path": self.path}) + "\n")
            # Proxy requests come in absolute form.
            p = urllib.parse.urlsplit(self.path).path if self.path.startswith("http") else self.path
            if args.token and p == "/token":
                return self.token()
            if args.token and not self.headers.get("Authorization", "").startswith("Bearer "):
                realm = "http://tokens.hostile.test:%d/token" % self.server.server_address[1]
                return self.send(401, b'{"errors":[]}', extra=[
                    ("WWW-Authenticate", 'Bearer realm="%s",service="hostile"' % realm)])
            if p == "/v2/":
                return self.send(200, b"{}")
            if p == "/storage/wasm":
                return self.send(200, WASM, "application/octet-stream")
            parts = p.split("/")
            if len(parts) < 5:
                return self.send(404)
            kind = parts[2]
            what, ref = parts[-2], parts[-1]
            if what == "blobs" and kind in ("to-storage", "to-blocked") and ref == digest(WASM):
                host = "127.0.0.1" if kind == "to-storage" else "127.0.0.2"
                loc = "http://%s:%d/storage/wasm" % (host, self.server.server_address[1])
                return self.send(307, b"", extra=[("Location", loc)])
            if what == "blobs" and kind == "stall-blob" and ref == digest(WASM):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(WASM)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(60)
                return
            if what == "blobs":
                if kind == "lie-blob" and ref == digest(WASM):
                    return self.send(200, b"\0asm\x01\0\0\0TAMPERED", "application/octet-stream")
                if ref == digest(WASM):
                    return self.send(200, WASM, "application/octet-stream")
                return self.send(200, b"{}", "application/octet-stream")
            if kind == "many-layers":
                body = manifest([{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(str(i).encode()), "size": 1} for i in range(10000)])
                return self.send(200, body, OCI_MANIFEST, [("Docker-Content-Digest", digest(body))])
            if kind == "huge-index":
                if ref.startswith("sha256:"):
                    return self.send(200, child, OCI_MANIFEST, [("Docker-Content-Digest", digest(child))])
                body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                    {"mediaType": OCI_MANIFEST, "digest": digest(child), "size": len(child),
                     "platform": {"architecture": "amd64", "os": "linux", "variant": str(i)}} for i in range(10000)]}).encode()
                return self.send(200, body, OCI_INDEX, [("Docker-Content-Digest", digest(body))])
            if kind == "lie-manifest":
                return self.send(200, plain, OCI_MANIFEST, [("Docker-Content-Digest", ref)])
            if kind == "html":
                return self.send(200, b"<html>not a manifest</html>", "text/html")
            if kind == "huge":
                body = b'{"schemaVersion":2,"x":"' + b"a" * (100 << 20) + b'"}'
                return self.send(200, body, OCI_MANIFEST)
            if kind == "endless":
                self.send_response(200)
                self.send_header("Content-Type", OCI_MANIFEST)
                self.send_header("Connection", "close")
                self.end_headers()
                chunk = b"a" * (1 << 20)
                try:
                    for _ in range(100):
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True
                return
            if kind == "stall":
                self.send_response(200)
                self.send_header("Content-Type", OCI_MANIFEST)
                self.send_header("Content-Length", str(len(plain)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(60)
                return
            return self.send(200, plain, OCI_MANIFEST, [("Docker-Content-Digest", digest(plain))])

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    print(srv.server_address[1], flush=True)
    sys.stdout.close()
    srv.serve_forever()


if __name__ == "__main__":
    main()
