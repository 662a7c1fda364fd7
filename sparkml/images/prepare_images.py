"""The prepare_images stage: posts -> <lake>/tables/images (+ rejects), one prepared image per
decodable post. The per-record work is sparkml.images.resize.prepare_image; `prepare_batch` is the thin
adapter that runs it over an Arrow batch on executors."""

from __future__ import annotations

import functools

import cv2
import numpy as np
import pyarrow as pa

from core.schemas import TABLES, to_arrow, with_reject
from sparkml.images.phash import zoom_hashes
from sparkml.images.resize import Prepared, Rejected, prepare_image

RESULT_ARROW = to_arrow(with_reject(TABLES["images"].schema))


@functools.lru_cache(maxsize=1)
def _init_worker() -> None:
    cv2.setNumThreads(1)  # one Spark task per core: no nested thread pools


def prepare_batch(batch: pa.RecordBatch, **options) -> pa.RecordBatch:
    """post_id + image_bytes -> one row per post: the prepared image, or reason/detail if rejected."""
    _init_worker()
    results = [prepare_image(b, **options) for b in batch.column("image_bytes").to_pylist()]
    ok = [r for r in results if isinstance(r, Prepared)]
    hashes = iter(zip(*(h.tolist() for h in zoom_hashes(np.stack([r.hash_base for r in ok])))) if ok else ())
    per = [next(hashes) if isinstance(r, Prepared) else None for r in results]

    def col(attr):
        return [getattr(r, attr) if isinstance(r, Prepared) else None for r in results]

    columns = {
        "post_id": batch.column("post_id").to_pylist(),
        **{name: col(name) for name in ("image", "width", "height", "format", "mode", "orientation", "sha256")},
        "phash": [h[0][0] if h else None for h in per],
        "zoom_phash": [h[0][1:] if h else None for h in per],
        "phash256": [h[1] if h else None for h in per],
        "reason": [r.reason.value if isinstance(r, Rejected) else None for r in results],
        "detail": [r.detail if isinstance(r, Rejected) else None for r in results],
    }
    return pa.RecordBatch.from_pydict(columns, schema=RESULT_ARROW)


def options(p) -> dict:
    """prepare_image's keyword arguments from the prepare.* config section."""
    return dict(size=p.size, policy=p.policy, quality=p.quality, max_pixels=p.max_pixels, min_side=p.min_side,
                oversample=p.oversample)


def prepare_images(spark, cfg) -> "Summary":
    """posts -> <lake>/tables/images (+ rejects): one prepared image per decodable post."""
    from pyspark.sql import functions as F

    from core.lake import Lake, Summary, begin_output, per_record, read_table

    lake = Lake(cfg.lake)
    out = lake.table("images")
    begin_output(spark, out)
    posts = read_table(spark, lake, "posts")
    p = cfg.prepare
    opts = options(p)
    with per_record(spark, lake, "prepare_images", posts.select("post_id", "image_bytes"),
                    lambda b: prepare_batch(b, **opts), "images", p.batch_rows) as (good, rejected):
        # One aggregate over the persisted result (not two more passes over the written table).
        counts = good.groupBy("format", "mode", (F.col("orientation") != 1).alias("reoriented")).count().collect()
    n_posts = posts.count()  # from the input, so a lost row shows as an imbalance
    formats: dict[str, int] = {}
    modes: dict[str, int] = {}
    for r in counts:
        formats[r["format"]] = formats.get(r["format"], 0) + r["count"]
        modes[r["mode"]] = modes.get(r["mode"], 0) + r["count"]
    return Summary(stage="prepare_images", input_rows=n_posts, output_rows=sum(formats.values()),
                   rejected=rejected, output=out,
                   extra={"formats": formats, "modes": modes, "size": p.size, "policy": p.policy,
                          "oversample": p.oversample,
                          "reoriented": sum(r["count"] for r in counts if r["reoriented"])})
