# `make test` and `make demo` create .venv when it is missing and install the project into it, with every
# extra the tests use (meshes, warp, ray, s3, docs, tensorboard, wandb, look).
# Without CUDA (no nvidia-smi) torch is pinned to the 2.13.0 CPU build first, so `torch>=2.3`
# in setup.cfg is already satisfied and pip never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= demo
# The demo learns in under two minutes on 2 CPU cores (21 s when they are idle): 16^3 grids, 256 grasps per
# scene, 64 grasps per SDF in each batch, lr 3e-3 decayed linearly over 500 steps (docs/benchmarks.md, "The demo").
DEMO_SCENES ?= 400
DEMO_GRID ?= 16
DEMO_GRASPS ?= 256
DEMO_STEPS ?= 500
GQ := $(VENV)/bin/gq

DEMO_REAL ?= demo-real
DEMO_REAL_OBJECTS ?= 300
DEMO_REAL_TIME ?= 120

.PHONY: test demo demo-real install clean-demo gpu-check docs

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: keeping/installing your CUDA torch"; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev,meshes,warp,ray,s3,docs,tensorboard,wandb,look]'
	touch $@

# The documentation site (mkdocs.yml, docs/) into site/; `make test` builds it strictly too (tests/test_docs.py).
docs: install
	$(VENV)/bin/mkdocs build --strict

# The full suite, slow learning checks included (plain `pytest` leaves them out: see setup.cfg).
test: install
	$(PY) -m pytest -x -q -m 'slow or not slow'

demo: install
	$(GQ) scenes --scenes $(DEMO_SCENES) --grid $(DEMO_GRID) --grasps-per-scene $(DEMO_GRASPS) --out $(DEMO)/scenes --overwrite
	$(GQ) shards build $(DEMO)/scenes --out $(DEMO)/shards --grid $(DEMO_GRID) --max-grasps $(DEMO_GRASPS) --overwrite
	$(GQ) shards verify $(DEMO)/shards
	$(GQ) compare --shards $(DEMO)/shards --out $(DEMO)/compare --max-steps $(DEMO_STEPS) -S 8 -G 64 --lr 3e-3 \
		--lr-schedule linear --log-every 10 --overwrite
	$(GQ) shards stats $(DEMO)/shards --out $(DEMO)/report --overwrite
	@echo
	@echo "The demo data's report (splits, scores, SDF checks, leakage, label noise): $(DEMO)/report/report.md"
	@echo "Next:"
	@echo "  $(GQ) eval $(DEMO)/compare/cache/best.pt --shards $(DEMO)/shards --split test"
	@echo "  $(GQ) predict $(DEMO)/compare/cache/best.pt --shards $(DEMO)/shards --split test --out $(DEMO)/predictions.parquet"
	@echo "  $(GQ) show $(DEMO)/shards scene_000000 --model $(DEMO)/compare/cache/best.pt --out $(DEMO)/scene.png"
	@echo "  make demo-real    # real objects: pybullet meshes imported, trained, evaluated, predicted"
	@echo "  make docs         # the documentation site in site/ (sources in docs/)"

# Real objects: pybullet's random_urdfs meshes imported with the seed's conventions and labels from
# our hand model, shards, a short training run (DEMO_REAL_TIME seconds), eval and predict on the test split.
demo-real: install
	$(GQ) pybullet-objects --out $(DEMO_REAL)/raw --limit $(DEMO_REAL_OBJECTS)
	$(GQ) import-meshes $(DEMO_REAL)/raw --out $(DEMO_REAL)/scenes --label synth --skip-bad --overwrite
	$(GQ) shards build $(DEMO_REAL)/scenes --out $(DEMO_REAL)/shards --overwrite
	$(GQ) fit --shards $(DEMO_REAL)/shards --out $(DEMO_REAL)/run --max-time $(DEMO_REAL_TIME) -S 8 -G 64 --val-every 200 --early-stopping 0 --overwrite --quiet
	$(GQ) eval $(DEMO_REAL)/run/best.pt --shards $(DEMO_REAL)/shards --split test
	$(GQ) predict $(DEMO_REAL)/run/best.pt --shards $(DEMO_REAL)/shards --split test --out $(DEMO_REAL)/predictions.parquet --top-k 3

clean-demo:
	rm -rf $(DEMO) $(DEMO_REAL)

# The GPU check (docs/gpu-check.md): the machine's own torch, nothing installed but staged DALI wheels.
# On a machine without CUDA: make gpu-check GPU_CHECK_ARGS="--device cpu --quick"
GPU_CHECK_OUT ?= gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	benchmarks/gpu_check.sh $(GPU_CHECK_OUT) --overwrite $(GPU_CHECK_ARGS)
