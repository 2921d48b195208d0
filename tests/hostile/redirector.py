"""A small HTTP(S) server for the redirect and SSRF tests, written outside Rust on purpose.

Routes:
  /redirect?to=URL   302 to URL
  /loop              302 to /loop
  /chain/N?to=URL    302 to /chain/N-1 ... and /chain/0 302s to URL
  /file/NAME         the bytes of DIR/NAME
  /v2/...            with --realm: 401 with a Bearer challenge naming that realm (a registry
                     sending clients to a token endpoint); with --realm-first too, the very
                     first /v2/ answer names that realm instead (a registry that answers a
                     probe one way and the request carrying credentials another)
Every request is appended to --log as one JSON line (path and headers).
Prints the bound port on the first line of stdout.
"""
import argparse
import json
import os
import ssl
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--realm")
    ap.add_argument("--realm-first")
    args = ap.parse_args()
    seen_v2 = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def redirect(self, to):
            self.send_response(302)
            self.send_header("Location", to)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            with open(args.log, "a") as f:
                f.write(json.dumps({"path": self.path, "headers": dict(self.headers)}) + "\n")
            u = urllib.parse.urlsplit(self.path)
            q = urllib.parse.parse_qs(u.query)
            to = q.get("to", [""])[0]
            if args.realm and u.path.startswith("/v2/"):
                seen_v2[0] += 1
                realm = args.realm_first if args.realm_first and seen_v2[0] == 1 else args.realm
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Bearer realm="%s",service="test"' % realm)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if u.path == "/redirect":
                return self.redirect(to)
            if u.path == "/loop":
                return self.redirect("/loop")
            if u.path.startswith("/chain/"):
                n = int(u.path.rsplit("/", 1)[1])
                nxt = to if n == 0 else "/chain/%d?%s" % (n - 1, u.query)
                return self.redirect(nxt)
            if u.path.startswith("/file/"):
                p = os.path.join(args.dir, os.path.basename(u.path))
                if os.path.exists(p):
                    body = open(p, "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = ThreadingHTTPServer((args.bind, 0), Handler)
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print(srv.server_address[1], flush=True)
    sys.stdout.close()
    srv.serve_forever()


if __name__ == "__main__":
    main()
