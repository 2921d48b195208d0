#!/usr/bin/env bash
# The seed walkthrough on one machine: Istio's "Distributing WebAssembly Modules" task, for real.
#
#   registry (docker-registry) ← basic_auth plugin pushed as an OCI image (skopeo)
#   demo control plane (reads testdata/wasmplugin.yaml, serves LDS/CDS/ECDS like istiod)
#   ecds-agent (fetches, verifies, caches, rewrites remote → local file)
#   Envoy 1.40 (V8) ← ADS over the agent's Unix socket
#   curl /productpage → 401 without credentials, 200 with them
#
# Ports (override with env): registry 15050, control plane 15010, agent admin 15020,
# Envoy listener 18080, Envoy admin 15000, productpage 19080. Everything stops on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
W=$ROOT/.demo
AGENT=$ROOT/target/debug/ecds-agent
ENVOY_BIN=${ENVOY_BIN:-$ROOT/.venv/bin/envoy}
REG=127.0.0.1:${DEMO_REGISTRY_PORT:-15050}
CP=127.0.0.1:${DEMO_CP_PORT:-15010}
ADMIN=127.0.0.1:${DEMO_ADMIN_PORT:-15020}
HTTP=127.0.0.1:${DEMO_HTTP_PORT:-18080}
ENVOY_ADMIN_PORT=${DEMO_ENVOY_ADMIN_PORT:-15000}
PAGE=127.0.0.1:${DEMO_PAGE_PORT:-19080}
REPO=istio-ecosystem/wasm-extensions/basic_auth
TAG=1.12.0
RESOURCE=extensions.istio.io/wasmplugin/istio-system.basic-auth
PLUGIN=$ROOT/testdata/plugins/basic_auth/basic_auth.wasm

bold() { if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi; }
die() { echo "demo: $*" >&2; exit 1; }

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_for() { # wait_for DESCRIPTION COMMAND...
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not come up (logs in $W)"
}

[ -x "$AGENT" ] || die "build first: cargo build --features demo"
command -v docker-registry >/dev/null || die "docker-registry missing: make deps"
command -v skopeo >/dev/null || die "skopeo missing: make deps"
rm -rf "$W"; mkdir -p "$W"

bold "1. OCI registry on $REG"
cat > "$W/registry.yml" <<YML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $W/registry}}
http: {addr: "$REG"}
YML
docker-registry serve "$W/registry.yml" > "$W/registry.log" 2>&1 & pids+=($!)
wait_for registry curl -sf "http://$REG/v2/"

