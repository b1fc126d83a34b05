# Two commands set everything up: `make install`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision pins: the CPU-capable builds this project is tested with.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test bench clean

install: $(BIN)/sd

$(BIN)/sd: setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel setuptools
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[test]' -r requirements-test.txt $(TORCH_PINS)
	touch $(BIN)/sd

test:
	$(BIN)/python -m pytest -q tests

bench:
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
