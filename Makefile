# The README's two commands. Both set everything up from a bare Python 3.11.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-all gpu-check setup clean graphviz chromium

setup: $(STAMP)

# torch is pinned to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(MAKE) --no-print-directory graphviz
	$(MAKE) --no-print-directory chromium
	touch $(STAMP)

# caffe.draw renders through Graphviz's `dot`. Installed with apt where we are root (CI);
# elsewhere a note says what to install (everything else works without it).
graphviz:
	@if command -v dot >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q graphviz >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q graphviz >/dev/null) || \
	  echo "note: could not install graphviz; caffe.draw needs it (apt-get install graphviz)"; \
	else echo "note: Graphviz 'dot' is missing; caffe.draw needs it (apt-get install graphviz)"; fi

# The dashboard's browser tests drive Debian's Chromium through its chromedriver (Selenium).
# Installed with apt where we are root (CI); elsewhere those tests are skipped and say why.
chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q chromium chromium-driver >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null) || \
	  echo "note: could not install chromium; the dashboard's browser tests will be skipped"; \
	else echo "note: chromium/chromedriver missing; the dashboard's browser tests will be skipped (apt-get install chromium chromium-driver)"; fi

train: $(STAMP)
	$(PY) tools/train_default.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

# On a machine with a CUDA GPU: the CUDA tests (marked cuda; skipped elsewhere) and the GPU
# inference benchmark, written to results/bench/<date>-gpu.md/.json. The venv needs a CUDA
# build of torch; with the CPU wheel this stops at the first line and says so.
gpu-check: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else \
	  'gpu-check: PyTorch ' + torch.__version__ + ' sees no CUDA device. On a GPU machine ' \
	  'put a CUDA build of torch 2.13.0 in $(VENV) (pip install --index-url ' \
	  'https://download.pytorch.org/whl/cu128 torch==2.13.0) and run it again.')"
	$(PY) -m pytest -q -m cuda -rs
	$(PY) benchmarks/gpu.py

clean:
	rm -rf $(VENV) runs *.egg-info
