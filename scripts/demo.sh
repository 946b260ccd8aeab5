#!/usr/bin/env bash
# Run the gateway on 127.0.0.1:8000 with tiny CPU models (the first run sets up vLLM for the CPU: ~3 min).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec .venv/bin/onecard demo "$@"
