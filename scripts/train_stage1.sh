#!/usr/bin/env bash
# Train stage 1: scripts/train_stage1.sh CONFIG [key=value ...]
#   one GPU or CPU:  scripts/train_stage1.sh configs/stage1/default.yaml data.cache_manifest=cache/manifest.jsonl
# All hyper-parameters live in the YAML; extra arguments are overrides.
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}
shift
exec mammorg stage1 train --config "$config" "$@"
