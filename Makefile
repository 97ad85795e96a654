# Fresh machine: only Python 3.11+, pip and make are needed. Every target creates
# .venv on first use and installs gatewise into it (editable) with its test extras; the
# install compiles the hot path with mypyc (setup.py; plain Python when there is no C
# compiler), again whenever one of those modules changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOT    := $(shell $(PYTHON) -c 'from proxy.compiled import source_paths; print(*source_paths())')
# The plain-Python pass: pure logic, forwarding end to end, and the tests that patch what
# compiled code would call directly (marked pure_python; the compiled pass skips them, so
# they run here wherever they are). Without a compiler the first pass was plain Python.
PURE_TESTS := tests/unit tests/integration/test_forwarding.py tests/integration/test_fastpath.py \
              tests/integration/test_causes_e2e.py

.PHONY: run run-config test check clean bench bench-quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml setup.py proxy/compiled.py $(HOT) | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	@$(BIN)/python -c "from proxy import compiled; print('gatewise hot path:', compiled.describe())"
	touch $(STAMP)

run: $(STAMP)  # the proxy plus built-in demo upstreams; prints what to try
	$(BIN)/gatewise demo

run-config: $(STAMP)  # the proxy alone, with conf/gatewise.toml (start upstreams on 9001/9002)
	$(BIN)/gatewise run -c conf/gatewise.toml

test: $(STAMP)  # the whole suite on the compiled hot path, then the plain-Python pass
	$(BIN)/python -m pytest -q
	@if $(BIN)/python -c 'import sys; from proxy import compiled; sys.exit(not compiled.is_compiled())'; then \
	  echo "GATEWISE_PURE=1 pytest -q $(PURE_TESTS)"; \
	  GATEWISE_PURE=1 $(BIN)/python -m pytest -q $(PURE_TESTS) && \
	  echo "GATEWISE_PURE=1 pytest -q -m pure_python tests" && \
	  GATEWISE_PURE=1 $(BIN)/python -m pytest -q -m pure_python tests; \
	fi

check: $(STAMP)
	$(BIN)/gatewise check -c conf/gatewise.toml

bench: $(STAMP)  # wrk through gatewise, nginx (and HAProxy when installed); installs wrk/nginx as root; ~20 min
	$(BIN)/python benchmarks/bench.py

bench-quick: $(STAMP)  # the same, as a smoke run of about a minute
	$(BIN)/python benchmarks/bench.py --quick

clean:
	$(PYTHON) -c 'from proxy.compiled import built_extensions; [p.unlink() for p in built_extensions()]'
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
