# The two commands of the quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python builds from source; a portable binary runs on any x86-64 CPU.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: demo test test-slow test-ray fuzz soak serve install lint clean

$(BIN)/pictoprompt: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(BIN)/pictoprompt

install: $(BIN)/pictoprompt

demo: install
	$(BIN)/pictoprompt demo -o demo-output

# The fast suite (under 3 minutes on two cores) and ruff; `test-slow` adds the tests marked slow (the wheel in a
# clean venv, the LLM stage, both LLM backends on the shipped adapter), which CI runs too.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not gpu and not ray"
	$(BIN)/ruff check pictoprompt tests benchmarks

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow and not gpu and not ray"

# Serving on Ray Serve (`serve --http --ray`): installs the `ray` extra, then starts a local Ray with two replicas.
test-ray: install
	$(BIN)/python -m pip install -e ".[ray]"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ray

# Reliability runs of issue 39 (lab/results/reliability.md): 5,000 schema-generated calls per transport on the tiny
# profile, and a 20-minute soak on the shapes profile from 4 clients over both transports.
fuzz: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m lab.reliability.fuzz --calls 5000 --json lab/results/fuzz.json

soak: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m lab.reliability.soak --minutes 20 --json lab/results/soak.json

serve: install
	$(BIN)/pictoprompt serve

lint: install
	$(BIN)/ruff check pictoprompt tests benchmarks
	$(BIN)/ruff format --check pictoprompt tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
