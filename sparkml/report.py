"""One static HTML report of what a run produced: <lake>/reports/index.html.

It presents what the stages wrote (each stage's _SUMMARY.json, the metrics.json files of the
learning stages, the tables); it computes no figure of its own. The pictures are files beside it
(reports/report_files/ for the ones drawn here from the stages' data, the stages' own PNGs where
they are), linked by relative paths, so the folder opens from a laptop or an S3 / GCS static
site. No server, no JavaScript. The HTML comes from Jinja2 templates (sparkml.report_templates),
which escape every value. A section whose stage did not run is left out and listed as not run.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from markupsafe import Markup

from core import storage
from core.figures import png, pyplot
from core.lake import SUMMARY_FILE, Lake
from sparkml.report_templates import fmt, render

FILES = "report_files"
NEW, OLD = ".new", ".old"  # the report being written beside the old one, and the old one while it is swapped


@dataclass
class Page:
    """The report being written: its sections, the files it references, what did not run."""

    spark: object
    lake: Lake
    sections: list[tuple[str, str]] = field(default_factory=list)
    not_run: list[tuple[str, str]] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)  # (what, why) not shown: stale, partial, broken
    files: list[str] = field(default_factory=list)

    def write(self, name: str, data: bytes) -> str:
        """A file beside the report (written to the new report's folder of files, which replaces
        the old one only once the page is complete); returns its relative path."""
        rel = f"{FILES}/{name}"
        storage.write_bytes(self.spark, f"{self.lake.report()}/{FILES}{NEW}/{name}", data)
        self.files.append(rel)
        return rel

    def complete(self, rel: str) -> bool:
        """Whether the output at <lake>/rel is complete and made from the inputs there now; the
        reason it is not goes to the report's list of what it does not show."""
        from core.lake import staleness

        why = staleness(self.spark, f"{self.lake.root}/{rel}")
        if why is not None and why != "missing or incomplete":
            self.stale.append((rel, why))
        elif why is not None and self.exists(f"{self.lake.root}/{rel}"):
            self.stale.append((rel, f"incomplete: its stage did not finish (no {SUMMARY_FILE})"))
        return why is None

    def exists(self, uri: str) -> bool:
        return storage.exists(self.spark, uri)

    def img(self, rel: str, alt: str, width: int | None = None) -> Markup:
        return render("img", src=rel, alt=alt, width=width)

    def existing(self, rel: str) -> bool:
        """A file a stage wrote under reports/ (rel to it)."""
        return storage.exists(self.spark, f"{self.lake.report()}/{rel}")

    def json(self, uri: str) -> dict | None:
        return json.loads(storage.read_bytes(self.spark, uri)) if storage.exists(self.spark, uri) else None


# ---------------------------------------------------------------- pictures


def thumbnail(data: bytes | None, side: int = 160) -> bytes | None:
    """A JPEG thumbnail of image bytes, None when they do not decode (a corrupt upload)."""
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (side * 2, side * 2))
            im = im.convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - whatever PIL raises on a broken file, there is no picture
        return None


