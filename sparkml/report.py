"""One static HTML report of what a run produced: <lake>/reports/index.html.

Everything it shows comes from the run's own outputs (each stage's _SUMMARY.json, the
metrics.json files of the learning stages, the tables); the pictures are files beside it
(reports/report_files/ for the ones drawn here, the stages' own PNGs where they are), linked
by relative paths, so the folder opens from a laptop or an S3 / GCS static site. No server,
no JavaScript. A section whose stage did not run is left out and listed as not run.
"""

from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass, field

import numpy as np

from core import storage
from core.figures import png, pyplot
from sparkml.lake import SUMMARY_FILE, Lake

FILES = "report_files"
NEW, OLD = ".new", ".old"  # the report being written beside the old one, and the old one while it is swapped
# The original's example queries (Gomez et al., text-to-image retrieval figures).
QUERIES = ("rain", "snow", "skyline night", "car yellow", "sunrise beach", "woman bag")
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;font-size:12px;word-break:break-all}
.card img{width:160px;height:160px;object-fit:cover}.note{color:#666;font-size:14px}.bad{color:#a00}"""


def esc(v) -> str:
    return html.escape(str(v))


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(digits - 1, 1)}f}"
    return esc(v)


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Raw(str):
    """Markup that table() puts in a cell as it is."""


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
        from sparkml.lake import staleness

        why = staleness(self.spark, f"{self.lake.root}/{rel}")
        if why is not None and why != "missing or incomplete":
            self.stale.append((rel, why))
        elif why is not None and self.exists(f"{self.lake.root}/{rel}"):
            self.stale.append((rel, "incomplete: its stage did not finish (no _SUMMARY.json)"))
        return why is None

    def exists(self, uri: str) -> bool:
        return storage.exists(self.spark, uri)

    def img(self, rel: str, alt: str, width: int | None = None) -> str:
        w = f' width="{width}"' if width else ""
        return f'<img src="{esc(rel)}" alt="{esc(alt)}"{w}>'

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


def sheet(page: Page, name: str, title: str, tiles: list[tuple[str, float, bytes | None]]) -> str:
    from sparkml.retrieval import contact_sheet

    return page.img(page.write(name, contact_sheet(title, tiles)), title)


# ---------------------------------------------------------------- sections


ACCOUNTED = [  # (stage, its output relative to the lake)
    ("ingest", "tables/posts"), ("prepare_images", "tables/images"), ("dedup", "tables/duplicates"),
    ("filter_followers", "tables/likability_labels"), ("detect_faces", "tables/faces"), ("train_lda", "models/lda"),
    ("infer_topics", "tables/topics"), ("build_dataset", "datasets/cities"), ("build_dataset", "datasets/likability"),
    ("extract_features", "tables/features"), ("score", "tables/scores"), ("explore", "tables/clusters"),
]


def accounting(page: Page) -> str | None:
    lake = page.lake
    rows = []
    for stage, rel in ACCOUNTED:
        if not page.complete(rel):
            continue
        s = page.json(f"{lake.root}/{rel}/{SUMMARY_FILE}")
        rej = ", ".join(f"{k} {v}" for k, v in sorted(s.get("rejected", {}).items())) or "-"
        dup = ", ".join(f"{k} {v}" for k, v in sorted(s.get("duplicates", {}).items())) or "-"
        ok = "yes" if s.get("balanced") else Raw('<span class="bad">NO</span>')
        rows.append([f"{stage} → {rel}", s["input_rows"], s["output_rows"], rej, dup, ok, s.get("seconds")])
    if not rows:
        return None
    out = ["<p>Every stage accounts for its input: input = output + rejected (+ duplicates removed).</p>",
           table(["stage → output", "input", "output", "rejected by reason", "duplicates by kind", "balanced",
                  "seconds"], rows)]
    out.append(rejected_examples(page))
    out.append(duplicate_examples(page))
    return "\n".join(o for o in out if o)


