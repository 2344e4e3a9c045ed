#!/usr/bin/env bash
# Measures whether a phantom model follows its prompts (issue 7): 64 held-out impressions per prompt
# class (single-finding phantoms of a seed the model never saw), one image each, `eval phantom`.
#
#   scripts/demo/eval-demo.sh MODEL OUT_DIR [PER_CLASS]
#   (env: BIN=path/to/roentgen picks a binary; SAMPLER="--scheduler pndm --steps 75" the sampling)
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=$1
OUT=$2
PER_CLASS=${3:-64}
BIN=${BIN:-target/release/roentgen}
# DPM-Solver++ 2M, 25 steps, guidance 4 (a third of the cost of the paper's 75 PNDM steps on a CPU)
SAMPLER=${SAMPLER:---scheduler dpm++2m --steps 25 --guidance 4}
mkdir -p "$OUT"
# held-out prompts: phantoms of seed 99 (training used seed 7), single-finding ones, PER_CLASS per class
[ -f "$OUT/heldout/manifest.jsonl" ] || $BIN phantom --out "$OUT/heldout" --count 3000 --size 64 --seed 99 > /dev/null
python3 - "$OUT/heldout/manifest.jsonl" "$PER_CLASS" > "$OUT/prompts.txt" <<'PY'
import json, sys
per = int(sys.argv[2]); picked = {}
for line in open(sys.argv[1]):
    r = json.loads(line); c = r["labels"]["classes"]
    if len(c) == 1 and len(picked.setdefault(c[0], [])) < per:
        picked[c[0]].append(r["text"])
for c in sorted(picked):
    assert len(picked[c]) == per, f"only {len(picked[c])} held-out prompts for {c}"
    print("\n".join(picked[c]))
PY
rm -rf "$OUT/samples"
$BIN sample --model "$MODEL" --prompts "$OUT/prompts.txt" --num-images 1 --seed 1234 --gray --batch-size 32 $SAMPLER \
  --out "$OUT/samples/" --json > "$OUT/sample.json"
$BIN eval phantom --images "$OUT/samples" | tee "$OUT/eval.txt"
$BIN eval phantom --images "$OUT/samples" --json > "$OUT/eval.json"
