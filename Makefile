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

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

codegen: venv
	$(BIN)/python -m protomesh.codegen

check-codegen: venv
	$(BIN)/python -m protomesh.codegen --check

clean:
	rm -rf $(VENV) demo-output .pytest_cache