def rejected_examples(page: Page, per_reason: int = 2) -> str:
    """A few rejected posts per reason of ingest and prepare_images, as thumbnails where the
    bytes decode at all (a corrupt file shows as text: there is no picture of it)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark, lake = page.spark, page.lake
    if not storage.exists(spark, lake.rejected()) or not storage.exists(spark, f"{lake.table('posts')}/{SUMMARY_FILE}"):
        return ""
    rej = spark.read.parquet(lake.rejected()).where(F.col("stage").isin("ingest", "prepare_images")
                                                     & F.col("post_id").isNotNull())
    pick = rej.withColumn("n", F.row_number().over(Window.partitionBy("reason").orderBy("post_id"))) \
        .where(F.col("n") <= per_reason)
    got = pick.join(spark.read.parquet(lake.table("posts")).select("post_id", "image_bytes"), "post_id", "left") \
        .orderBy("reason", "post_id").collect()
    if not got:
        return ""
    cards = []
    for i, r in enumerate(got):
        thumb = thumbnail(r["image_bytes"])
        pic = page.img(page.write(f"rejected_{i:03d}.jpg", thumb), r["post_id"]) if thumb else \
            '<p class="note">(no picture: the bytes do not decode)</p>'
        cards.append(f'<div class="card">{pic}<br><b>{esc(r["reason"])}</b> ({esc(r["stage"])})<br>{esc(r["post_id"])}'
                     f'<br><span class="note">{esc((r["detail"] or "")[:120])}</span></div>')
    return f"<h3>Rejected examples</h3><div class=\"grid\">{''.join(cards)}</div>"


def duplicate_examples(page: Page, n: int = 4) -> str:
    from pyspark.sql import functions as F

    from sparkml.retrieval import jpegs

    spark, lake = page.spark, page.lake
    if not storage.exists(spark, f"{lake.table('duplicates')}/{SUMMARY_FILE}"):
        return ""
    dups = spark.read.parquet(lake.table("duplicates")).where(F.col("kind") == "near") \
        .orderBy(F.col("hamming").desc(), "post_id").limit(n).collect()
    if not dups:
        return ""
    images = jpegs(spark.read.parquet(lake.table("images")),
                   [r["post_id"] for r in dups] + [r["canonical_post_id"] for r in dups])
    cards = []
    for i, r in enumerate(dups):
        pics = []
        for j, pid in enumerate((r["canonical_post_id"], r["post_id"])):
            thumb = thumbnail(images.get(pid))
            if thumb:
                pics.append(page.img(page.write(f"duplicate_{i:02d}_{j}.jpg", thumb), pid, 120))
        cards.append(f'<div class="card" style="width:260px">{"".join(pics)}<br>{esc(r["post_id"])} re-posts '
                     f'{esc(r["canonical_post_id"])} ({r["hamming"]} bits apart)</div>')
    return "<h3>Near-duplicates found (the hardest: most bits apart)</h3>" \
           f"<div class=\"grid\">{''.join(cards)}</div>"


def city(page: Page) -> str | None:
    from sparkml.training import PUBLISHED

    if not page.complete("models/city"):
        return None
    m = page.json(f"{page.lake.report('train_city')}/metrics.json")
    test, pub = m["test"], PUBLISHED["city"]
    labels = list(test["per_class"])
    out = [f"<p>Test top-1 <b>{fmt(test['top1'])}</b> on {test['rows']} test images (published 26.3% on a 200K "
           f"subset; chance {fmt(1 / max(len(labels), 1))}). {m['world']} process(es) on {esc(m['device'])}.</p>",
           table(["city", "test accuracy (this run)", "published"],
                 [[c, test["per_class"][c], pub["per_class"].get(c)] for c in labels]),
           page.img(page.write("city_per_class.png", per_class_png(test["per_class"], pub["per_class"])),
                    "per-city accuracy"),
           page.img(page.write("city_confusion.png", confusion_png(test["confusion"], labels)), "confusion matrix")]
    out += curves(page, "city")
    return "\n".join(out)


def curves(page: Page, task: str) -> list[str]:
    rel = f"train_{task}/curve.png"
    return [f"<h3>Training curves ({task})</h3>", page.img(rel, f"{task} training curves")] if page.existing(rel) else []


def retrieval(page: Page, cfg) -> str | None:
    from sparkml.retrieval import PUBLISHED

    if not page.complete("reports/retrieval_eval"):
        return None
    m = page.json(f"{page.lake.report('retrieval_eval')}/metrics.json")
    rows = [[c, v["precision_at_100"], v["average_precision"], v["relevant"], v["chance_precision"]]
            for c, v in m["per_city"].items()]
    rows.append([Raw("<b>mean</b>"), m["mean"]["mean_precision_at_100"], m["mean"]["mean_average_precision"], "", ""])
    rows.append(["published (GoogLeNet regressor, InstaCities1M)", PUBLISHED["mean_precision_at_100"],
                 PUBLISHED["mean_average_precision"], "", ""])
    out = [f"<p>Query = the city's name, relevant = a test image of that city; {m['test_images']} test images, "
           f"embeddings <code>{esc(m['embeddings'])}</code> ({esc(m['metric'])}).</p>",
           table(["city", "P@100 (%)", "AP (%)", "relevant", "chance P (%)"], rows)]
    out += query_sheets(page, cfg)
    out += curves(page, "topics")
    return "\n".join(out)


def query_sheets(page: Page, cfg, k: int = 10) -> list[str]:
    """Top-k contact sheets for the original's example queries (those with a known word)."""
    from sparkml.retrieval import UnknownQuery, _embeddings, embed_query, jpegs, rank, slug
    from sparkml.topics import load_lda

    spark, lake = page.spark, page.lake
    lda = load_lda(spark, lake, cfg)
    known, skipped = [], []
    for q in QUERIES:
        try:
            known.append((q, embed_query(q, lda)))
        except UnknownQuery:
            skipped.append(q)
    out = ["<h3>Retrieval examples (the original's queries)</h3>"]
    if known:
        ranked = rank(_embeddings(spark, cfg, lake), "vector", np.stack([v for _, v in known]), k, cfg.retrieval.metric)
        images = jpegs(spark.read.parquet(lake.table("images")), [p for hits in ranked for p, _ in hits])
        for (q, _), hits in zip(known, ranked):
            out.append(sheet(page, f"query_{slug(q)}.png", f"{q!r}: top {len(hits)}",
                             [(p, s, images.get(p)) for p, s in hits]))
    if skipped:
        out.append(f'<p class="note">Not in this run\'s LDA vocabulary: {esc(", ".join(skipped))}.</p>')
    return out


