#!/usr/bin/env bash
# Makes testdata/keyless/ (tests/keyless.rs) with a throwaway local Sigstore from sigstore-go's
# test helpers (Go module proxy). The outputs are checked in; verification uses the signing
# time, so they stay valid. module.wasm is the basic-auth test plugin.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/testdata/keyless
cp "$here/testdata/plugins/basic_auth/basic_auth.wasm" "$out/module.wasm"
cd "$out/gen"
GOFLAGS=-mod=mod go run . "$out"
