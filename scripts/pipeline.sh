#!/usr/bin/env bash
# The whole pipeline from one YAML: scripts/pipeline.sh CONFIG OUT [key=value ...]
#   scripts/pipeline.sh configs/pipeline/demo.yaml demo_out
set -euo pipefail
config=${1:?usage: $0 CONFIG OUT [key=value ...]}
out=${2:?usage: $0 CONFIG OUT [key=value ...]}
shift 2
exec mammorg demo --config "$config" --out "$out" "$@"
