# Set-up and the two jobs a fresh machine needs: `make serve` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test

# torch is pinned to 2.13.0 in pyproject.toml; on the CPU machines pip takes its CPU wheel from local disk.
# Prometheus (Debian's package) is for tests/test_observability_prometheus.py, which skips without it.
$(BIN)/gptoss-serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) || echo "could not install prometheus: its test will skip"
	touch $@

# Serves the embedded default model (a small synthetic gpt-oss written on first use).
serve: $(BIN)/gptoss-serve
	$(BIN)/gptoss-serve up

# The test suite. pytest exits 5 when it collected no test (a filter that matched nothing): not a failure.
test: $(BIN)/gptoss-serve
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q $(PYTEST_ARGS) || [ $$? -eq 5 ]
