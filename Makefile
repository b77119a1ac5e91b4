# The two commands: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test stress bench lint clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m vstore.cli.demo

test: setup
	$(PY) -m pytest -q tests

stress: setup
	$(PY) -m pytest -q -m stress tests

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check vstore backends fuse_mount bench tests

clean:
	rm -rf $(VENV) build *.egg-info
