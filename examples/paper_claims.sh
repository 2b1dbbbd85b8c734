#!/bin/bash
# docs/paper-claims.md in one command:  bash examples/paper_claims.sh OUT_DIR
# (about 65 min on one core of a busy 2-core CPU; see the page for the measured times).
# ΔD–ΔM runs (FT / LoRA / DoRA, ΔM / ΔD recorded every 10 or 20 steps), their analyses, the seed sweep, the report.
set -euo pipefail
OUT=${1:?usage: bash examples/paper_claims.sh OUT_DIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
M=$(python -c "from dorakit.commands.demo import model_dir; print(model_dir())")
python -c "from pathlib import Path; from dorakit.commands.demo import write_split; write_split(Path('$OUT/data'), 0, 2000, 500)"
D=(--model "$M" --task classify --data "$OUT/data/train.jsonl" --eval-data "$OUT/data/test.jsonl" --eval-limit 500
   --batch-size 16 --max-len 48 --device cpu --log-every 20 --seed 0 --rank 8 --alpha 16)
run() {  # setting method lr steps every
  dorakit finetune "${D[@]}" --method "$2" --lr "$3" --max-steps "$4" --warmup-steps $(($4 / 10)) \
      --record-deltas "$5" --output-dir "$OUT/dd/$1-$2"
  rm -rf "$OUT/dd/$1-$2/checkpoints" "$OUT/dd/$1-$2/final"
}
for m in full lora dora; do [ $m = full ] && lr=1e-4 || lr=2e-3; run base $m $lr 120 10; done
for m in full lora dora; do [ $m = full ] && lr=2e-5 || lr=5e-4; run lowlr $m $lr 120 10; done
for m in full lora dora; do [ $m = full ] && lr=1e-4 || lr=2e-3; run long $m $lr 200 20; done
for s in base lowlr long; do
  dorakit analyze --runs "$OUT"/dd/$s-* --output-dir "$OUT/analysis/$s" --module-type query \
      --view per-checkpoint --checkpoints 4
done
dorakit sweep --config "$HERE/paper_claims_sweep.yaml" --model "$M" --data "$OUT/data/train.jsonl" \
    --eval-data "$OUT/data/test.jsonl" --output-dir "$OUT/sweep"
python "$HERE/paper_claims_report.py" "$OUT" "$OUT"
