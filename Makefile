# The two commands a new user needs: `make demo` and `make test`. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck unit e2e fuzz mosquitto cross-gcc s3rver models clean

demo: $(STAMP) mosquitto
	$(BIN)/edgefleet demo

test: $(STAMP) mosquitto cross-gcc s3rver lint typecheck
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not e2e"

e2e: $(STAMP) mosquitto s3rver
	$(BIN)/pytest -m e2e

# The parsers and both APIs, fuzzed for longer than in `make test` (HYPOTHESIS_PROFILE=fuzz).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -p no:cacheprovider -o timeout=1800 \
	  tests/protocol/test_fuzz.py tests/protocol/test_sealed.py tests/models/test_manifest_fuzz.py \
	  tests/models/delta/test_bad_input.py tests/device/api/test_schemathesis.py tests/fleet/test_api_schemathesis.py

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[device,fleet,dev,tvm,s3]'
	touch $(STAMP)

# Debian's Mosquitto, only where it is missing (it lives in /usr/sbin, which may not be on PATH).
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  echo "installing Debian's mosquitto"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto >/dev/null; }

# Debian's aarch64 cross compiler, only where it is missing: the fleet links TVM libraries for ARM
# devices with it (tests/device/engine/backends/test_tvm.py).
cross-gcc:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { \
	  echo "installing Debian's g++-aarch64-linux-gnu"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; }

# Retrain the sample models (needs torch, CPU build, from the [train] extra) and rebuild their packages.
models: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[train]'
	$(BIN)/python -m models.zoo.train_surface
	$(BIN)/python -m models.zoo.build_packages

clean:
	rm -rf demo-run .pytest_cache .mypy_cache .ruff_cache

# s3rver (npm), a real S3-compatible server for the artifact-store tests; Debian's npm where missing.
s3rver:
	@test -x .s3rver/node_modules/.bin/s3rver || { \
	  command -v npm >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nodejs npm >/dev/null; }; \
	  echo "installing s3rver@3.7.1 into .s3rver/"; \
	  npm install --prefix .s3rver --no-audit --no-fund --silent s3rver@3.7.1 >/dev/null; }