def likability(page: Page) -> str | None:
    from sparkml.svm import PUBLISHED, TITLES

    spark, lake = page.spark, page.lake
    m = page.json(f"{lake.report('likability_svm')}/metrics.json") if page.complete("models/likability_svm") else None
    cnn = page.json(f"{lake.report('train_likability')}/metrics.json") if page.complete("models/likability") else None
    if m is None and cnn is None:
        return None
    out = []
    if m is not None:
        rows = [[TITLES.get(r["algorithm"], r["algorithm"]), r["layer"], r["variant"], r["test_ap"],
                 PUBLISHED.get((r["layer"], r["algorithm"], r["variant"]))] for r in m["results"]]
        ours = {r["layer"] for r in m["results"]}
        rows += [[TITLES.get(a, a), f"{layer} (the original's AlexNet)", v, None, ap]
                 for (layer, a, v), ap in PUBLISHED.items() if layer not in ours]
        rate = ", ".join(f"{k} {fmt(v)}" for k, v in m["test_positive_rate"].items())
        out += [f"<p>Average precision on the test split (positive rate {rate}: a classifier that knows nothing "
                "scores about that).</p>", table(["classifier", "layer", "variant", "test AP", "published"], rows)]
        out += top_and_bottom(page, m["best"])
    if cnn is not None:
        out.append(f"<h3>Fine-tuned CNN</h3><p>Test accuracy {fmt(cnn['test'].get('accuracy'))} (published 57%), "
                   f"AP {fmt(cnn['test'].get('ap'))}.</p>")
        out += curves(page, "likability")
    return "\n".join(out)


