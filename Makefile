# Two commands: `make run` (install + start the embedded default target) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test install lint bench clean docs

$(STAMP): pyproject.toml setup.py blocktarget/_uring_build.py blocktarget/_pmem_build.py \
		blocktarget/_fastpath_build.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/blocktarget start $(if $(CONFIG),--config $(CONFIG),)

test: $(STAMP)
	$(VENV)/bin/ruff check blocktarget tests bench
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check blocktarget tests bench

# Regenerate docs/rpc.md and docs/metrics.md from the code (tests/unit/test_docs.py
# fails while they are stale).
docs: $(STAMP)
	$(VENV)/bin/blocktarget docs --out-dir docs

bench: $(STAMP)
	$(PY) bench/rpc_latency.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
