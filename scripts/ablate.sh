#!/usr/bin/env bash
# Clinical-efficacy ablations: scripts/ablate.sh CONFIG [key=value ...]
#   scripts/ablate.sh configs/ablations/knowledge.yaml out=runs/ablation-knowledge
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}
shift
exec mammorg ablate --config "$config" "$@"
