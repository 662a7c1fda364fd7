"""Compare two demo lakes (the same pipeline run on two stacks): every output's row counts,
accounting and stage seconds from its _SUMMARY.json, the dedup groups, the caption topic vectors (largest
difference), and the headline figures (city top-1, likability SVM table, retrieval).

    python bench/compare_lakes.py data/lake-spark35 data/lake

Reads Parquet with pyarrow only (no Spark); prints one Markdown table per part.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

COUNTS = ("input_rows", "output_rows")


def summaries(lake: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(lake)): json.loads(p.read_text()) for p in sorted(lake.rglob("_SUMMARY.json"))}


def _count(v) -> int | None:
    return sum(v.values()) if isinstance(v, dict) else v


def topics(lake: Path, table: str) -> dict[str, np.ndarray]:
    t = pq.read_table(lake / "tables" / table, columns=["post_id", "topics"]).to_pydict()
    return {k: np.asarray(v, np.float64) for k, v in zip(t["post_id"], t["topics"])}


def groups(lake: Path) -> set[frozenset]:
    d = pq.read_table(lake / "tables" / "duplicates", columns=["post_id", "canonical_post_id"]).to_pydict()
    by: dict[str, set] = {}
    for post, canon in zip(d["post_id"], d["canonical_post_id"]):
        by.setdefault(canon, {canon}).add(post)
    return {frozenset(g) for g in by.values()}


def figures(lake: Path) -> dict[str, object]:
    def load(name):
        p = lake / "reports" / name / "metrics.json"
        return json.loads(p.read_text()) if p.exists() else {}

    svm, ret = load("likability_svm"), load("retrieval_eval")
    out = {}
    for name in ("train_city", "train_likability", "train_topics"):
        for k, v in (load(name).get("test") or {}).items():
            if isinstance(v, float):
                out[f"{name} test {k}"] = v
    for r in svm.get("results", []):
        out[f"likability {r['algorithm']} {r['layer']} {r['variant']} test AP"] = r.get("test_ap")
    for name, value in (ret.get("mean") or {}).items():
        out[f"retrieval mean {name}"] = value
    return out


def main(a: str, b: str) -> int:
    la, lb = Path(a), Path(b)
    sa, sb = summaries(la), summaries(lb)
    print(f"| output | {la.name}: in / out / rejected / duplicates | {lb.name} | same | seconds {la.name} / "
          f"{lb.name} |\n|---|---|---|---|---|")
    for key in sorted(set(sa) | set(sb)):
        row = [tuple(_count(s.get(k)) for k in (*COUNTS, "rejected", "duplicates")) if s else None
               for s in (sa.get(key), sb.get(key))]
        secs = " / ".join(str((s or {}).get("seconds", "-")) for s in (sa.get(key), sb.get(key)))
        print(f"| {key} | {row[0]} | {row[1]} | {'yes' if row[0] == row[1] else 'NO'} | {secs} |")
    ga, gb = groups(la), groups(lb)
    print(f"\ndedup groups: {len(ga)} and {len(gb)}, identical: {ga == gb}")
    for table in ("topics", "image_topics"):
        if not ((la / "tables" / table).exists() and (lb / "tables" / table).exists()):
            print(f"{table}: not in both lakes")
            continue
        ta, tb = topics(la, table), topics(lb, table)
        common = sorted(set(ta) & set(tb))
        worst = max((float(np.abs(ta[k] - tb[k]).max()) for k in common), default=float("nan"))
        print(f"{table}: {len(ta)} and {len(tb)} rows, {len(common)} in both, largest difference {worst:.3g}")
    fa, fb = figures(la), figures(lb)
    print(f"\n| figure | {la.name} | {lb.name} |\n|---|---|---|")
    for k in sorted(fa.keys() | fb.keys()):
        print(f"| {k} | {fa.get(k)} | {fb.get(k)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
