# canary-router task runner: people and CI call the same targets. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PYTHON      := $(VENV)/bin/python
ENVOY       := $(VENV)/bin/envoy
WASM_TARGET := wasm32-wasip1
WASM        := target/$(WASM_TARGET)/release/canary_router.wasm
CANARYCTL   := target/release/canaryctl
NATIVE      := target/native/libcanary_router_native.so
# mTLS between canaryctl and Envoy (envoy/envoy-ads-tls.yaml, docker-compose.yaml): made here, never committed.
CERTS       := .run/certs
BOOTSTRAPS  := envoy/envoy-inline.yaml envoy/envoy-ecds.yaml envoy/envoy-ads.yaml envoy/envoy-ads-tls.yaml envoy/envoy-ads-native.yaml envoy/envoy-native.yaml envoy/demo-app-v1.yaml envoy/demo-app-v2.yaml
# A base id no test uses, so validation can run beside a running Envoy.
VALIDATE_BASE_ID := 77

.PHONY: help setup install-protoc install-etcd install-docker-compose install-prometheus install-podman install-openssl install-chromium compose-test certs wasm canaryctl native native-panic skew-wasm skew-native unit lint validate integration test bench-tools bench-filters bench-quick bench-fleet bench demo compose-prep clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed install-protoc ## Install what the build, demo and tests need: the wasm target, Envoy 1.40.0 + pytest in .venv
	@rustup target list --installed | grep -qx $(WASM_TARGET) || rustup target add $(WASM_TARGET)
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy rustfmt

# canaryctl's etcd client (etcd-client) compiles etcd's protos when it is built: protoc and the well-known types.
install-protoc:
	@command -v protoc >/dev/null && [ -f /usr/include/google/protobuf/descriptor.proto ] || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends protobuf-compiler libprotobuf-dev >/dev/null; \
	else \
	  echo "protoc is missing: sudo apt-get install protobuf-compiler libprotobuf-dev (canaryctl's etcd client is built with it)"; exit 1; \
	fi

# Debian's etcd-server: a real etcd cluster on loopback, started by the tests of canaryctl's replicas.
install-etcd:
	@command -v etcd >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null; \
	else \
	  echo "etcd is missing: sudo apt-get install etcd-server (the tests of canaryctl's replicas start an etcd cluster)"; exit 1; \
	fi

# Debian's docker-compose (v1) validates the compose file without a Docker engine. Only the tests need it.
install-docker-compose:
	@command -v docker-compose >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	else \
	  echo "docker-compose is missing: sudo apt-get install docker-compose (used to validate docker-compose.yaml)"; exit 1; \
	fi

$(VENV)/.installed: tests/requirements.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	$(ENVOY) --version
	touch $@

# Debian's prometheus: a real Prometheus server, started by the tests of rollouts that read it. Only the tests
# need it.
install-prometheus:
	@command -v prometheus >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
	  echo "prometheus is missing: sudo apt-get install prometheus (the tests start one to test rollouts that read it)"; exit 1; \
	fi

# Debian's podman and podman-compose: a real container engine for `make compose-test` (no Docker engine here),
# with runc (crun, podman's default, cannot start containers where cgroups are in hybrid mode).
install-podman:
	@command -v podman-compose >/dev/null && command -v runc >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman podman-compose runc >/dev/null; \
	else \
	  echo "podman-compose or runc is missing: sudo apt-get install podman podman-compose runc (make compose-test runs the compose file with them)"; exit 1; \
	fi

# Debian's chromium and its chromedriver: the rollout page's tests drive a real browser, headless. Only the tests
# need them.
install-chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	else \
	  echo "chromium or chromedriver is missing: sudo apt-get install chromium chromium-driver (the rollout page's tests drive it)"; exit 1; \
	fi

install-openssl:
	@command -v openssl >/dev/null || if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; \
	else \
	  echo "openssl is missing: sudo apt-get install openssl (it makes the mTLS certificates)"; exit 1; \
	fi

certs: $(CERTS)/envoy.pem ## mTLS certificates in .run/certs: a fleet CA, canaryctl's serving one, an Envoy's (cluster canary-router)

$(CERTS)/envoy.pem: tools/certs.py | install-openssl
	python3 tools/certs.py $(CERTS)

wasm: setup ## Build the filter: target/wasm32-wasip1/release/canary_router.wasm
	cargo build --release --target $(WASM_TARGET)
	@ls -l $(WASM) | awk '{printf "built %s (%d bytes)\n", $$9, $$5}'

native: ## Build the native Envoy 1.40 dynamic module: target/native/libcanary_router_native.so
	cargo build --profile native -p canary-router-native
	@ls -l $(NATIVE) | awk '{printf "built %s (%d bytes)\n", $$9, $$5}'

