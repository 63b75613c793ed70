# make setup  - .venv with the pinned requirements, and the extension built
# make test   - the test suite (what CI runs)
# make bench  - self-check, then the quick benchmark (table, JSON and PNG)
# make bench-host - the host's time per call on tiny tensors (table and JSON)
# make test-distributed-loop N=50 - the distributed tests N times in a row beside a busy core
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.extension-installed
DEVICE ?= cpu

# nvcc lives here on the development machines; torch would guess /usr/local.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

# Without a GPU the CUDA build only proves the code compiles: for one
# architecture nvcc takes about a minute, for a pip install's default (every
# architecture torch supports, README "Install") 2.5 minutes. With a GPU, torch
# builds for that GPU.
ifeq ($(shell nvidia-smi -L 2>/dev/null),)
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

SOURCES := setup.py torch_safebn/contract.def torch_safebn/ops.def $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh')

.PHONY: setup build test test-distributed-loop bench bench-host clean

setup: build

$(DEPS): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The editable install registers the package and the torch-safebn script
# only; build_ext --inplace builds the extension and rebuilds only what
# changed (ninja), with the compiler's output (nvcc -Xptxas -v: registers,
# spills) kept in build/build.log.
$(BUILT): $(DEPS) pyproject.toml
	SAFEBN_NO_EXTENSION=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT) $(SOURCES)
	@mkdir -p build
	$(PY) setup.py build_ext --inplace > build/build.log 2>&1 || (tail -n 60 build/build.log; exit 1)
	@if grep -q "ptxas info" build/build.log; then grep -E "ptxas (info|warning)|bytes spill" build/build.log > build/ptxas.log; fi
	@if [ -f build/ptxas.log ]; then awk '/Function properties for/ { kernel = ($$7 ~ /_kernel/) } \
	    /Used [0-9]+ registers/ && kernel { n++; r = $$5 + 0; if (r > max) max = r } \
	    /spill/ && !/0 bytes spill stores, 0 bytes spill loads/ && kernel { spills++ } \
	    END { printf "CUDA kernels: %d, at most %d registers, %d with spills (build/ptxas.log)\n", n, max, spills }' build/ptxas.log; fi

test: build
	$(PY) -m pytest -q tests

# A teardown race or a hang shows itself once in tens of runs, and sooner when
# the ranks compete for the cores: the loop keeps one core busy and counts.
N ?= 50
test-distributed-loop: build
	@mkdir -p build/distributed-loop
	@yes > /dev/null & load=$$!; trap "kill $$load" EXIT; failed=0; \
	for i in $$(seq $(N)); do \
	    log=build/distributed-loop/run-$$i.log; \
	    if $(PY) -m pytest -q -p no:cacheprovider tests/test_distributed.py > $$log 2>&1; \
	    then echo "run $$i: $$(tail -n 1 $$log)"; else failed=$$((failed + 1)); echo "run $$i FAILED: $$log"; fi; \
	done; \
	echo "tests/test_distributed.py: $$(($(N) - failed)) of $(N) runs passed beside a busy core"; \
	test $$failed -eq 0

bench: build
	$(PY) -m torch_safebn check
	$(PY) -m torch_safebn bench --device $(DEVICE) --preset quick \
	    --json benchmarks/results/quick-$(DEVICE).json --plot benchmarks/results/quick-$(DEVICE).png

bench-host: build
	$(PY) -m torch_safebn bench --device $(DEVICE) --preset host --json benchmarks/results/host-$(DEVICE).json

clean:
	rm -rf build dist torch_safebn/_C*.so torch_safebn/_build_info.py
