# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment .venv on first use and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test test-slow lint package clean

$(STAMP): pyproject.toml
	@# the CPU convolution engines (jaxconv/ops/*.cc) are compiled on first use: a C++ compiler,
	@# installed with apt when there is none and we may (root)
	@command -v $${CXX:-c++} >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	    && apt-get update -qq && apt-get install -y -qq g++; } \
	    || echo "WARNING: no C++ compiler (install g++ or clang++, or set CXX); CPU convolutions" \
	            "fall back to pure JAX and the kernel tests fail"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# a real training run: MobileNet-v1 on scikit-learn's handwritten digits (no download), ~1-2 min
# on 2 CPU cores, ending with the validation accuracy; a fresh run each time (runs/demo is removed)
demo: $(STAMP)
	rm -rf runs/demo
	$(PY) -m train.imagenet --model mobilenet_v1 --dataset digits --image-size 32 \
	    --batch-size 64 --num-epochs 5 --warmup-epochs 0.5 --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check .

# the installable package: build the sdist and the wheel, install the wheel without its
# dependencies (the venv has them) into an empty folder, and smoke-test it from there
package: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist . >/dev/null
	d=$$(mktemp -d) && $(PY) -m pip install --quiet --no-deps --target $$d/site dist/*.whl \
	    && cd $$d && JAXCONV_CACHE_DIR=$$d/cache PYTHONPATH=$$d/site $(CURDIR)/$(PY) \
	        $(CURDIR)/.ci/wheel_smoke.py $$d/site $(CURDIR)/dist/*.whl && rm -rf $$d

clean:
	rm -rf $(VENV) .pytest_cache dist build *.egg-info
