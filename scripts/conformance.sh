#!/usr/bin/env bash
# Runs the public sigstore-conformance suite's verification cases against `ecds-agent
# verify-bundle`, offline: `make conformance CONFORMANCE_DIR=/path/to/sigstore-conformance`.
# The suite downloads an identity token for every test (used for signing only); the plugin
# scripts/conformance_offline.py replaces that download with an unsigned JWT, and signing tests
# are skipped (--skip-signing). Not part of `make test` (CI has no copy of the suite).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
suite=${CONFORMANCE_DIR:?set CONFORMANCE_DIR to a checkout of sigstore/sigstore-conformance}
bin=${ECDS_AGENT_BIN:-$here/target/release/ecds-agent}
venv=${CONFORMANCE_VENV:-$here/.venv-conformance}
[ -x "$venv/bin/pytest" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q -r "$suite/requirements.txt"; }
cd "$suite"
git log -1 --format='sigstore-conformance %H (%cd)' 2>/dev/null || true
PYTHONPATH="$here/scripts" "$venv/bin/pytest" test -p conformance_offline --skip-signing \
  --entrypoint="$bin" -q --no-header -p no:cacheprovider "$@"
