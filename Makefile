# `make test` and `make demo` create .venv when it is missing and install the project into it, with every
# extra the tests use (meshes, tensorboard, wandb).
# Without CUDA (no nvidia-smi) torch is pinned to the 2.13.0 CPU build first, so `torch>=2.3`
# in setup.cfg is already satisfied and pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo
DEMO_SCENES ?= 200
DEMO_STEPS ?= 100

DEMO_REAL ?= demo-real
DEMO_REAL_OBJECTS ?= 300
DEMO_REAL_TIME ?= 120

.PHONY: test demo demo-real install clean-demo gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: keeping/installing your CUDA torch"; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev,meshes,tensorboard,wandb]'
	touch $@

# The full suite, slow learning checks included (plain `pytest` leaves them out: see setup.cfg).
test: install
	$(PY) -m pytest -x -q -m 'slow or not slow'

demo: install
	$(PY) tools/make_scenes.py --scenes $(DEMO_SCENES) --out $(DEMO)/scenes --overwrite
	$(PY) tools/make_shards.py $(DEMO)/scenes --out $(DEMO)/shards --overwrite
	$(PY) tools/verify_shards.py $(DEMO)/shards
	$(PY) train/run.py compare --shards $(DEMO)/shards --out $(DEMO)/compare --max-steps $(DEMO_STEPS) --log-every 5 --overwrite

# Real objects: pybullet's random_urdfs meshes imported with the seed's conventions and labels from
# our hand model, shards, a short training run (DEMO_REAL_TIME seconds), eval and predict on the test split.
demo-real: install
	$(PY) tools/pybullet_objects.py --out $(DEMO_REAL)/raw --limit $(DEMO_REAL_OBJECTS)
	$(PY) tools/import_meshes.py $(DEMO_REAL)/raw --out $(DEMO_REAL)/scenes --label synth --skip-bad --overwrite
	$(PY) tools/make_shards.py $(DEMO_REAL)/scenes --out $(DEMO_REAL)/shards --overwrite
	$(PY) train/run.py fit --shards $(DEMO_REAL)/shards --out $(DEMO_REAL)/run --max-time $(DEMO_REAL_TIME) -S 8 -G 64 --val-every 200 --early-stopping 0 --overwrite --quiet
	$(PY) train/run.py eval $(DEMO_REAL)/run/best.pt --shards $(DEMO_REAL)/shards --split test
	$(PY) train/run.py predict $(DEMO_REAL)/run/best.pt --shards $(DEMO_REAL)/shards --split test --out $(DEMO_REAL)/predictions.parquet --top-k 3

clean-demo:
	rm -rf $(DEMO) $(DEMO_REAL)

# The GPU check (README, "GPU check"): the machine's own torch, nothing installed but staged DALI wheels.
# On a machine without CUDA: make gpu-check GPU_CHECK_ARGS="--device cpu --quick"
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	benchmarks/gpu_check.sh $(GPU_CHECK_OUT) --overwrite $(GPU_CHECK_ARGS)
