# The two set-up commands of the README:
#   make demo   build .venv if needed, then run the embedded CPU demo end to end
#   make test   build .venv if needed, then run the test suite
.PHONY: demo test venv bench clean

# Two cores on the reference machine: keep torch from oversubscribing them.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

demo: venv
	.venv/bin/bridge-sft demo

test: venv
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench: venv
	.venv/bin/python benchmarks/run.py

venv:
	@bash tools/venv.sh

clean:
	rm -rf .venv .pytest_cache
