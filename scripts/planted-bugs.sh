#!/usr/bin/env bash
# Proves that the CUDA parity suite on the emulated device (issue 14, item 4) can fail: plants three
# bugs in the CUDA backend's Rust, one at a time, in a scratch worktree of HEAD, and checks that the
# named test of tests/cuda.rs fails on each — a grid one tile short, two launch arguments of one
# type swapped (arguments of different types, or a missing one, no longer compile: launches are
# typed, src/backend/cuda/launch.rs), a tensor offset by 4 bytes — and one in a kernel: a __syncthreads removed (the emulated device
# alternates thread schedules so that a race shows). Each line of the closing table says which case caught which bug and why.
# Not part of CI (three builds); run by hand after changing the backend or the emulated device:
#   scripts/planted-bugs.sh            (about 6 minutes here: one dependency build, then incremental)
# Needs what the tests need (scripts/install-cuda-toolchain.sh, g++). Exit status 1 if a bug is missed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
wt=$(mktemp -d /tmp/roentgen-planted.XXXXXX)
git -C "$root" worktree add --detach --quiet "$wt" HEAD
trap 'git -C "$root" worktree remove --force "$wt" >/dev/null 2>&1 || true' EXIT
# Its own target folder: the planted binaries must never replace the real ones in target/.
export CARGO_TARGET_DIR="$root/target/planted-bugs"
[ -e "$wt/.cuda-toolchain" ] || ln -s "$root/.cuda-toolchain" "$wt/.cuda-toolchain"

# name | file | exact text | planted text | the case that must fail ("\n" in a text: a newline)
bugs=(
  "grid one tile short|src/backend/cuda/conv.rs|let grid_x = m.div_ceil(bm);|let grid_x = (m / bm).max(1);|f32/conv2d_forward"
  "two launch arguments of one type swapped|src/backend/cuda/ops.rs|a: self.dptr(a),\n                b: self.dptr(b),\n                rows: rows as i32,|a: self.dptr(b),\n                b: self.dptr(a),\n                rows: rows as i32,|f32/concat_channels_forward"
  "a tensor offset by 4 bytes|src/backend/cuda/ops.rs|EwAdd { out: self.dptr(out), a: self.dptr(a),|EwAdd { out: self.dptr(out), a: self.dptr(a) + 4,|f32/add_forward"
  "a __syncthreads removed (kernel)|kernels/elementwise.cu|s_part[threadIdx.y][threadIdx.x] = s;\n    __syncthreads();|s_part[threadIdx.y][threadIdx.x] = s;|f32/add_bias_rows_backward"
)

missed=0
table=""
for bug in "${bugs[@]}"; do
  IFS='|' read -r name file from to case <<<"$bug"
  git -C "$wt" checkout --quiet -- .
  python3 - "$wt/$file" "$from" "$to" <<'EOF'
import sys
path, old, new = (a.replace("\\n", "\n") for a in sys.argv[1:])
s = open(path).read()
if s.count(old) != 1:
    sys.exit(f"{path}: the text to plant over occurs {s.count(old)} times (expected once): {old}")
open(path, "w").write(s.replace(old, new))
EOF
  echo "== planted: $name ($file), expecting '$case' to fail"
  log="$CARGO_TARGET_DIR/planted-$(echo "$name" | tr ' ' '-').log"
  mkdir -p "$CARGO_TARGET_DIR"
  set +e
  (cd "$wt" && cargo test --release --features cuda-emu --test cuda -- "$case") >"$log" 2>&1
  rc=$?
  set -e
  if [ $rc -ne 0 ] && grep -q "^test $case.* FAILED" "$log"; then
    why=$(grep -m1 "^test $case.* FAILED" "$log" | cut -c1-220)
    table+="caught  | $name | $why"$'\n'
  else
    missed=1
    table+="MISSED  | $name | exit $rc; no FAILED line for '$case' (log: $log)"$'\n'
  fi
done
echo
echo "planted bugs (tests/cuda.rs on the emulated device):"
printf '%s' "$table"
exit $missed
