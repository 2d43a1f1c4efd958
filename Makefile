# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment .venv on first use and installs the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	@# the CPU convolution kernel (jaxconv/ops/grouped_cpu.cc) is compiled on first use
	@command -v $${CXX:-c++} >/dev/null || (apt-get update -qq && apt-get install -y -qq g++) \
	    || echo "WARNING: no C++ compiler; grouped convs fall back to pure JAX, kernel tests fail"
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

clean:
	rm -rf $(VENV) .pytest_cache
