#!/usr/bin/env bash
# `make image`: the container image, built from Debian's tools only and proved to work.
#
# 1. release binary; 2. a root filesystem holding it, the libraries `ldd` names, a CA bundle and
# a passwd entry for uid 1337; 3. `buildah build` of the Containerfile (FROM scratch, vfs storage,
# chroot isolation: no daemon, nothing pulled); 4. `skopeo copy` into a local docker-registry;
# 5. proof: the image is pulled back, unpacked with umoci and its entrypoint run under chroot
# (`--version`, then a `fetch` of the basic-auth plugin from a loopback HTTP server).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/target/image
IMAGE=localhost/ecds-agent:latest
REG_PORT=${REG_PORT:-15098}
BA="buildah --storage-driver vfs"
cd "$ROOT"
say() { printf '\n== %s\n' "$*"; }

say "release binary"
cargo build --release --quiet
BIN=$ROOT/target/release/ecds-agent
ls -l "$BIN"

say "root filesystem"
rm -rf "$OUT"
R=$OUT/rootfs
mkdir -p "$R/usr/local/bin" "$R/etc/ssl/certs" "$R/tmp" "$R/var/lib/istio/data" "$R/etc/istio/proxy"
install -m 0755 "$BIN" "$R/usr/local/bin/ecds-agent"
for lib in $(ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
  install -D -m 0755 "$lib" "$R$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/"
printf 'root:x:0:0::/:/sbin/nologin\necds-agent:x:1337:1337::/:/sbin/nologin\n' > "$R/etc/passwd"
printf 'root:x:0:\necds-agent:x:1337:\n' > "$R/etc/group"
chmod 1777 "$R/tmp"
chown 1337:1337 "$R/var/lib/istio/data" "$R/etc/istio/proxy"
cp Containerfile "$OUT/"
(cd "$R" && find . -type f | sort)

say "buildah build (FROM scratch)"
$BA build --quiet --isolation chroot -f "$OUT/Containerfile" -t "$IMAGE" "$OUT" >/dev/null
$BA images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
$BA push --quiet "$IMAGE" "oci-archive:$OUT/ecds-agent.oci.tar:latest"
printf 'image archive: %s bytes (%s)\n' "$(stat -c %s "$OUT/ecds-agent.oci.tar")" "$OUT/ecds-agent.oci.tar"

say "push to a local docker-registry with skopeo"
REG=$OUT/registry
mkdir -p "$REG/data"
cat > "$REG/config.yml" <<YML
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $REG/data}}
http: {addr: "127.0.0.1:$REG_PORT"}
YML
docker-registry serve "$REG/config.yml" >"$REG/log" 2>&1 &
REG_PID=$!
HTTP_PID=
trap 'kill $REG_PID $HTTP_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$REG_PORT/v2/" >/dev/null && break; sleep 0.1; done
skopeo copy --quiet --dest-tls-verify=false "oci-archive:$OUT/ecds-agent.oci.tar:latest" \
  "docker://127.0.0.1:$REG_PORT/ecds-agent:latest"
skopeo inspect --tls-verify=false "docker://127.0.0.1:$REG_PORT/ecds-agent:latest" \
  | jq -c '{Digest, Architecture, Os, Layers: (.Layers | length)}'

say "prove it: pull back, unpack with umoci, run the entrypoint under chroot"
skopeo copy --quiet --src-tls-verify=false "docker://127.0.0.1:$REG_PORT/ecds-agent:latest" \
  "oci:$OUT/pulled:latest"
umoci unpack --image "$OUT/pulled:latest" "$OUT/bundle" >/dev/null
FS=$OUT/bundle/rootfs
ENTRY=$(jq -r '.process.args | join(" ")' "$OUT/bundle/config.json")
echo "entrypoint + cmd: $ENTRY"
chroot --userspec=1337:1337 "$FS" /usr/local/bin/ecds-agent --version
WEB=$OUT/web
mkdir -p "$WEB"
cp testdata/plugins/basic_auth/basic_auth.wasm "$WEB/"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$WEB" >/dev/null 2>&1 &
HTTP_PID=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$PORT/basic_auth.wasm" -o /dev/null && break; sleep 0.1; done
chroot --userspec=1337:1337 "$FS" /usr/local/bin/ecds-agent fetch \
  "http://127.0.0.1:$PORT/basic_auth.wasm" --cache-dir /tmp/cache
want=$(sha256sum testdata/plugins/basic_auth/basic_auth.wasm | cut -d' ' -f1)
test -f "$FS/tmp/cache/modules/$want.wasm"
echo "image: OK ($IMAGE, pushed as 127.0.0.1:$REG_PORT/ecds-agent:latest)"
