# The two quickstart commands (see README.md). Both set up .venv first (idempotent).
.PHONY: setup demo test soak bench floors

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

# The oldest versions pyproject.toml allows, on its oldest Python, with a fast test subset (.venv-floors).
floors:
	./scripts/floors