def confusion_png(confusion: list[list[int]], labels: list[str]) -> bytes:
    """The confusion matrix as a heat map, each row normalised (the true city's share)."""
    plt = pyplot()
    m = np.asarray(confusion, float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted city")
    ax.set_ylabel("true city")
    ax.set_title("City classifier, test split (counts; colour = share of the true city)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return png(fig)


def per_class_png(ours: dict, published: dict) -> bytes:
    plt = pyplot()
    names = list(ours)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    def value(d, n):  # a city without test images (or not in the paper) has no bar
        v = d.get(n)
        return np.nan if v is None else v

    ax.bar(x - 0.2, [value(ours, n) for n in names], 0.4, label="this run")
    ax.bar(x + 0.2, [value(published, n) for n in names], 0.4, label="published (InstaCities1M)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("test accuracy")
    ax.axhline(1 / max(len(names), 1), color="grey", ls="--", lw=1, label="chance")
    ax.legend(fontsize=8)
    return png(fig)


def sheet(page: Page, name: str, title: str, tiles: list[tuple[str, float, bytes | None]]) -> dict:
    """A contact sheet written beside the report: the picture for the `img` macro."""
    from sparkml.captions.retrieval import contact_sheet

    return {"src": page.write(name, contact_sheet(title, tiles)), "alt": title}


# ---------------------------------------------------------------- sections


ACCOUNTED = [  # (stage, its output relative to the lake)
    ("ingest", "tables/posts"), ("prepare_images", "tables/images"), ("dedup", "tables/duplicates"),
    ("filter_followers", "tables/likability_labels"), ("detect_faces", "tables/faces"), ("train_lda", "models/lda"),
    ("infer_topics", "tables/topics"), ("build_dataset", "datasets/cities"), ("build_dataset", "datasets/likability"),
    ("extract_features", "tables/features"), ("score", "tables/scores"), ("explore", "tables/clusters"),
]


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))


def accounting(page: Page) -> str | None:
    lake = page.lake
    rows = []
    for stage, rel in ACCOUNTED:
        if not page.complete(rel):
            continue
        s = page.json(f"{lake.root}/{rel}/{SUMMARY_FILE}")
        rows.append({"what": f"{stage} → {rel}", "input": s["input_rows"], "output": s["output_rows"],
                     "rejected": _counts(s.get("rejected", {})) or "-", "duplicates": _counts(s.get("duplicates", {})) or "-",
                     "balanced": bool(s.get("balanced")), "seconds": s.get("seconds")})
    if not rows:
        return None
    return render("accounting", rows=rows, rejected=rejected_examples(page), duplicates=duplicate_examples(page))


def rejected_examples(page: Page, per_reason: int = 2) -> list[dict]:
    """A few rejected posts per reason of ingest and prepare_images, as thumbnails where the
    bytes decode at all (a corrupt file shows as text: there is no picture of it)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark, lake = page.spark, page.lake
    if not storage.exists(spark, lake.rejected()) or not storage.exists(spark, f"{lake.table('posts')}/{SUMMARY_FILE}"):
        return []
    rej = spark.read.parquet(lake.rejected()).where(F.col("stage").isin("ingest", "prepare_images")
                                                     & F.col("post_id").isNotNull())
    pick = rej.withColumn("n", F.row_number().over(Window.partitionBy("reason").orderBy("post_id"))) \
        .where(F.col("n") <= per_reason)
    got = pick.join(spark.read.parquet(lake.table("posts")).select("post_id", "image_bytes"), "post_id", "left") \
        .orderBy("reason", "post_id").collect()
    cards = []
    for i, r in enumerate(got):
        thumb = thumbnail(r["image_bytes"])
        cards.append({"src": page.write(f"rejected_{i:03d}.jpg", thumb) if thumb else None, "post_id": r["post_id"],
                      "reason": r["reason"], "stage": r["stage"], "detail": (r["detail"] or "")[:120]})
    return cards


def duplicate_examples(page: Page, n: int = 4) -> list[dict]:
    from pyspark.sql import functions as F

    from sparkml.captions.retrieval import jpegs

    spark, lake = page.spark, page.lake
    if not storage.exists(spark, f"{lake.table('duplicates')}/{SUMMARY_FILE}"):
        return []
    dups = spark.read.parquet(lake.table("duplicates")).where(F.col("kind") == "near") \
        .orderBy(F.col("hamming").desc(), "post_id").limit(n).collect()
    if not dups:
        return []
    images = jpegs(spark.read.parquet(lake.table("images")),
                   [r["post_id"] for r in dups] + [r["canonical_post_id"] for r in dups])
    cards = []
    for i, r in enumerate(dups):
        pics = []
        for j, pid in enumerate((r["canonical_post_id"], r["post_id"])):
            thumb = thumbnail(images.get(pid))
            if thumb:
                pics.append({"src": page.write(f"duplicate_{i:02d}_{j}.jpg", thumb), "alt": pid})
        cards.append({"pics": pics, "post_id": r["post_id"], "canonical": r["canonical_post_id"], "bits": r["hamming"]})
    return cards


def city(page: Page) -> str | None:
    from sparkml.cnn.train_cnn import PUBLISHED

    if not page.complete("models/city"):
        return None
    m = page.json(f"{page.lake.report('train_city')}/metrics.json")
    test, pub = m["test"], PUBLISHED["city"]
    labels = list(test["per_class"])
    return render("city", test=test, m=m, chance=1 / max(len(labels), 1),
                  rows=[[c, test["per_class"][c], pub["per_class"].get(c)] for c in labels],
                  per_class=page.write("city_per_class.png", per_class_png(test["per_class"], pub["per_class"])),
                  confusion=page.write("city_confusion.png", confusion_png(test["confusion"], labels)),
                  curves=curves(page, "city"))


def curves(page: Page, task: str) -> dict | None:
    rel = f"train_{task}/curve.png"
    return {"task": task, "src": rel} if page.existing(rel) else None


def retrieval(page: Page) -> str | None:
    from sparkml.captions.retrieval import PUBLISHED

    if not page.complete("reports/retrieval_eval"):
        return None
    m = page.json(f"{page.lake.report('retrieval_eval')}/metrics.json")
    rows = [[c, v["precision_at_100"], v["average_precision"], v["relevant"], v["chance_precision"]]
            for c, v in m["per_city"].items()]
    return render("retrieval", m=m, rows=rows, published=PUBLISHED, sheets=query_sheets(page, m),
                  unknown=m.get("examples_not_in_vocabulary") or [], curves=curves(page, "topics"))


def query_sheets(page: Page, m: dict) -> list[dict] | None:
    """Contact sheets of the example queries' top images, as evaluate_retrieval ranked them
    (None for a lake whose evaluate_retrieval predates the examples)."""
    from sparkml.captions.retrieval import jpegs, slug

    if "examples" not in m:
        return None
    images = jpegs(page.spark.read.parquet(page.lake.table("images")),
                   [p for hits in m["examples"].values() for p, _ in hits])
    return [sheet(page, f"query_{slug(q)}.png", f"{q!r}: top {len(hits)}", [(p, s, images.get(p)) for p, s in hits])
            for q, hits in m["examples"].items()]


def likability(page: Page) -> str | None:
    from sparkml.likability.train_svm import PUBLISHED, TITLES

    lake = page.lake
    m = page.json(f"{lake.report('likability_svm')}/metrics.json") if page.complete("models/likability_svm") else None
    cnn = page.json(f"{lake.report('train_likability')}/metrics.json") if page.complete("models/likability") else None
    if m is None and cnn is None:
        return None
    svm = None
    if m is not None:
        rows = [[TITLES.get(r["algorithm"], r["algorithm"]), r["layer"], r["variant"], r["test_ap"],
                 PUBLISHED.get((r["layer"], r["algorithm"], r["variant"]))] for r in m["results"]]
        ours = {r["layer"] for r in m["results"]}
        rows += [[TITLES.get(a, a), f"{layer} (the original's AlexNet)", v, None, ap]
                 for (layer, a, v), ap in PUBLISHED.items() if layer not in ours]
        svm = {"rows": rows, "rate": ", ".join(f"{k} {fmt(v)}" for k, v in m["test_positive_rate"].items()),
               "ranked": top_and_bottom(page, m)}
    return render("likability", svm=svm, cnn=cnn, curves=curves(page, "likability"))


def top_and_bottom(page: Page, m: dict) -> dict:
    """The test images the best SVM ranks highest and lowest (train_svm's ranking), as contact
    sheets drawn from tables/images; or why there are none."""
    from sparkml.captions.retrieval import jpegs

    if not page.complete("tables/images"):
        return {"note": "No top and bottom test images: they are drawn from tables/images, which this lake does "
                        "not have complete."}
    if "best_test_ranking" not in m:
        return {"note": "No top and bottom test images: this train_svm run did not rank the test images; run "
                        "jobs/train_svm.py again."}
    best, scored = m["best"], m["best_test_ranking"]
    n_top = min(25, (len(scored) + 1) // 2)
    top, bottom = scored[:n_top], scored[::-1][:min(25, len(scored) - n_top)]
    images = jpegs(page.spark.read.parquet(page.lake.table("images")), [r[0] for r in top + bottom])
    return {"title": f"best SVM ({best['layer']}, {best['variant']})", "top": len(top), "bottom": len(bottom),
            "top_sheet": sheet(page, "likability_top.png", f"top {len(top)}: predicted most likable",
                               [(p, s, images.get(p)) for p, _, s in top]),
            "bottom_sheet": sheet(page, "likability_bottom.png", f"bottom {len(bottom)}: predicted least likable",
                                  [(p, s, images.get(p)) for p, _, s in bottom])}


def exploration(page: Page) -> str | None:
    if not page.complete("tables/clusters"):
        return None
    m = page.json(f"{page.lake.report('explore')}/metrics.json")
    labels = m["labels"] or {}
    return render("exploration", m=m,
                  silhouettes=[[k + (" (kept)" if int(k) == m["k"] else ""), v] for k, v in m["silhouettes"].items()],
                  clusters=[[c, n, ", ".join(f"{name} ({share:.0%})" for name, share in labels.get(c, [])) or "-"]
                            for c, n in m["sizes"].items()],
                  skipped="; ".join(f"{k} ({why})" for k, why in (m.get("skipped_k") or {}).items()))


def scoring(page: Page) -> str | None:
    if not page.complete("tables/scores"):
        return None
    s = page.json(f"{page.lake.table('scores')}/{SUMMARY_FILE}")
    return render("scoring", s=s, rejected=_counts(s["rejected"]) or "none",
                  rows=[[k, v, s["rows_per_model"].get(k)] for k, v in s["models"].items()],
                  missing=s.get("missing_models", {}))


SECTIONS = [  # (title, builder, the job that makes it)
    ("Dataset accounting", lambda p, c: accounting(p), "jobs/ingest.py, prepare_images.py, dedup.py, ..."),
    ("City classifier", lambda p, c: city(p), "jobs/train_cnn.py --task city"),
    ("Image topics and text-to-image retrieval", lambda p, c: retrieval(p), "jobs/evaluate_retrieval.py"),
    ("Likability (#me selfies)", lambda p, c: likability(p), "jobs/train_svm.py or train_cnn.py --task likability"),
    ("Personal archive exploration", lambda p, c: exploration(p), "jobs/explore.py"),
    ("Batch scoring of new images", lambda p, c: scoring(p), "jobs/score.py"),
]


def write_report(spark, cfg):
    """<lake>/reports/index.html from whatever this run produced: a section per complete output
    made from the inputs there now; stale, partial or unreadable ones are listed with why, never
    shown as current. The new page and its pictures are written beside the old report, which they
    replace only once complete (a failed run leaves the old report whole)."""
    from core.lake import Summary

    lake = Lake(cfg.lake)
    reports = lake.report()
    storage.delete(spark, f"{reports}/{FILES}{NEW}")  # a failed run's leftovers
    page = Page(spark, lake)
    for title, build, job in SECTIONS:
        try:
            body = build(page, cfg)
        except Exception as e:  # noqa: BLE001 - one broken output must not cost the rest of the report
            page.stale.append((title, f"could not be drawn ({type(e).__name__}: {str(e).strip()[:200]})"))
            continue
        if body is None:
            page.not_run.append((title, job))
        else:
            page.sections.append((title, Markup(body)))  # a builder's HTML, from its template
    doc = render("page", lake=lake.root, sections=page.sections, not_run=page.not_run, stale=page.stale)
    index = f"{reports}/index.html"
    storage.write_bytes(spark, f"{index}{NEW}", doc.encode())
    # the new report is whole: swap it in (the old pictures go only after the new ones are in place)
    storage.delete(spark, f"{reports}/{FILES}{OLD}")
    if storage.exists(spark, f"{reports}/{FILES}"):
        storage.rename(spark, f"{reports}/{FILES}", f"{reports}/{FILES}{OLD}")
    if storage.exists(spark, f"{reports}/{FILES}{NEW}"):
        storage.rename(spark, f"{reports}/{FILES}{NEW}", f"{reports}/{FILES}")
    storage.rename(spark, f"{index}{NEW}", index)
    storage.delete(spark, f"{reports}/{FILES}{OLD}")
    print(f"report: {index}")
    return Summary(stage="report", input_rows=len(page.sections), output_rows=len(page.sections), output=reports,
                   extra={"index": index, "sections": [t for t, _ in page.sections],
                          "not_run": [t for t, _ in page.not_run], "not_shown": dict(page.stale),
                          "files": len(page.files)})
