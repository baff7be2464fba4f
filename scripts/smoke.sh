#!/usr/bin/env bash
# The whole pipeline on a CPU with no network: offline dataset -> small model -> int6+zstd artifact ->
# round-trip and sliding-window scores. Extra environment variables override the settings below.
# Step-bounded (no wall-clock cap), so a busy machine takes longer but gets the same score.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
if [ ! -f data/datasets/pydocs_sp1024/fineweb_val_000000.bin ]; then
  echo "building the offline dataset (data/build_dataset.py, once)"
  python data/build_dataset.py
fi
export DATA_PATH="${DATA_PATH:-./data/datasets/pydocs_sp1024}"
export TOKENIZER_PATH="${TOKENIZER_PATH:-./data/tokenizers/pydocs_1024_bpe.model}"
export RUN_ID="${RUN_ID:-smoke-$(date +%Y%m%d-%H%M%S)}"
export DEVICE="${DEVICE:-cpu}" VOCAB_SIZE="${VOCAB_SIZE:-1024}"
export NUM_LAYERS="${NUM_LAYERS:-4}" MODEL_DIM="${MODEL_DIM:-128}" NUM_HEADS="${NUM_HEADS:-4}"
export NUM_KV_HEADS="${NUM_KV_HEADS:-2}" TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-256}"
export TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-8192}" GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-1}"
export ITERATIONS="${ITERATIONS:-160}" WARMDOWN_ITERS="${WARMDOWN_ITERS:-60}" WARMUP_STEPS="${WARMUP_STEPS:-2}"
export MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}" VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-80}"
export TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-25}" VAL_BATCH_SIZE="${VAL_BATCH_SIZE:-65536}"
export EVAL_STRIDE="${EVAL_STRIDE:-64}" MUON_MOMENTUM_WARMUP_STEPS="${MUON_MOMENTUM_WARMUP_STEPS:-100}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
status=0
python train_gpt.py || status=$?
echo "log: ${LOG_DIR:-logs}/$RUN_ID.txt  summary: ${LOG_DIR:-logs}/$RUN_ID.json (written if it finished)"
exit $status
