#!/usr/bin/env bash
# Train stage 2: scripts/train_stage2.sh CONFIG [key=value ...]
#   NPROC=8 DS=deepspeed/zero2 scripts/train_stage2.sh stage2/tiny ...
#   multi-node: HOSTFILE=hostfile DS=deepspeed/zero3 scripts/train_stage2.sh ...
#   LAUNCHER=torchrun NPROC=2 DS=... for torchrun instead of the deepspeed launcher.
# Without NPROC/HOSTFILE it runs in this process (CPU or one GPU). Hyper-parameters live in YAML.
set -euo pipefail
config=${1:?usage: $0 CONFIG [key=value ...]}
shift
ds_args=()
if [[ -n "${DS:-}" ]]; then ds_args=("deepspeed.config=$DS"); fi
if [[ -z "${NPROC:-}" && -z "${HOSTFILE:-}" ]]; then
  exec mammorg stage2 train --config "$config" "${ds_args[@]}" "$@"
fi
if [[ "${LAUNCHER:-deepspeed}" == torchrun ]]; then
  exec torchrun --nproc_per_node "${NPROC:-1}" -m mammorg stage2 train --config "$config" "${ds_args[@]}" "$@"
fi
launcher=(deepspeed)
if [[ -n "${HOSTFILE:-}" ]]; then launcher+=(--hostfile "$HOSTFILE"); fi
if [[ -n "${NPROC:-}" ]]; then launcher+=(--num_gpus "$NPROC"); fi
exec "${launcher[@]}" --module mammorg stage2 train --config "$config" "${ds_args[@]}" "$@"
