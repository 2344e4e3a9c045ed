#!/usr/bin/env python3
"""The tables of scripts/paper-on-phantoms/run.sh from its JSON outputs, as Markdown.

    python3 scripts/paper-on-phantoms/tables.py OUT_DIR "SEEDS"
"""
import json
import statistics
import sys
from pathlib import Path

out, seeds = Path(sys.argv[1]), sys.argv[2].split()
load = lambda name: json.loads((out / name).read_text())


def cell(c):
    if c["auroc"] is None:
        return "—"
    lo_hi = c.get("interval")
    return f"{c['auroc']:.3f}" + (f" [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "")


print("### Table 3 (phantoms): the classifier trained on real phantoms, AUROC [95% interval]\n")
rows = [("real held-out phantoms (baseline)", "t3-real.json"), ("demo samples of the held-out prompts", "t3-demo.json"),
        ("control: the same samples, labels of other prompts", "t3-shuffled.json")]
first = load(rows[0][1])
names = [c["class"] for c in first["classes"]]
print("| images | n | " + " | ".join(names) + " | average |")
print("|---|---|" + "---|" * (len(names) + 1))
for label, f in rows:
    r = load(f)
    print(f"| {label} | {r['images']} | " + " | ".join(cell(c) for c in r["classes"]) + f" | {cell(r['average'])} |")

print("\n### Table 5 (phantoms): classifiers trained from scratch, average AUROC on the held-out real phantoms\n")
sets = [("R (real)", "R"), ("S (demo samples of R's prompts)", "S"), ("R + S", "RS"), ("S, larger", "S-large")]
auc = {k: [load(f"t5-{k}-{s}.eval.json")["average"]["auroc"] for s in seeds] for _, k in sets}
rows_n = {k: load(f"t5-{k}-{seeds[0]}.train.json")["train_rows"] + load(f"t5-{k}-{seeds[0]}.train.json")["val_rows"] for _, k in sets}
print("| training data | images | AUROC per seed | mean ± sd | paired difference to R (mean, min, max) |")
print("|---|---|---|---|---|")
for label, k in sets:
    v = auc[k]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    d = [a - b for a, b in zip(v, auc["R"])]
    diff = "—" if k == "R" else f"{statistics.mean(d):+.3f} ({min(d):+.3f}, {max(d):+.3f})"
    print(f"| {label} | {rows_n[k]} | {', '.join(f'{x:.3f}' for x in v)} | {statistics.mean(v):.3f} ± {sd:.3f} | {diff} |")

print("\n### Table 6 (phantoms): CheXpert@10 of the text encoder on the held-out reports\n")
encs = [("demo, end-of-text", "t6-demo-pooled.json"), ("demo, mean", "t6-demo-mean.json"),
        ("untrained (default init)", "t6-untrained.json"), ("TF-IDF", "t6-tfidf.json")]
docs = [(label, load(f)) for label, f in encs]
findings = [f["finding"] for f in docs[0][1]["findings"] if f["precision"] is not None]
print("| finding | reports | chance | " + " | ".join(l for l, _ in docs) + " |")
print("|---|---|---|" + "---|" * len(docs))
for name in findings:
    per = [next(f for f in d["findings"] if f["finding"] == name) for _, d in docs]
    print(f"| {name} | {per[0]['reports']} | {per[0]['chance']:.3f} | " + " | ".join(f"{p['precision']:.3f}" for p in per) + " |")
for key, label in [("macro", "macro, findings"), ("macro_with_side", "macro, findings with side")]:
    print(f"| **{label}** | | | " + " | ".join(f"**{d[key]:.3f}**" for _, d in docs) + " |")
