# The two commands of the README. Both create .venv/ from scratch when it is missing or stale.
.PHONY: demo test bench env

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

env:
	@bash scripts/bootstrap.sh

demo: env
	.venv/bin/apt-plugins demo

test: env
	.venv/bin/python -m pytest

bench: env
	.venv/bin/python benchmarks/bench_pi.py
