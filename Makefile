# The two commands of the quick start: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python builds from source; a portable binary runs on any x86-64 CPU.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: demo test test-slow test-ray test-browser bench-ray conformance fuzz soak serve install lint clean

# The product and, beside it, the laboratory (lab/: training, oracle, benchmarks), which the wheel does not ship.
$(BIN)/pictoprompt: pyproject.toml lab/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]" -e ./lab
	touch $(BIN)/pictoprompt

install: $(BIN)/pictoprompt

demo: install
	$(BIN)/pictoprompt demo -o demo-output

# The fast suite (under 3 minutes on two cores) and ruff; `test-slow` adds the tests marked slow (the wheel in a
# clean venv, the LLM stage, both LLM backends on the shipped adapter), which CI runs too. The fast suite runs on
# TEST_WORKERS processes (pytest-xdist), each test file on one of them, the heaviest files first; the files that
# share the session's stdio and HTTP servers go to one worker together (tests/conftest.py), so each starts once.
TEST_WORKERS ?= 2
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not gpu and not ray and not browser and not conformance"
	$(BIN)/ruff check pictoprompt tests lab

test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "slow and not gpu and not ray and not conformance"

# Serving on Ray Serve (`serve --http --ray`): installs the `ray` extra, then starts a local Ray with two replicas.
test-ray: install
	$(BIN)/python -m pip install -e ".[ray]"
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ray

# The Ray Serve floors of issue 38 (replicas' throughput, the front's latency, a replica killed halfway, batching):
# about 4-6 minutes; run it on a quiet machine, its figures are meaningless under other load.
bench-ray: install
	$(BIN)/python -m pip install -e ".[ray]"
	HF_HUB_OFFLINE=1 $(BIN)/pictoprompt bench ray

# The app view (MCP Apps) in headless Chromium: installs the `browser` extra (playwright, which drives Debian's
# `chromium` and downloads no browser); the screenshots land in test-artifacts/app-view/.
test-browser: install
	@command -v chromium >/dev/null || { echo "test-browser needs Debian's chromium: apt-get install chromium"; exit 1; }
	$(BIN)/python -m pip install -e ".[browser]"
	HF_HUB_OFFLINE=1 PICTOPROMPT_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q -s -m browser

# The official MCP conformance suite against `serve --http --profile tiny`. It needs Node 22 (Debian's is 20): npm's
# `node@22` package ships one, installed with the suite, pinned, into .conformance/ (nothing global).
CONFORMANCE_PACKAGES := node@22 @modelcontextprotocol/conformance@0.1.16
conformance: install
	npm install --prefix .conformance --no-save --no-audit --no-fund $(CONFORMANCE_PACKAGES)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -s -m conformance tests/test_conformance.py

# Reliability runs of issue 39 (lab/results/reliability.md): 5,000 schema-generated calls per transport on the tiny
# profile, and a 20-minute soak on the shapes profile from 4 clients over both transports.
fuzz: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m lab.reliability.fuzz --calls 5000 --json lab/results/fuzz.json

soak: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m lab.reliability.soak --minutes 20 --json lab/results/soak.json

serve: install
	$(BIN)/pictoprompt serve

lint: install
	$(BIN)/ruff check pictoprompt tests lab
	$(BIN)/ruff format --check pictoprompt tests lab

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache test-artifacts .conformance
