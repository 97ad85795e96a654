# Fresh machine: only Python 3.11+, pip and make are needed. Every target creates
# .venv on first use and installs gatewise into it (editable) with its test extras.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gatewise run -c conf/gatewise.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/gatewise check -c conf/gatewise.toml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
