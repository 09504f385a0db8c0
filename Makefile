# The two commands of README.md.
PY := .venv/bin/python

.PHONY: smoke test test-fast test-gpu lint setup

setup: .venv/.installed

.venv/.installed: pyproject.toml constraints/cpu.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

smoke: setup  ## set up, then fine-tune the tiny model on the bundled corpus (CPU, ~1 min)
	WANDB_MODE=offline $(PY) -m phi4_pron.train experiment=smoke

test: setup  ## set up, then run the test suite
	$(PY) -m ruff check phi4_pron tests
	$(PY) -m pytest -q

test-fast: setup  ## the edit loop: every test but the slow ones (entrypoint runs, sweeps, DDP, learning)
	$(PY) -m ruff check phi4_pron tests
	$(PY) -m pytest -q -m "not slow"

test-gpu:  ## the GPU tier: each fast path against the plain one on a GPU (an installed CUDA torch, no set-up)
	python3 -m pytest -q -m gpu tests

lint: setup
	$(PY) -m ruff check phi4_pron tests && $(PY) -m ruff format --check phi4_pron tests
