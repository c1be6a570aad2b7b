# Every target creates .venv and installs what it needs.
# torch 2.13.0 is installed first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tumorseg demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/dense_vs_patch.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/segment_case.py

clean:
	rm -rf $(VENV)