bold "2. Push the basic_auth plugin (C, $(stat -c %s "$PLUGIN") bytes) as an OCI image"
# An OCI image layout: one tar+gzip layer holding plugin.wasm, written with coreutils only.
L=$W/layout; mkdir -p "$L/blobs/sha256" "$W/layer"
cp "$PLUGIN" "$W/layer/plugin.wasm"
tar -C "$W/layer" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$W/layer.tar" plugin.wasm
gzip -n -c "$W/layer.tar" > "$W/layer.tar.gz"
blob() { local d; d=$(sha256sum "$1" | cut -d' ' -f1); cp "$1" "$L/blobs/sha256/$d"; echo "$d"; }
DIFF=$(sha256sum "$W/layer.tar" | cut -d' ' -f1)
LD=$(blob "$W/layer.tar.gz"); LS=$(stat -c %s "$W/layer.tar.gz")
printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$DIFF" > "$W/config.json"
CD=$(blob "$W/config.json"); CS=$(stat -c %s "$W/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}]}' "$CD" "$CS" "$LD" "$LS" > "$W/manifest.json"
MD=$(blob "$W/manifest.json"); MS=$(stat -c %s "$W/manifest.json")
printf '{"imageLayoutVersion":"1.0.0"}' > "$L/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' "$MD" "$MS" "$TAG" > "$L/index.json"
skopeo copy -q --dest-tls-verify=false "oci:$L:$TAG" "docker://$REG/$REPO:$TAG"
echo "pushed oci://$REG/$REPO:$TAG (manifest sha256:$MD)"

bold "3. Demo control plane on $CP serving the WasmPlugin"
sed "s#oci://127.0.0.1:15050/#oci://$REG/#" testdata/wasmplugin.yaml > "$W/wasmplugin.yaml"
sed -n '/^spec:/,$p' "$W/wasmplugin.yaml"
"$AGENT" demo --wasmplugin "$W/wasmplugin.yaml" --listen "$CP" \
  --envoy-listener "$HTTP" --productpage "$PAGE" > "$W/control-plane.log" 2>&1 & pids+=($!)
wait_for "control plane" bash -c "exec 3<>/dev/tcp/${CP%:*}/${CP#*:}"

bold "4. ecds-agent: Envoy socket $W/XDS → control plane $CP, admin $ADMIN"
"$AGENT" run --listen "unix:$W/XDS" --upstream "http://$CP" --admin "$ADMIN" \
  --cache-dir "$W/cache" --insecure-registries "$REG" > "$W/agent.log" 2>&1 & pids+=($!)
wait_for agent curl -sf "http://$ADMIN/healthz/ready"

status() { curl -s -o /dev/null -w '%{http_code}' "$@" "http://$HTTP/productpage"; }
if [ -x "$ENVOY_BIN" ]; then
  bold "5. Envoy $("$ENVOY_BIN" --version | sed -n 's/.*version: [^/]*\/\([^/]*\)\/.*/\1/p') (ADS over the agent's socket, Delta xDS)"
  sed -e "s#@XDS_SOCKET@#$W/XDS#" -e "s#@ADMIN_PORT@#$ENVOY_ADMIN_PORT#" -e "s#@API_TYPE@#DELTA_GRPC#" \
    testdata/envoy/bootstrap.yaml > "$W/envoy.yaml"
  "$ENVOY_BIN" -c "$W/envoy.yaml" --concurrency 1 -l warning > "$W/envoy.log" 2>&1 & pids+=($!)
  wait_for "Envoy listener with the Wasm filter" bash -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' http://$HTTP/productpage)\" = 401 ]"

  bold "6. The seed's curls"
  echo '$ curl -s -o /dev/null -w "%{http_code}" "http://'"$HTTP"'/productpage"'
  no_creds=$(status); echo "$no_creds"
  echo '$ curl -s -o /dev/null -w "%{http_code}" -H "Authorization: Basic YWRtaW4zOmFkbWluMw==" "http://'"$HTTP"'/productpage"'
  with_creds=$(status -H "Authorization: Basic YWRtaW4zOmFkbWluMw=="); echo "$with_creds"
  [ "$no_creds" = 401 ] && [ "$with_creds" = 200 ] || die "expected 401 then 200, got $no_creds then $with_creds"
  echo "Envoy's config_dump shows the local file:"
  curl -s "http://127.0.0.1:$ENVOY_ADMIN_PORT/config_dump?resource=ecds_filters" | grep -o '"filename": "[^"]*"' | sort -u
else
  bold "5. Envoy is not available here ($ENVOY_BIN); showing the ECDS exchange through the agent instead"
  "$AGENT" demo probe --xds "unix:$W/XDS" --resource "$RESOURCE"
fi

bold "7. The module in the agent's cache"
find "$W/cache/modules" -type f -printf '%p  %s bytes\n'
curl -s "http://$ADMIN/debug/wasm" | jq '.modules[] | {sha256, urls, oci_digests, size, used_by}'

bold "8. Agent metrics"
curl -s "http://$ADMIN/stats/prometheus" | grep -E '^(istio_agent_wasm|istio_agent_xds|ecds_agent_nacks)' | grep -v '_bucket' || true

bold "9. What the control plane saw"
grep -E 'ECDS|WasmPlugin' "$W/control-plane.log" | head -20
echo
echo "demo: OK (logs in $W)"
