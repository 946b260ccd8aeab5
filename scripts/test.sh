#!/usr/bin/env bash
# The test command: lint, type-check, then every test (real CPU vLLM engines included).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
.venv/bin/ruff check engines gateway tests benchmarks
.venv/bin/mypy engines gateway tests benchmarks
# Sets up vLLM for the CPU in its own environment (cached) and the tiny test models.
.venv/bin/onecard setup-cpu-engine
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
