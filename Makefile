# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install the pinned dependencies and sitegen, build the demo atlas
#   make test   the whole test suite (installs first if needed)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-gpu docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The only torch/torchvision pair that installs here (others fail: torchvision::nms does not exist).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sitegen demo --out demo-atlas

test: $(STAMP)
	$(PY) -m pytest -q

# The bench also compares scikit-learn's t-SNE with openTSNE (the optional tsne extra).
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[tsne]'
	$(PY) bench/bench.py

# On a machine with a CUDA GPU: ResNet-50 at 224 px and ResNet-56, every pass, under 8 minutes
# (bench/gpu_bench.py); figures to bench/results-gpu.json.
bench-gpu: $(STAMP)
	$(PY) bench/bench.py --device cuda

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf demo-atlas site .pytest_cache
