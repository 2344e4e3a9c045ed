#!/usr/bin/env bash
# Issue 21: how often img2img paints the finding a prompt asks for into a real "no finding" image.
# The bundled demo model edits N no-finding phantoms (64×64) with "Large left pleural effusion.",
# "Large right pleural effusion." and, as a control, "No acute cardiopulmonary process.";
# `eval phantom` then measures each edit (is an effusion there, on which side) with the phantoms'
# own geometry. Seeds are the images' indices, so the run is reproducible.
#
#   scripts/img2img-phantom-edits.sh OUT [STRENGTH] [N] [STEPS]     (defaults 0.7, 64, 75)
#   MASK=lower scripts/img2img-phantom-edits.sh OUT 1.0                (inpainting: the lower half)
#
# Writes OUT/edit-{left,right,none}/*.png, OUT/eval-*.json and OUT/results.md.
set -euo pipefail
OUT=${1:?usage: $0 OUT [STRENGTH] [N] [STEPS]}
STRENGTH=${2:-0.7} N=${3:-64} STEPS=${4:-75}
BIN=${BIN:-target/release/roentgen}
mkdir -p "$OUT"
MASK_ARGS=()
if [ "${MASK:-}" = lower ]; then
  # A 64×64 gray PNG, white (repaint) in the lower half, with the standard library only.
  python3 - "$OUT/mask-lower.png" <<'PY'
import struct, sys, zlib
w = h = 64
rows = b"".join(b"\0" + bytes([255 if y >= h // 2 else 0] * w) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
open(sys.argv[1], "wb").write(png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
  MASK_ARGS=(--mask "$OUT/mask-lower.png")
fi
"$BIN" phantom --out "$OUT/inputs" --count $((N * 5)) --size 64 --seed 3 >/dev/null
# The first N phantoms without any finding.
mapfile -t INPUTS < <(python3 - "$OUT/inputs/manifest.jsonl" "$N" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
picked = [r["image"] for r in rows if r["labels"]["no_finding"]][: int(sys.argv[2])]
if len(picked) < int(sys.argv[2]):
    sys.exit(f"only {len(picked)} no-finding phantoms")
print("\n".join(picked))
PY
)
declare -A PROMPT=([left]="Large left pleural effusion." [right]="Large right pleural effusion."
  [none]="No acute cardiopulmonary process.")
for kind in left right none; do
  for i in "${!INPUTS[@]}"; do
    "$BIN" sample --init-image "$OUT/inputs/${INPUTS[$i]}" --strength "$STRENGTH" --steps "$STEPS" \
      --prompt "${PROMPT[$kind]}" --seed "$i" --out "$OUT/edit-$kind/" --skip-existing "${MASK_ARGS[@]}" 2>/dev/null
  done
  "$BIN" eval phantom --images "$OUT/edit-$kind" --json >"$OUT/eval-$kind.json"
done
python3 - "$OUT" "$STRENGTH" "$N" "$STEPS" "${MASK:-}" <<'PY' | tee "$OUT/results.md"
import json, sys
out, strength, n, steps, mask = sys.argv[1:]
how = "inpainting (lower half)" if mask else "img2img"
print(f"{how} of {n} no-finding phantoms (64×64) with the bundled demo model: strength {strength}, {steps} steps, "
      "guidance 4, seed = image index; measured by `roentgen eval phantom`\n")
print("| prompt | class measured | images | finding shown | on the asked side | another finding |")
print("|---|---|---:|---:|---:|---:|")
for kind, cls, prompt in (("left", "effusion-left", "Large left pleural effusion."),
                          ("right", "effusion-right", "Large right pleural effusion."),
                          ("none", "no-finding", "No acute cardiopulmonary process.")):
    c = json.load(open(f"{out}/eval-{kind}.json"))["classes"][cls]
    side = "–" if c["side"] is None else f"{c['side']:.0%}"
    print(f"| {prompt} | {cls} | {c['images']} | {c['shown']:.0%} | {side} | {c['other_findings']:.0%} |")
PY
