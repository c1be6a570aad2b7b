# Every target creates .venv and installs what it needs.
# torch 2.13.0 is installed first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The BraTS organisers' metrics package (AGPL-3.0), a test-only cross-check kept in its own
# environment and run as a subprocess (tests/test_lesionwise_official.py); tumorseg never imports it.
BRATS_VENV := .venv-brats
BRATS_STAMP := $(BRATS_VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,onnx]'
	touch $(STAMP)

$(BRATS_STAMP):
	test -x $(BRATS_VENV)/bin/python || $(PY) -m venv $(BRATS_VENV)
	$(BRATS_VENV)/bin/pip install --quiet brats-evaluation==0.0.10 && touch $(BRATS_STAMP) || \
	  echo "warning: brats-evaluation not installed; its cross-check test will skip" >&2

demo: $(STAMP)
	$(BIN)/tumorseg demo

test: $(STAMP) $(BRATS_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/engine_layers.py
	$(BIN)/python benchmarks/dense_vs_patch.py --threads 2
	$(BIN)/python benchmarks/train_throughput.py --threads 2
	$(BIN)/python benchmarks/segment_case.py --models two_path input_cascade --batch 4

clean:
	rm -rf $(VENV) $(BRATS_VENV)
