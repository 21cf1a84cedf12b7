#!/usr/bin/env bash
# One short check (<= 5 min on one GPU) that masktrain's CUDA paths run, with every ratio printed.
#
#   benchmarks/gpu_check.sh                 # run it (needs a CUDA device visible to torch)
#   benchmarks/gpu_check.sh --dry-run       # print the commands only (any machine)
#   benchmarks/gpu_check.sh --out DIR       # keep runs, reports and the log in DIR (default: a temp dir)
#
# Steps: the CUDA test set (tests/test_device.py with MASKTRAIN_TEST_DEVICE=cuda: fills, masks,
# layer masking, training step, bf16) ; one epoch of recipe=mask_aug and of recipe=layer_mask_aug
# with trainer.accelerator=gpu ; evaluate.py on the mask_aug run with device=cuda ;
# benchmarks/layer_masking.py and benchmarks/masks.py on CUDA (ResNet-50, batch 64, 224²,
# fp32 and bf16 autocast). The log is tee'd to DIR/gpu_check.log and its ratio lines are
# repeated at the end. Exit status: 0 all steps passed; 3 no CUDA device; 2 bad arguments;
# otherwise the status of the first step that failed.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

DRY_RUN=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run) DRY_RUN=1; shift ;;
    --out)
      [[ $# -ge 2 && -n "$2" ]] || { echo "gpu_check: --out needs a directory" >&2; exit 2; }
      OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1


make_steps() {  # the commands, writing into $OUT
STEPS=(
  "MASKTRAIN_TEST_DEVICE=cuda $PYTHON -m pytest -q -p no:cacheprovider tests/test_device.py"
  "$PYTHON train.py recipe=mask_aug trainer.accelerator=gpu trainer.devices=1 trainer.max_epochs=1 trainer.enable_progress_bar=false data.num_workers=2 logger=csv hydra.run.dir=$OUT/mask_aug"
  "$PYTHON train.py recipe=layer_mask_aug trainer.accelerator=gpu trainer.devices=1 trainer.max_epochs=1 trainer.enable_progress_bar=false data.num_workers=2 logger=csv hydra.run.dir=$OUT/layer_mask_aug"
  "$PYTHON evaluate.py checkpoint=$OUT/mask_aug/checkpoints/last.ckpt device=cuda n_images=500 'methods=[black,grey,layer]' hydra.run.dir=$OUT/evaluate"
  "$PYTHON benchmarks/layer_masking.py --device cuda --arch resnet50 --batch 64 --size 224 --repeats 10 --precision fp32 bf16"
  "$PYTHON benchmarks/masks.py --device cuda --sizes 224 --batch 64 --repeats 10 --share-arch resnet50 --share-size 224 --share-batch 64 --precision fp32 bf16"
)
}

if [[ $DRY_RUN -eq 1 ]]; then
  [[ -n "$OUT" ]] || OUT="${TMPDIR:-/tmp}/masktrain-gpu-check.XXXXXX"  # nothing is created in a dry run
  make_steps
  echo "gpu_check (dry run): would write into $OUT and run:"
  for step in "${STEPS[@]}"; do echo "  $step"; done
  exit 0
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device is visible to torch ($("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'torch not importable')); run it on a machine with a GPU, or --dry-run to see the commands" >&2
  exit 3
fi

[[ -n "$OUT" ]] || OUT="$(mktemp -d "${TMPDIR:-/tmp}/masktrain-gpu-check.XXXXXX")"
mkdir -p "$OUT"
make_steps
LOG="$OUT/gpu_check.log"
{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO"
  "$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}")'
} | tee "$LOG"
n=0
for step in "${STEPS[@]}"; do
  n=$((n + 1))
  echo -e "\n== step $n/${#STEPS[@]}: $step" | tee -a "$LOG"
  start=$(date +%s)
  set +e
  bash -c "$step" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  set -e
  echo "== step $n: exit $status, $(( $(date +%s) - start )) s" | tee -a "$LOG"
  if [[ $status -ne 0 ]]; then
    echo "gpu_check: step $n failed (exit $status); log: $LOG" >&2
    exit "$status"
  fi
done
echo -e "\n== ratios" | tee -a "$LOG"
grep -E "ratio|goal|share|identical|acc_clean|passed|failed" "$LOG" | grep -v "^== " | tee -a "$LOG.ratios" || true
echo "gpu_check: all ${#STEPS[@]} steps passed; log: $LOG"
