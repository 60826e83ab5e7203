# The course in two commands:  make course  (execute every lesson)   make test  (the test suite)
# Without npm: make course COURSE_ARGS=--no-web-assets (pages without MathJax and live widgets)
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= build/course
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup course test test-fast lab results bench exercises lint lock clean

# what the system must provide is checked first, in a second (scripts/check_prereqs.sh);
# target-specific, so `make course` checks npm and `make test` says what will be skipped
PREREQS = setup
course: PREREQS = course
test: PREREQS = test

setup:
	@VENV=$(VENV) bash scripts/check_prereqs.sh $(PREREQS) $(COURSE_ARGS)
	@VENV=$(VENV) bash scripts/setup.sh

course: setup  ## execute every notebook in full mode into $(OUT), with a results summary (on the CPU)
	EDGELLM_DEVICE=cpu $(VENV)/bin/edgellm course run --out $(OUT) $(COURSE_ARGS)

test: setup  ## the whole suite: unit, integration on the default model, every notebook in FAST mode
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup  ## unit tests on tiny models only (no default model, no kernels): under a minute
	HF_HUB_OFFLINE=1 EDGELLM_TEST_TIER=fast $(PY) -m pytest -q -m fast $(PYTEST_ARGS)

lab: setup  ## JupyterLab on the course
	$(VENV)/bin/jupyter lab --notebook-dir=.

results: setup  ## re-run the recorded sweeps in results/
	$(VENV)/bin/edgellm results --run $(SWEEPS)

bench: setup  ## measure and record BENCHMARKS.md (also regenerates the llama.cpp fixture)
	$(PY) scripts/bench.py

exercises: setup  ## write exercises/ from solutions/ (solutions replaced by stubs, checks kept)
	$(VENV)/bin/edgellm exercises generate

lint: setup  ## ruff on the package, tests, scripts and notebooks
	$(VENV)/bin/ruff check src tests scripts notebooks solutions

lock: setup  ## rewrite requirements.lock and environment.yml from the installed packages
	$(PY) scripts/lock.py

clean:
	rm -rf build
