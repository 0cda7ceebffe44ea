#!/usr/bin/env bash
# The STP paper's fine-tuning setup on one GPU, its smallest meaningful slice: NTP against span-form STP at
# lambda 0.02, all of NL-RX-SYNTH, 3 seeds, with the paper's regime (full fine-tuning, lr 2e-5 with linear
# decay, 4 epochs, batch 16, bfloat16 autocast, the system turn kept). About 10 minutes for a ~135M-parameter
# model on an H100 (a projection; the first command below measures it). Resumable: run it again to continue.
#
#   scripts/stp_paper_gpu.sh FOLDER [OUT]
#
# FOLDER: a transformers model folder (e.g. SmolLM2-135M-Instruct, Qwen2.5-0.5B-Instruct, Llama-3.2-1B-Instruct
# as downloaded: config.json, safetensors, tokenizer.json, chat template) or an amer folder made by `amer import`.
# The data come from $AMER_NLRX_DIR or ../shared/data/nl-rx-synth (DATA=dir overrides). DEVICE (cuda), DTYPE
# (bfloat16) and EXTRA (more flags, e.g. "--train-rows 64" for a dry run on a CPU) change the run.
set -euo pipefail
FOLDER=${1:?usage: scripts/stp_paper_gpu.sh FOLDER [OUT]}
OUT=${2:-checkpoints/nlrx-paper-slice}
if command -v amer >/dev/null 2>&1; then AMER=(amer); else AMER=(python -m amer.cli); fi
ARGS=(experiment nlrx-finetune --regime paper --init "$FOLDER" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}")
if [ -n "${DATA:-}" ]; then ARGS+=(--data-dir "$DATA"); fi
read -r -a MORE <<< "${EXTRA:-}"
ARGS+=("${MORE[@]}")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
echo "== timed steps on this GPU: how long the slice and the paper's full grid take"
"${AMER[@]}" "${ARGS[@]}" --lambdas 0,0.02 --fractions 1 --seeds 3 --out "$OUT" --estimate
"${AMER[@]}" "${ARGS[@]}" --out "$OUT-full" --estimate
echo "== the slice: NTP vs STP (span, lambda 0.02), all the data, seeds 0-2"
start=$(date +%s)
"${AMER[@]}" "${ARGS[@]}" --lambdas 0,0.02 --fractions 1 --seeds 3 --out "$OUT"
echo "== took $(( $(date +%s) - start )) s; the table ($OUT/results.md):"
sed -n '/^## Results/,/^## Verdict/p' "$OUT/results.md"
sed -n '/^## Verdict/,$p' "$OUT/results.md"
