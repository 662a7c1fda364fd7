"""Real ImageNet weights against random init, through the jobs a user runs (issue 28's figures,
docs/results.md). Every figure is measured in this run, the real weights beside random init.

photos: ../shared/data/photos (192 ants, 204 bees) laid out as a labelled folder
(source.layout=classes, <split>/<class>/<name>.jpg: sorted names, every third photo test, every
tenth of the rest val) through ingest, prepare_images, dedup and build_dataset:
  - features + SVM: extract_features (MobileNetV2 prelogit, the shipped weights / none) and
    train_svm (its labels are the classes: ants 0, bees 1): test AP of every algorithm;
  - fine-tuning: train_cnn --task city --preset city-mobilenet (backbone frozen), the shipped
    weights and none: held-out accuracy; then jobs/score.py on the held-out folder, its
    accuracy against the training job's;
  - exploration: jobs/explore.py on the photos as a plain folder, k = 2 and 4: the clusters'
    ImageNet labels and how pure they are.

demo: the demo's lake (`make demo` first): the three experiments with the staged weights and
with none, the same recipes: city top-1 (city-mobilenet), likability AP (features + SVM, and the
likability-mobilenet CNN), topic retrieval from pixels (topics-mobilenet, then
evaluate_retrieval with retrieval.embeddings=image_topics, beside chance and the captions' own
topics). These runs replace the demo lake's models/, reports/ and tables they write; `make demo`
restores them.

    .venv/bin/python bench/pretrained.py [--parts photos demo] [--lake data/lake]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, _env, header

SHIPPED = ROOT.parent / "shared" / "data" / "weights" / "mobilenet_v2_imagenet.pth"
PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def job(name: str, lake: Path, *sets: str, args: tuple = ()) -> dict:
    """jobs/<name>.py in its own process with conf/local.yaml, the lake and --set options."""
    cmd = [sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--config", str(ROOT / "conf" / "local.yaml"), *args,
           "--set", f"lake={lake}", "--set", "progress.interval=0"] + [x for s in sets for x in ("--set", s)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} {' '.join(args)} {' '.join(sets)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  {name} {' '.join(args)} {' '.join(s for s in sets if 'lake=' not in s)}: {time.perf_counter() - t0:.0f} s",
          flush=True)
    return {}


def summary(path: Path) -> dict:
    return json.loads((path / "_SUMMARY.json").read_text())


def layout(dest: Path) -> dict[str, dict[str, str]]:
    """The photos as <split>/<class>/<name>.jpg; split -> post_id -> class."""
    truth: dict[str, dict[str, str]] = {"train": {}, "val": {}, "test": {}}
    for i, p in enumerate(sorted(PHOTOS.glob("*.jpg"))):
        cls = "ants" if p.name.startswith("ants") else "bees"
        split = "test" if i % 3 == 2 else ("val" if i % 10 == 0 else "train")
        (dest / split / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest / split / cls / p.name)
        truth[split][f"{cls}/{p.stem}"] = cls
    return truth


def svm_table(lake: Path) -> dict[str, float]:
    body = json.loads((lake / "reports" / "likability_svm" / "metrics.json").read_text())
    return {f"{r['algorithm']} {r['variant']}": r["test_ap"] for r in body["results"]}


def photos(weights: str, work: Path) -> None:
    header("photos: ants vs bees, MobileNetV2 with the shipped ImageNet weights against random init")
    folder = work / "photos"
    truth = layout(folder)
    print(f"split: train {len(truth['train'])}, val {len(truth['val'])}, test {len(truth['test'])}")
    lake = work / "lake"
    for name in ("ingest", "prepare_images", "dedup"):
        job(name, lake, "source.layout=classes", f"source.path={folder}")
    job("build_dataset", lake, "dataset.name=photos", "dataset.ranks=2")
    print("labels:", json.loads((lake / "datasets" / "photos" / "labels.json").read_text()),
          "splits:", summary(lake / "datasets" / "photos")["splits"])
    results = {}
    for label, w in (("shipped", weights), ("none", "none")):
        job("extract_features", lake, "features.dataset=photos", f"features.weights={w}")
        job("train_svm", lake, f"features.weights={w}")
        results[label] = {"svm": svm_table(lake)}
        job("train_cnn", lake, f"train.weights={w}", "train.dataset=photos", "train.epochs=3",
            args=("--task", "city", "--preset", "city-mobilenet"))
        trained = summary(lake / "models" / "city")
        results[label]["cnn"] = trained["test"]["top1"]
        results[label]["cnn_history"] = [round(h["val_top1"], 3) for h in trained["history"]]
        job("score", lake, "score.layout=classes", f"score.input={folder / 'test'}", "score.models=[city]")
        import pyarrow.parquet as pq

        scores = pq.read_table(lake / "tables" / "scores").to_pandas()
        right = sum(truth["test"][p] == c for p, c in zip(scores.post_id, scores.city))
        results[label]["score"] = (right / len(scores), len(scores))
    print("\nfeatures + SVM, test AP (132 test photos, 68 bees: the AP of a random ranking is 0.515)")
    print("| algorithm | shipped ImageNet weights | random init |\n|---|---|---|")
    for k in results["shipped"]["svm"]:
        print(f"| {k} | {results['shipped']['svm'][k]:.3f} | {results['none']['svm'][k]:.3f} |")
    print("\nfine-tuning (city-mobilenet: backbone and batch norm frozen, new 2-way head, Adam, 3 epochs, 2 processes)")
    print("| | shipped ImageNet weights | random init |\n|---|---|---|")
    print(f"| train_cnn test accuracy | {results['shipped']['cnn']:.3f} | {results['none']['cnn']:.3f} |")
    print(f"| val accuracy per epoch | {results['shipped']['cnn_history']} | {results['none']['cnn_history']} |")
    print(f"| jobs/score.py on the held-out folder: accuracy (images) | {results['shipped']['score'][0]:.3f} "
          f"({results['shipped']['score'][1]}) | {results['none']['score'][0]:.3f} ({results['none']['score'][1]}) |")

    archive = work / "archive"
    for name in ("ingest", "prepare_images"):
        job(name, archive, "source.layout=folder", f"source.path={PHOTOS}")
    for k in (2, 4):
        job("explore", archive, f"explore.weights={weights}", f"explore.k={k}", "explore.k_range=[2,3,4]",
            "explore.tsne_sample=400")
        body = json.loads((archive / "reports" / "explore" / "metrics.json").read_text())
        import pyarrow.parquet as pq

        rows = pq.read_table(archive / "tables" / "clusters").to_pandas()
        rows["cls"] = ["ants" if p.startswith("ants") else "bees" for p in rows.post_id]
        print(f"\nexplore k={k} (silhouettes {', '.join(f'{a}: {v:.3f}' for a, v in body['silhouettes'].items())})")
        print("| cluster | images | ants | bees | labels (share of its images) |\n|---|---|---|---|---|")
        for c, size in body["sizes"].items():
            members = rows[rows.cluster == int(c)]
            lab = ", ".join(f"{n} ({s:.0%})" for n, s in body["labels"][c])
            print(f"| {c} | {size} | {(members.cls == 'ants').sum()} | {(members.cls == 'bees').sum()} | {lab} |")


def demo(weights: str, lake: Path) -> None:
    header(f"the demo's experiments on {lake}: the staged ImageNet MobileNetV2 against random init")
    out = {}
    for label, w in (("shipped", weights), ("none", "none")):
        job("extract_features", lake, f"features.weights={w}")
        job("train_svm", lake, f"features.weights={w}")
        out[label] = {"svm": svm_table(lake)}
        job("train_cnn", lake, f"train.weights={w}", args=("--task", "city", "--preset", "city-mobilenet"))
        out[label]["city"] = summary(lake / "models" / "city")["test"]["top1"]
        job("train_cnn", lake, f"train.weights={w}", args=("--task", "likability", "--preset", "likability-mobilenet"))
        t = summary(lake / "models" / "likability")["test"]
        out[label]["likability"] = (t["accuracy"], t.get("ap"), t.get("positive_rate"))
        job("train_cnn", lake, f"train.weights={w}", args=("--task", "topics", "--preset", "topics-mobilenet"))
        job("evaluate_retrieval", lake, "retrieval.embeddings=image_topics")
        m = json.loads((lake / "reports" / "retrieval_eval" / "metrics.json").read_text())
        out[label]["topics"] = (m["mean"]["mean_precision_at_100"], m["mean"]["mean_average_precision"], m["test_images"])
    job("evaluate_retrieval", lake)  # the captions' own topic vectors: the upper bound
    m = json.loads((lake / "reports" / "retrieval_eval" / "metrics.json").read_text())
    upper = (m["mean"]["mean_precision_at_100"], m["mean"]["mean_average_precision"], m["test_images"])
    print("\n| experiment | shipped ImageNet weights | random init | chance / bound |\n|---|---|---|---|")
    print(f"| city top-1 (city-mobilenet) | {out['shipped']['city']:.3f} | {out['none']['city']:.3f} | 0.100 |")
    for k in out["shipped"]["svm"]:
        print(f"| likability AP, {k} | {out['shipped']['svm'][k]:.3f} | {out['none']['svm'][k]:.3f} | |")
    s, n = out["shipped"]["likability"], out["none"]["likability"]
    print(f"| likability CNN (likability-mobilenet): accuracy / AP | {s[0]:.3f} / {s[1]:.3f} | {n[0]:.3f} / {n[1]:.3f} "
          f"| positive rate {s[2]:.3f} |")
    s, n = out["shipped"]["topics"], out["none"]["topics"]
    print(f"| retrieval from pixels (topics-mobilenet): mean P@100 / AP, % ({s[2]} test images) | {s[0]:.1f} / "
          f"{s[1]:.2f} | {n[0]:.1f} / {n[1]:.2f} | captions' own topics ({upper[2]} images) {upper[0]:.1f} / "
          f"{upper[1]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["photos", "demo"], choices=["photos", "demo"])
    ap.add_argument("--lake", default=str(ROOT / "data" / "lake"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pretrained-") as tmp:
        work = Path(tmp)
        from dl.weights import stage

        weights, _ = stage(str(SHIPPED), str(work / "weights"), name="mobilenet_v2")
        if "photos" in args.parts:
            photos(weights, work)
        if "demo" in args.parts:
            demo(weights, Path(args.lake))


if __name__ == "__main__":
    main()