def top_and_bottom(page: Page, best: dict) -> list[str]:
    """The test images the best SVM ranks highest and lowest, as contact sheets (from tables/images)."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    from sparkml.retrieval import jpegs

    spark, lake = page.spark, page.lake
    if not page.complete("tables/images"):
        return ['<p class="note">No top and bottom test images: they are drawn from tables/images, which this lake '
                "does not have complete.</p>"]
    feats = spark.read.parquet(lake.table("features")).where(
        (F.col("layer") == best["layer"]) & ~F.col("mirrored") & (F.col("split") == "test"))
    model = PipelineModel.load(f"{lake.model('likability_svm')}/{best['model']}")
    scored = model.transform(feats.withColumn("features", array_to_vector("vector"))) \
        .select("post_id", "label", vector_to_array("rawPrediction")[1].alias("s")) \
        .orderBy(F.col("s").desc(), "post_id").collect()
    n_top = min(25, (len(scored) + 1) // 2)
    top, bottom = scored[:n_top], scored[::-1][:min(25, len(scored) - n_top)]
    images = jpegs(spark.read.parquet(lake.table("images")), [r["post_id"] for r in top + bottom])
    title = f"best SVM ({best['layer']}, {best['variant']})"
    return [f"<h3>Top {len(top)} test images by the {esc(title)}</h3>",
            sheet(page, "likability_top.png", f"top {len(top)}: predicted most likable",
                  [(r["post_id"], r["s"], images.get(r["post_id"])) for r in top]),
            f"<h3>Bottom {len(bottom)}</h3>",
            sheet(page, "likability_bottom.png", f"bottom {len(bottom)}: predicted least likable",
                  [(r["post_id"], r["s"], images.get(r["post_id"])) for r in bottom])]


def exploration(page: Page) -> str | None:
    if not page.complete("tables/clusters"):
        return None
    m = page.json(f"{page.lake.report('explore')}/metrics.json")
    rows = [[k + (" (kept)" if int(k) == m["k"] else ""), v] for k, v in m["silhouettes"].items()]
    labels = m["labels"] or {}
    clusters = [[c, n, ", ".join(f"{name} ({share:.0%})" for name, share in labels.get(c, [])) or "-"]
                for c, n in m["sizes"].items()]
    out = [f"<p>{m['rows']} images, features: {esc(m['features'])}; K-Means k = {m['k']} (best silhouette at "
           f"k = {m['best_silhouette_k']}).</p>", table(["k", "silhouette"], rows),
           page.img("explore/silhouette.png", "silhouette per k"), table(["cluster", "images", "labels"], clusters)]
    if m["labels_note"]:
        out.append(f'<p class="note">{esc(m["labels_note"])}</p>')
    if m.get("skipped_k"):
        out.append('<p class="note">k not measured: ' + esc("; ".join(f"{k} ({why})" for k, why in
                                                                     m["skipped_k"].items())) + "</p>")
    out += ["<h3>t-SNE map</h3>", page.img("explore/tsne.png", "t-SNE map")]
    out += ["<h3>Clusters (closest to the centre first)</h3>"] + [
        page.img(f"explore/{name}", f"cluster {c}") for c, name in m["sheets"].items()]
    return "\n".join(out)


def scoring(page: Page) -> str | None:
    if not page.complete("tables/scores"):
        return None
    s = page.json(f"{page.lake.table('scores')}/{SUMMARY_FILE}")
    rej = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected"].items())) or "none"
    missing = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in s.get("missing_models", {}).items())
    return (f"<p>{s['output_rows']} of {s['input_rows']} new images scored from <code>{esc(s['input'])}</code> "
            f"({s['images_per_s']} images/s); rejected: {esc(rej)}.</p>"
            + table(["model", "version", "rows"], [[k, v, s["rows_per_model"].get(k)] for k, v in s["models"].items()])
            + (f"<p>Not scored with:</p><ul>{missing}</ul>" if missing else ""))


SECTIONS = [  # (title, builder, the job that makes it)
    ("Dataset accounting", lambda p, c: accounting(p), "jobs/ingest.py, prepare_images.py, dedup.py, ..."),
    ("City classifier", lambda p, c: city(p), "jobs/train_cnn.py --task city"),
    ("Image topics and text-to-image retrieval", retrieval, "jobs/evaluate_retrieval.py"),
    ("Likability (#me selfies)", lambda p, c: likability(p), "jobs/train_svm.py or train_cnn.py --task likability"),
    ("Personal archive exploration", lambda p, c: exploration(p), "jobs/explore.py"),
    ("Batch scoring of new images", lambda p, c: scoring(p), "jobs/score.py"),
]


def write_report(spark, cfg):
    """<lake>/reports/index.html from whatever this run produced: a section per complete output
    made from the inputs there now; stale, partial or unreadable ones are listed with why, never
    shown as current. The new page and its pictures are written beside the old report, which they
    replace only once complete (a failed run leaves the old report whole)."""
    from sparkml.lake import Summary

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
            page.sections.append((title, body))
    toc = "".join(f'<li><a href="#s{i}">{esc(t)}</a></li>' for i, (t, _) in enumerate(page.sections))
    not_run = "".join(f"<li>{esc(t)}: run {esc(j)}</li>" for t, j in page.not_run)
    stale = "".join(f"<li>{esc(w)}: {esc(why)}</li>" for w, why in page.stale)
    parts = [f'<h2 id="s{i}">{esc(t)}</h2>\n{b}' for i, (t, b) in enumerate(page.sections)]
    doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>instalearn report</title>"
           f"<style>{CSS}</style></head><body><h1>instalearn: what this run produced</h1>"
           f"<p class=\"note\">Lake <code>{esc(lake.root)}</code>.</p><ul>{toc}</ul>"
           + (f"<p>Not run (no output in this lake):</p><ul>{not_run}</ul>" if not_run else "")
           + (f'<p class="bad">Not shown (stale, partial or unreadable):</p><ul>{stale}</ul>' if stale else "")
           + "\n".join(parts) + "</body></html>")
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
