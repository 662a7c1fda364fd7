"""Batch scoring benchmark (issue 16): images/s per core of the scoring job's per-batch
function (sparkml.score.score_batch: decode the prepared JPEGs, centre crop, one forward pass
per Arrow batch through the exported city CNN, softmax, rows out) against the naive loop
measured in the same run (one image at a time through the same exported model: PIL open ->
torchvision crop + normalise -> forward at batch 1 -> softmax). Then jobs/score.py itself on
local[2] over a folder of the same photos (ingest + prepare + score, its images/s).

Model: <lake>/models/city as `make demo` exports it (AlexNet, 10 cities). Images: the 396
real photos of ../shared/data/photos, prepared as prepare_images does (300 x 300, JPEG q90).

    .venv/bin/python bench/score.py [--lake data/lake] [--batch 64] [--no-spark]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
from _common import ROOT, header, single_core

import torch  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def prepared(limit: int) -> tuple[list[str], list[bytes]]:
    from sparkml.images.resize import prepare_image

    files = sorted(PHOTOS.glob("*.jpg"))[:limit]
    return [p.stem for p in files], [prepare_image(p.read_bytes(), size=300, policy="squash", quality=90).image
                                     for p in files]


def ours(ids, jpegs, exported, batch: int) -> float:
    from sparkml.score import score_batch

    found = {"city": exported}
    cfg_f = {"model": "alexnet", "weights": "none", "seed": 0, "precision": "fp32"}
    b = pa.RecordBatch.from_pydict({"post_id": ids[:batch], "image": jpegs[:batch]})
    score_batch(b, found, cfg_f, None, None)  # load the model, warm up
    t0 = time.perf_counter()
    for i in range(0, len(jpegs), batch):
        score_batch(pa.RecordBatch.from_pydict({"post_id": ids[i:i + batch], "image": jpegs[i:i + batch]}),
                    found, cfg_f, None, None)
    return len(jpegs) / (time.perf_counter() - t0)


def naive(jpegs, exported) -> float:
    import torchvision.transforms as T
    from PIL import Image

    from dl.models import load_model

    meta = exported.meta
    pre = meta["preprocessing"]
    net = load_model(meta["model"], f"{exported.root}/model.pt", num_classes=meta["outputs"])
    transform = T.Compose([T.CenterCrop(pre["crop"]), T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
    with torch.inference_mode():
        net(torch.zeros(1, 3, pre["crop"], pre["crop"]))
        t0 = time.perf_counter()
        for b in jpegs:
            x = transform(Image.open(io.BytesIO(b)).convert("RGB"))
            torch.softmax(net(x[None]), 1).numpy()
    return len(jpegs) / (time.perf_counter() - t0)


def spark_job(lake: str, folder: str, master: str) -> dict:
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_CONF_DIR": str(ROOT / "conf" / "spark")}
    cmd = [sys.executable, str(ROOT / "jobs" / "score.py"), "--config", str(ROOT / "conf" / "local.yaml"),
           "--set", f"lake={lake}", "--set", f"spark.master={master}", "--set", f"score.input={folder}",
           "--set", "score.models=[city]"]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return json.loads((Path(lake) / "tables" / "scores" / "_SUMMARY.json").read_text())


def main() -> None:
    from dl.score import read_exported

    ap = argparse.ArgumentParser()
    ap.add_argument("--lake", default="data/lake")
    ap.add_argument("--images", type=int, default=396)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-spark", action="store_true")
    args = ap.parse_args()
    exported = read_exported(str(ROOT / args.lake / "models" / "city"))
    if exported is None:
        sys.exit(f"no exported city model under {args.lake}/models/city: run `make demo` first")
    header(f"Batch scoring: the exported city {exported.meta['model']} ({exported.meta['outputs']} cities), one core")
    ids, jpegs = prepared(args.images)
    single_core()
    torch.set_num_threads(1)
    got = ours(ids, jpegs, exported, args.batch)
    base = naive(jpegs, exported)
    print(f"images: {len(jpegs)} real photos, 300 px JPEG q90; batch {args.batch}")
    print(f"ours (score_batch, decode included):  {got:6.1f} images/s per core")
    print(f"naive loop (PIL, transforms, bs 1):   {base:6.1f} images/s per core")
    print(f"ratio ours / naive: {got / base:.2f}x")
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    if not args.no_spark:
        with tempfile.TemporaryDirectory() as tmp:
            folder, lake = Path(tmp) / "photos", Path(tmp) / "lake"  # the demo's lake is left as it was
            folder.mkdir()
            for p in sorted(PHOTOS.glob("*.jpg"))[:args.images]:
                shutil.copyfile(p, folder / p.name)
            shutil.copytree(ROOT / args.lake / "models" / "city", lake / "models" / "city")
            s = spark_job(str(lake), str(folder), "local[2]")
            print(f"jobs/score.py local[2], {s['output_rows']} images from a folder (ingest + prepare + score): "
                  f"{s['seconds']:.1f} s in all, scoring pass {s['images_per_s']:.1f} images/s "
                  f"({s['images_per_s'] / 2:.1f} per core)")


if __name__ == "__main__":
    main()
