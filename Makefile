# Fresh machine: only Python 3.11+, pip and make are needed. Every target creates
# .venv on first use and installs gatewise into it (editable) with its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run run-config test check clean bench bench-quick

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  # the proxy plus built-in demo upstreams; prints what to try
	$(BIN)/gatewise demo

run-config: $(STAMP)  # the proxy alone, with conf/gatewise.toml (start upstreams on 9001/9002)
	$(BIN)/gatewise run -c conf/gatewise.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/gatewise check -c conf/gatewise.toml

bench: $(STAMP)  # wrk through gatewise, nginx (and HAProxy when installed); installs wrk/nginx as root; ~20 min
	$(BIN)/python benchmarks/bench.py

bench-quick: $(STAMP)  # the same, as a smoke run of about a minute
	$(BIN)/python benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
