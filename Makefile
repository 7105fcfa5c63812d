# The two commands of the README: `make test` and `make bench` each do all the set-up first.
PY ?= python3

.PHONY: install test bench
install:
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m bench
