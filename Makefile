# The two set-up commands are `make serve` and `make test`; both install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser serve test check lint typecheck proto bench bench-ingest bench-compat bench-uimix bench-uiwalk clean

install: $(STAMP)

# Re-install whenever the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[server,test,bench]'
	touch $(STAMP)

serve: install
	$(BIN)/trackhouse serve $(ARGS)

# Two workers, one test file each at a time (module-scoped servers stay in one worker). Most tests wait on servers
# and subprocesses, so two workers overlap the waits: 807 tests took 13 min 54 s on 2 cores (other work running),
# where one worker took 18 min for 676 tests. `make test PYTEST_ARGS=-n0` runs everything in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: install browser check
	$(BIN)/pytest $(PYTEST_ARGS)

# The UI test drives Debian's Chromium through Playwright; nothing is downloaded at run time.
browser:
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

check: lint typecheck

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy trackhouse benchmarks tests

# Regenerate the committed protobuf code (tests fail when it is stale).
proto: install
	$(BIN)/python scripts/gen_proto.py

# The harness: HPO-sweep and LLM-run workloads on trackhouse and stock MLflow. QUICK=1: the same shape, smaller.
bench: install
	$(BIN)/python -m benchmarks $(if $(QUICK),--size quick) $(ARGS)

# Focused ingest benchmarks: the gRPC path's ceilings, and Kafka beside direct gRPC.
bench-ingest: install
	$(BIN)/python -m benchmarks.ingest
	$(BIN)/python -m benchmarks.kafka

# The MLflow API's read and log-batch targets (loads about 10^8 points first; takes several minutes).
bench-compat: install
	$(BIN)/python -m benchmarks.compat $(ARGS)

# The MLflow UI's call mix beside stock MLflow. FULL=1: 10^5 runs and 1,000 runs x 5,000 keys (loads for minutes).
bench-uimix: install
	$(BIN)/python -m benchmarks.uimix $(if $(FULL),--full) $(ARGS)

# MLflow's single-metric page for a 2M-point series, walked in headless Chromium (needs `make browser`).
bench-uiwalk: install browser
	$(BIN)/python -m benchmarks.uiwalk $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache test-artifacts
