#!/usr/bin/env bash
# The README's fit table: compiles every paper config (and the other families') for its TPU
# slice, S2 and full attention, one compile at a time (70B takes minutes and several GB of
# host RAM), then prints markdown.
#
#   launch/aot_table.sh [OUT_DIR] [--dry-run]     (reports: OUT_DIR/NAME.json, default runs/aot)
#
# A config that does not fit still writes its report; the table says so.
set -euo pipefail

OUT="runs/aot" DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -*) echo "error: unknown argument '$arg'" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
cd "$(dirname "$0")/.."

# config:TPU slice (the slice may hold a colon itself: v5p:1x1x1)
RUNS=(
  llama2_7b_32k:v4-8 llama2_7b_100k:v4-8 llama2_70b_32k:v4-16 llama2_7b_8k:v4-8
  llama2_7b_16k:v4-8 llama2_13b_65k:v4-8 llama3_8b_64k:v4-8 longalpaca_sft_16k:v4-8
  mistral_7b_32k:v4-8 qwen25_7b_32k:v4-8 pythia_6_9b_16k:v4-8 llama2_70b_32k_qlora:v4-8
  llama2_7b_100k_one_chip:v5p:1x1x1
)
for run in "${RUNS[@]}"; do
  name="${run%%:*}" topology="${run#*:}"
  CMD=(python -m longlora_jax.aot --config "configs/$name.py" --topology "$topology"
       --compare-full --json "$OUT/$name.json")
  printf '+'
  printf ' %q' "${CMD[@]}"
  printf '\n'
  if [ "$DRY_RUN" = 0 ]; then
    "${CMD[@]}" || echo "($name: exit status $?)"
  fi
done
if [ "$DRY_RUN" = 0 ]; then
  python -m longlora_jax.aot --table "$OUT"
fi
