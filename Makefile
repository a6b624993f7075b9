# The two set-up commands of the README. Each creates .venv if missing, installs what it
# needs (pip takes torch/torchvision from this machine's disk where it can), and runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nxc-installed
TRITON := $(VENV)/pytriton/pytriton/tritonserver/bin/tritonserver

.PHONY: demo test test-aarch64 install browser clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[export,serve,dev]"
	$(MAKE) --no-print-directory $(TRITON)
	touch $(STAMP)

# The Triton test's server: nvidia-pytriton's wheel ships a real tritonserver binary (Python backend only). Its
# Python dependencies (numpy<2, protobuf<7) would break the export stack, so only the wheel's files are taken, into
# their own folder, never into the environment; its Python-backend stub is built against numpy 1.x, so that folder
# also holds the numpy<2 the test's stub environment puts first (tests/triton/triton_local.py).
$(TRITON):
	$(PY) -m pip install -q --no-deps --target $(VENV)/pytriton "nvidia-pytriton==0.7.0" "numpy<2"

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m nxc.demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# The runtime for real on aarch64 under emulation (issue 20): an arm64 Debian userland (debootstrap, qemu-user through
# binfmt_misc, chroot; root; apt-get installs qemu-user-static and debootstrap where missing), aarch64 wheels of the
# runtime only, builds exported here; the answers must equal x86's. The userland and its venv stay in .aarch64/.
# AARCH64_FLAGS=--quick runs four of tests/runtime's files (what CI runs); times are in the README.
AARCH64_FLAGS ?=
test-aarch64: $(STAMP)
	$(PY) tests/aarch64/harness.py $(AARCH64_FLAGS)

# The headless Chromium that tests/serve/test_browser.py drives (Playwright's own download is not needed). Installed
# with apt when missing and apt-get is there; never fails: without it that test skips and says why.
CHROMIUM_SHELL := /usr/bin/chromium-headless-shell
browser:
	@if [ -x $(CHROMIUM_SHELL) ] || command -v chromium-headless-shell >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium-headless-shell (apt) for tests/serve/test_browser.py"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium-headless-shell \
	    >/dev/null; } || echo "apt-get could not install chromium-headless-shell: tests/serve/test_browser.py will skip"; \
	else echo "no chromium-headless-shell, and no apt-get as root: tests/serve/test_browser.py will skip"; fi

clean:
	rm -rf $(VENV) build .aarch64
