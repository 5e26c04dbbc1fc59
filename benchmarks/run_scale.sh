#!/usr/bin/env bash
# Scale benchmarks (issue 7): appends a dated section to benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python benchmarks/bench_scale.py "$@"
