# The two commands: `make demo` runs the live demo, `make test` runs the test suite.
# Both install what is missing first (scripts/bootstrap.sh).
.PHONY: demo test lint bench schema grids
export PATH := $(PATH):/usr/sbin

demo:
	@scripts/bootstrap.sh demo
	.venv/bin/gateway demo

test:
	@scripts/bootstrap.sh test
	.venv/bin/ruff check .
	.venv/bin/mypy contract aggregator edge simulators
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy contract aggregator edge simulators

bench:
	.venv/bin/python bench/bench_ingest.py
	.venv/bin/python bench/bench_pipeline.py
	.venv/bin/python bench/bench_mqtt_client.py
	.venv/bin/python bench/bench_edge.py
	.venv/bin/python bench/bench_geo.py

schema:
	.venv/bin/python -m contract.schema_export

grids:
	.venv/bin/python scripts/gen_grids.py
