# Two commands, on a fresh Debian 12 machine as on a used one:
#   make run    system packages of the target (scripts/system-deps.sh run), the venv with its
#               compiled parts, then the embedded default target;
#   make test   every system package of every test tier (scripts/system-deps.sh test), the VM
#               guest kernel (tests/vm/harness/bootstrap.sh), the venv, ruff, pytest.
# System packages come through apt as root or `sudo -n`; when neither is possible the script
# names what is missing and the build goes on without it (under CI=true it stops instead).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# which compiled parts a rebuild of the venv would add now (scripts/extensions.py)
EXT_STATE := $(VENV)/.extensions

# The packages to install: the role of the goal (a target-specific variable, so the venv
# and the system-deps step below get it when they are built for that goal).
DEPS_ROLE := run
test: DEPS_ROLE := test

.PHONY: run test install lint bench clean docs system-deps vm-harness FORCE

system-deps:
	@scripts/system-deps.sh $(DEPS_ROLE)

# Checked on every run: touched (so newer than the stamp) only when an extension is missing
# from the venv but compiles now, e.g. liburing-dev arrived after the venv was built.
$(EXT_STATE): FORCE | system-deps
	@if [ -x $(PY) ]; then $(PY) scripts/extensions.py check $@; fi

$(STAMP): pyproject.toml setup.py $(wildcard blocktarget/_*_build.py) \
		$(wildcard blocktarget/csrc/*) $(EXT_STATE) | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77'  # (in-place builds: setup.py build_ext)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) scripts/extensions.py verify $(EXT_STATE)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/blocktarget start $(if $(CONFIG),--config $(CONFIG),)

# The VM tier's guest kernel and initramfs, fetched before pytest so the download does not
# count against a test's timeout. Without it the VM tests skip (fail under CI=true). Under
# the lock tests/vm/harness/vm.py takes, so parallel runs on one machine do not collide.
VMDIR_EFF = $(or $(VMDIR),$(HOME)/.cache/blocktarget/vm)
VM_LOCK   = $(dir $(VMDIR_EFF)).$(notdir $(VMDIR_EFF)).lock
vm-harness: system-deps
	@t0=$$(date +%s); mkdir -p $(dir $(VMDIR_EFF)); \
	if flock $(VM_LOCK) tests/vm/harness/bootstrap.sh >/dev/null; then \
		echo "vm-harness: ready in $$(( $$(date +%s) - t0 )) s" >&2; \
	elif [ "$$CI" = true ]; then \
		echo "vm-harness: bootstrap failed (CI=true: stopping)" >&2; exit 1; \
	else \
		echo "vm-harness: bootstrap failed: the VM tests will skip, saying why" >&2; \
	fi

test: $(STAMP) vm-harness
	$(VENV)/bin/ruff check blocktarget tests bench scripts
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check blocktarget tests bench scripts

# Regenerate docs/rpc.md and docs/metrics.md from the code (tests/unit/test_docs.py
# fails while they are stale).
docs: $(STAMP)
	$(VENV)/bin/blocktarget docs --out-dir docs

bench: $(STAMP)
	$(PY) bench/rpc_latency.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
