# The two commands of the README. Both create .venv/ from scratch when it is missing or stale.
.PHONY: demo test bench env openpi-env repro repro-quick

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

env:
	@bash scripts/bootstrap.sh

demo: env
	.venv/bin/apt-plugins demo

# Two workers (CI has 2 cores); a test module stays on one worker so its module-scoped fixtures
# (trained checkpoints) are built once, and one torch thread per worker avoids oversubscription.
test: env openpi-env
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -n 2 --dist loadfile --durations=15
	@if [ -x .venv-openpi/bin/python ]; then OMP_NUM_THREADS=1 .venv-openpi/bin/python -m pytest tests/openpi_env -n 2 --dist loadfile; \
	else echo "==> openpi tests skipped: no .venv-openpi (no openpi snapshot; see docs/openpi.md)"; fi

# The second environment for the native openpi adapter (openpi pins transformers 4.53.2): .venv-openpi/.
openpi-env:
	@bash scripts/bootstrap_openpi.sh

bench: env
	.venv/bin/python benchmarks/bench_pi.py

# The CPU-scale reproduction (about 45 minutes on 2 cores, VLM pretraining included); writes docs/repro_results.md and its plots.
repro: env
	OMP_NUM_THREADS=1 .venv/bin/apt-plugins repro --report docs/repro_results.md

repro-quick: env
	OMP_NUM_THREADS=1 .venv/bin/apt-plugins repro --quick --workdir runs/repro-quick
