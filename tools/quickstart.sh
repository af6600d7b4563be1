#!/usr/bin/env bash
# The whole journey on the bundled sample: convert, inspect, stream and resume, train a tiny
# model on the CPU, kill it mid-run, resume it, and plot the run. A few minutes on 2 cores.
#   bash tools/quickstart.sh [OUT_FOLDER]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/quickstart}"
DATA="$OUT/tokens"
RUN="$OUT/run"
STEPS=40
rm -rf "$OUT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== 1. convert the sample corpus into 128-token training rows (plus one target token)"
streamshards convert streamshards/data/sotu-c4.json.gz "$DATA" \
    --tokenizer streamshards/data/tokenizer.json --seq-len 129 --workers 2 --compression none
streamshards inspect "$DATA"
streamshards verify "$DATA"

echo "== 2. stream it with 2 workers, save the loader state, resume it in a new loader"
python tools/stream_demo.py "$DATA" --batch 8 --steps 5 --workers 2

echo "== 3. train the tiny model; kill it with SIGKILL a few steps after its checkpoint at step 20"
python -m trainer.pretrain tiny data.local="$DATA" run_dir="$RUN" max_steps=$STEPS \
    save_interval=20 > "$OUT/train-1.log" 2>&1 &
TRAINER=$!
steps_done() { grep -c '"loss"' "$RUN/metrics.jsonl" 2>/dev/null || true; }
until [ -f "$RUN/checkpoints/step_00000020/COMPLETE" ] && [ "$(steps_done)" -ge 24 ]; do
    if ! kill -0 "$TRAINER" 2>/dev/null; then
        cat "$OUT/train-1.log"; echo "the trainer stopped before its first checkpoint"; exit 1
    fi
    sleep 0.5
done
kill -9 "$TRAINER" 2>/dev/null || true
wait "$TRAINER" 2>/dev/null || true
grep '^step' "$OUT/train-1.log" | tail -n 3
echo "   killed after step $(steps_done) (last checkpoint: step 20)"

echo "== 4. start it again with the same command: it resumes from the checkpoint at step 20"
python -m trainer.pretrain tiny data.local="$DATA" run_dir="$RUN" max_steps=$STEPS \
    save_interval=20 2>&1 | grep -E '^step|event' | grep -E 'resume|step +(21|22|40) ' || true

python - "$RUN/metrics.jsonl" <<'PY'
import json, sys
seen, same = {}, []
for line in open(sys.argv[1]):
    row = json.loads(line)
    if "loss" in row:
        if row["step"] in seen:
            same.append(seen[row["step"]] == row["loss"])
        seen[row["step"]] = row["loss"]
print(f"   steps run both before the kill and after the resume: {len(same)}, "
      f"losses identical: {all(same) and bool(same)}")
PY

echo "== 5. plot the run"
python -m trainer.plot "$RUN"
echo "done: shards in $DATA, run in $RUN"