# The native module that panics on demand (header x-canary-router-panic), only for the containment test.
native-panic:
	RUSTFLAGS="--cfg canary_router_native_panic_test" cargo build --profile native --target-dir target/native-panic -p canary-router-native

canaryctl: install-protoc ## Build the control plane: target/release/canaryctl (and the tests' report forger, the fleet simulator)
	cargo build --release -p canaryctl --bin canaryctl --example forge_report --example fleet_sim

# The filter as an older release would build (only for the version-skew tests; see RawConfig::validate).
skew-wasm: setup
	RUSTFLAGS="--cfg canary_router_simulate_old_release" cargo build --release --target $(WASM_TARGET) --target-dir target/skew -p canary-router

skew-native:
	RUSTFLAGS="--cfg canary_router_simulate_old_release" cargo build --profile native --target-dir target/skew -p canary-router-native

unit: install-protoc ## Host tests: config contract, decision order, golden hash vectors, properties, canaryctl
	cargo test --release --workspace

lint: setup ## rustfmt and clippy, on the host and on wasm32-wasip1 (warnings are errors)
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target $(WASM_TARGET) -p canary-router --lib -- -D warnings

validate: wasm native certs install-docker-compose ## envoy --mode validate on every shipped Envoy config, and docker-compose config -q
	@for f in $(BOOTSTRAPS); do \
	  $(ENVOY) --mode validate -c $$f --base-id $(VALIDATE_BASE_ID) -l warning >/dev/null 2>/tmp/canary-router-validate.log \
	    && echo "valid: $$f" || { cat /tmp/canary-router-validate.log; echo "INVALID: $$f"; exit 1; }; \
	done
	docker-compose -f docker-compose.yaml config -q && echo "valid: docker-compose.yaml"

integration: wasm native native-panic canaryctl skew-wasm skew-native certs install-docker-compose install-prometheus install-etcd install-chromium ## Real-Envoy tests (starts Envoy 1.40 and upstreams on loopback)
	cd tests/integration && ../../$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test: unit validate integration ## Everything: host tests, config validation, real-Envoy tests

compose-prep: wasm canaryctl certs ## Before `docker compose up`: build the filter and canaryctl, create .run/canaryctl and .run/certs
	mkdir -p .run/canaryctl

compose-test: setup compose-prep install-podman ## Run docker-compose.yaml for real (podman-compose, stand-in images, as root) and check what the README promises
	@[ "$$(id -u)" = 0 ] || { echo "make compose-test runs rootful podman: run it as root"; exit 1; }
	cd tests/compose && timeout 900 ../../$(PYTHON) -m pytest -q $(PYTEST_ARGS)

NOOP_WASM := bench/noop-filter/target/$(WASM_TARGET)/release/noop_filter.wasm

# Debian's tools the benchmarks need: valgrind (callgrind counts instructions), wrk and nginx-light (load and
# upstreams for the CPU-time view).
bench-tools:
	@command -v valgrind >/dev/null && command -v wrk >/dev/null && command -v nginx >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind wrk nginx-light >/dev/null; \
	  else echo "the benchmarks need valgrind, wrk and nginx-light: sudo apt-get install valgrind wrk nginx-light"; exit 1; fi; }

bench-filters: wasm native
	cargo build --release --target $(WASM_TARGET) --manifest-path bench/noop-filter/Cargo.toml

bench-quick: bench-tools bench-filters ## Instructions per request only (callgrind, a few minutes): Envoy alone, Lua, the no-op SDK filter, the .wasm, the native module
	$(PYTHON) tools/count_instructions.py $(COUNT_ARGS)

bench-fleet: setup canaryctl install-etcd ## Simulated fleets against canaryctl, one replica and three on etcd (FLEET_ARGS=--smoke: a minute)
	$(PYTHON) tools/bench_fleet.py $(FLEET_ARGS)

bench: bench-tools bench-filters ## The benchmark: instructions per request (direct and upstream routes), then CPU time, latency and RSS (see BENCHMARKS.md)
	$(PYTHON) tools/count_instructions.py $(COUNT_ARGS)
	$(PYTHON) tools/count_instructions.py --routes upstream --variants b,c,d,e,f,g $(COUNT_ARGS)
	cargo run --release --example microbench
	$(PYTHON) tools/bench.py $(BENCH_ARGS)

demo: wasm canaryctl install-prometheus ## The local demo, no Docker: two app versions, canaryctl, Envoy, a ramp 0→100 % under traffic
	$(PYTHON) tools/demo.py local $(DEMO_ARGS)

demo-ha: wasm canaryctl install-etcd ## Replicas: 3 etcd members, 3 canaryctl, 2 Envoys, a rollout whose leader is killed
	$(PYTHON) tools/demo.py ha $(DEMO_ARGS)

clean: ## Remove build output (keeps .venv)
	cargo clean
