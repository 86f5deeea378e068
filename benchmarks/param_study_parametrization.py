"""Tables of the parametrisation study (issue 19): teacher runs of ``param_study.py`` and text runs of
``param_study_text.py``, as markdown, plus a compact JSON (loss every 10 steps).

    python benchmarks/param_study_parametrization.py --teacher /tmp/pst/w512_k8*.json /tmp/pst/w512_k32*.json \
        --text /tmp/pst/text.json --out benchmarks/results/param_study/parametrization

Teacher: final loss = mean of the last 10 steps; "vs balanced": relative to the ``balanced`` run
of the same ``k``. Text: held-out loss after the last step; "vs TP": relative to TP at the same lr.
"""
from __future__ import annotations

import argparse
import json
import os


def _final(losses, n=10):
    return sum(losses[-n:]) / len(losses[-n:])


def _mean_at(losses, step, n=10):
    window = losses[max(0, step - n):step]
    return sum(window) / len(window)


def teacher_tables(paths):
    rows, compact = {}, []
    for path in paths:
        d = json.load(open(path))
        a = d["args"]
        for r in d["results"]:
            key = (a["width"], a["ghosts"])
            rows.setdefault(key, {})[r["label"]] = r["losses"]
            compact.append({"width": a["width"], "depth": a["depth"], "p": a["ranks"], "k": a["ghosts"],
                            "batch": a["batch"], "lr": a["lr"], "variant": r["label"],
                            "loss_every_10": [round(_mean_at(r["losses"], s), 5)
                                              for s in range(10, len(r["losses"]) + 1, 10)]})
    md = []
    for (width, k), runs in sorted(rows.items()):
        base = _final(runs["balanced"]) if "balanced" in runs else None
        md += [f"Teacher, width {width}, depth 4, p = 2, k = {k} (k/(n/p) = 1/{width // 2 // k}), 300 Adam "
               "steps at lr 1e-3:", "",
               "| variant | loss @100 | @200 | final (@300) | vs balanced |", "|---|---:|---:|---:|---:|"]
        for label, losses in sorted(runs.items(), key=lambda kv: _final(kv[1])):
            rel = "" if base is None or label == "dense" else f"{100 * (_final(losses) / base - 1):+.1f}%"
            md.append(f"| {label} | {_mean_at(losses, 100):.4f} | {_mean_at(losses, 200):.4f} | "
                      f"{_final(losses):.4f} | {rel} |")
        md.append("")
    return md, compact


def text_tables(paths):
    md, compact = [], []
    for path in paths:
        d = json.load(open(path))
        a = d["args"]
        md += [f"Text: byte-level Megatron-core GPT, {a['layers']} layers, h = {a['hidden']}, ffn = {a['ffn']}, "
               f"k = {a['ghost_dim']}, TP = 2 attention, {a['steps']} AdamW steps, batch {a['batch']} x "
               f"{a['seq']}, held-out = last 10% of {a['bytes']:,} stdlib bytes ({a['eval_batches']} batches):", "",
               "| lr | variant | held-out | vs TP | train (last 10) |", "|---:|---|---:|---:|---:|"]
        by_lr = {}
        for r in d["results"]:
            by_lr.setdefault(r["lr"], []).append(r)
            compact.append({k: v for k, v in r.items() if k != "losses"}
                           | {"loss_every_10": [round(_mean_at(r["losses"], s), 4)
                                                for s in range(10, len(r["losses"]) + 1, 10)]})
        for lr, runs in sorted(by_lr.items()):
            tp = next((r["held_out"] for r in runs if r["variant"] == "tp"), None)
            for r in sorted(runs, key=lambda r: r["held_out"]):
                rel = "" if tp is None or r["variant"] == "tp" else f"{100 * (r['held_out'] / tp - 1):+.1f}%"
                md.append(f"| {lr:g} | {r['variant']} | {r['held_out']:.4f} | {rel} | {r['train_last10']:.4f} |")
        md.append("")
    return md, compact


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", nargs="*", default=[])
    ap.add_argument("--text", nargs="*", default=[])
    ap.add_argument("--out", required=True, help="path without extension: writes .md and .json")
    ap.add_argument("--note", default="", help="a first paragraph: machine, date, commands")
    a = ap.parse_args()
    md1, c1 = teacher_tables(a.teacher)
    md2, c2 = text_tables(a.text)
    if a.note:
        md1 = [a.note, ""] + md1
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md1 + md2))
    with open(a.out + ".json", "w") as f:
        json.dump({"teacher": c1, "text": c2}, f, indent=0)
    print("\n".join(md1 + md2))


if __name__ == "__main__":
    main()
