# `make demo` and `make test` work on a fresh machine: each sets up .venv first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test install install-test clean

install:
	VENV=$(VENV) scripts/install.sh

install-test:
	VENV=$(VENV) scripts/install.sh test

demo: install
	$(VENV)/bin/dist-video demo --out demo-report

test: install-test
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo-report .pytest_cache
