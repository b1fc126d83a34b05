# Two commands set everything up: `make install`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pins: the CPU-capable builds this project is tested with.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test bench install-ipex install-optimum install-browser clean

install: $(BIN)/sd
	-@$(MAKE) --no-print-directory install-browser

# The page's browser tests drive Debian's chromium through playwright (never a browser playwright downloads).
# Installed when we may (root, apt); elsewhere those tests are skipped with the reason.
install-browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "chromium not installed: the browser tests will be skipped (install Debian's chromium to run them)"

$(BIN)/sd: setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[test]' -r requirements-test.txt $(TORCH_PINS)
	touch $(BIN)/sd

test:
	$(BIN)/python -m pytest -q tests

# `make bench` times sd against diffusers on full-size random weights (minutes; not part of the tests).
# BENCH_ARGS passes options through, e.g. `make bench BENCH_ARGS="--quick"`. When .venv-ipex exists the
# IPEX rows are measured in that environment by a child process.
bench: | $(BIN)/sd
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# A second environment for --ipex: intel-extension-for-pytorch 2.8 needs exactly torch 2.8.
IPEX_VENV ?= .venv-ipex
IPEX_PINS := torch==2.8.0 torchvision==0.23.0 intel-extension-for-pytorch==2.8.0
install-ipex: $(IPEX_VENV)/bin/sd

$(IPEX_VENV)/bin/sd: setup.py
	$(PYTHON) -m venv $(IPEX_VENV)
	$(IPEX_VENV)/bin/pip install --upgrade pip wheel setuptools
	$(IPEX_VENV)/bin/pip install $(IPEX_PINS)
	$(IPEX_VENV)/bin/pip install -e . diffusers transformers $(IPEX_PINS)
	touch $(IPEX_VENV)/bin/sd

# A third, bench-only environment: optimum-intel (OpenVINO's Hugging Face pipelines), the peer of
# --backend openvino in `make bench`. Apart because it pins other transformers/typer versions than sd's tests.
OPTIMUM_VENV ?= .venv-optimum
install-optimum: $(OPTIMUM_VENV)/bin/python-ok

$(OPTIMUM_VENV)/bin/python-ok:
	$(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install --upgrade pip wheel setuptools
	$(OPTIMUM_VENV)/bin/pip install $(TORCH_PINS)
	$(OPTIMUM_VENV)/bin/pip install 'optimum-intel[openvino]' diffusers $(TORCH_PINS)
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
