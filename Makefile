# The two quickstart commands (see README.md). Both set up .venv first (idempotent).
.PHONY: setup demo test soak bench bench-styles bench-base-dtype floors

setup:
	./scripts/setup

demo: setup
	.venv/bin/sd-loha train --config train_configs/demo.toml

test: setup
	.venv/bin/python -m pytest -q

soak: setup
	.venv/bin/python -m pytest -q -m soak

bench: setup
	.venv/bin/python bench/bench_loader.py

# LoHA against LoRA and LoCon at equal trainable parameters on toy-sd1, two styles, three seeds (bench/RESULTS.md;
# about 35 minutes on one idle core)
bench-styles: setup
	OMP_NUM_THREADS=1 .venv/bin/python bench/bench_styles.py --out output/bench_styles

# The quality cost of an fp8 / int8 / nf4 frozen base against bf16 on toy-sd1, three seeds (bench/RESULTS.md;
# 48 min for the posters, 12 runs, on a loaded 2-core machine)
bench-base-dtype: setup
	OMP_NUM_THREADS=1 .venv/bin/python bench/bench_base_dtype.py --out output/bench_base_dtype --steps 300

# The oldest versions pyproject.toml allows, on its oldest Python, with a fast test subset (.venv-floors).
floors:
	./scripts/floors
