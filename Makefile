# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
#   make test        lint (ruff) + the whole test suite
#   make test-fast   lint (ruff) + the tests not marked slow (under a minute on 2 CPU cores)
VENV ?= .venv
PYTEST_ARGS ?=
# Written once the test extras are installed; redone when pyproject.toml or the install script change.
TEST_STAMP := $(VENV)/.dist-video-test-installed

.PHONY: demo test test-fast lint install install-test clean

install:
	VENV=$(VENV) scripts/install.sh

$(TEST_STAMP): pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh test
	touch $@

install-test: $(TEST_STAMP)

demo: install
	$(VENV)/bin/dist-video demo --out demo-report

lint: install-test
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: lint
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-report .pytest_cache
