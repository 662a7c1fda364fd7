"""Image preparation per record: safe decode, resize, re-encode, hashes.

Plain functions on plain values (usable without Spark); `prepare_batch` is the thin
adapter that runs them over an Arrow batch on executors.

Fast path: JPEG is decoded by libjpeg-turbo (simplejpeg), in the DCT domain at the largest
power-of-two reduction (1/8, 1/4, 1/2) that still leaves `oversample` x the target on each
side (a 12 MP phone photo decodes at 1/8, a 640x640 one at full size by default and at 1/2
with oversample 1). The result is resized straight into the planes of the 4:2:0 JPEG it
becomes: luma with an antialiased Lanczos-3 filter (OpenCV separable filter + cubic
sampling) at full resolution, chroma at half resolution, and encoded from those planes.
Decoding at exactly the target (oversample 1) is faster but softer: the DCT-domain shrink is
blockier than a Lanczos filter (measured in docs/benchmarks.md). Dimensions are checked
before decoding, so a decompression bomb costs a header read.

    out = prepare_image(open("x.jpg", "rb").read(), size=300)
    out.image  # JPEG bytes, 300x300
"""

from __future__ import annotations

import functools
import hashlib
import io
import threading
from dataclasses import dataclass
from struct import error as struct_error  # Pillow raises it on some corrupt headers

import cv2
import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import Image, ImageFile

from sparkml.schemas import Reason

# We enforce prepare.max_pixels ourselves from the header, before any decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ORIENTATION_TAG = 0x0112
POLICIES = ("squash", "crop")


@dataclass
class Prepared:
    image: bytes          # JPEG, size x size, RGB
    width: int            # original width as displayed (after EXIF orientation)
    height: int
    format: str           # jpeg, png, gif, webp, bmp, tiff
    mode: str             # original colour mode (RGB, L, CMYK, P, RGBA, ...)
    orientation: int      # EXIF orientation applied (1 = none)
    sha256: str           # of the original bytes
    gray32: np.ndarray    # 32x32 float32 luminance of the result, for the perceptual hash


@dataclass
class Rejected:
    reason: Reason
    detail: str


def sniff(data: bytes) -> str | None:
    """The container format from the leading bytes, or None if it is not an image we read."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB; transparency is composited on white."""
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, np.uint32)
        return np.repeat((arr >> 8 if arr.max() > 255 else arr).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an image array (the same transforms as ImageOps.exif_transpose)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return np.rot90(arr[:, ::-1], 1)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return np.rot90(arr[:, ::-1], -1)
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


@functools.lru_cache(maxsize=64)
def _lanczos(scale: float, a: int = 3) -> np.ndarray:
    """1-D Lanczos-a kernel stretched by `scale` (> 1: downscaling), normalised."""
    n = int(np.floor(a * scale))  # taps inside the window |x| < a; the next ones are zero
    x = np.arange(-n, n + 1, dtype=np.float64) / scale
    k = np.sinc(x) * np.sinc(x / a)
    return (k / k.sum()).astype(np.float32)


_IDENTITY = np.ones(1, np.float32)
_SCRATCH = threading.local()


_SCRATCH_MAX = 64 << 20  # bytes; anything larger (a rare huge decode) is not kept


def _scratch(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 work array reused by the next image of the same shape in this thread: fresh
    megabyte arrays per image cost page faults (~7% of a 640 px image's time, measured)."""
    if int(np.prod(shape)) > _SCRATCH_MAX:
        return np.empty(shape, np.uint8)
    a = getattr(_SCRATCH, key, None)
    if a is None or a.shape != shape:
        a = np.empty(shape, np.uint8)
        setattr(_SCRATCH, key, a)
    return a


def _downscale(arr: np.ndarray, width: int, height: int, scratch: str | None = None) -> np.ndarray:
    """Antialiased Lanczos-3 resize of a uint8 image with 1-4 channels: low-pass both axes at
    the output's Nyquist rate in one separable pass, then cubic sampling (Pillow's LANCZOS
    response within ~0.1-0.3 dB). An axis smaller than the target is only interpolated.
    `scratch` names a reusable buffer for the full-size filtered intermediate."""
    h, w = arr.shape[:2]
    if (h, w) == (height, width):
        return arr.copy()
    if w > 3 * width or h > 3 * height:  # big reductions: box-average most of the way first
        arr = cv2.resize(arr, (min(w, 2 * width), min(h, 2 * height)), interpolation=cv2.INTER_AREA)
        h, w = arr.shape[:2]
    if w > width or h > height:
        arr = cv2.sepFilter2D(arr, -1, _lanczos(w / width) if w > width else _IDENTITY,
                              _lanczos(h / height) if h > height else _IDENTITY,
                              dst=_scratch(scratch, arr.shape) if scratch else None, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(arr, (width, height), interpolation=cv2.INTER_CUBIC)


def _crop(arr: np.ndarray, policy: str) -> np.ndarray:
    """squash: the whole image (as the original study did); crop: the centre square."""
    h, w = arr.shape[:2]
    if policy == "crop" and h != w:
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        arr = arr[y:y + side, x:x + side]
    return np.ascontiguousarray(arr)


def _halve(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    return cv2.resize(arr, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)


def resize_planes(rgb: np.ndarray, size: int, policy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB -> the planes of a size x size 4:2:0 JPEG: Y (size x size), Cb and Cr (half size).

    The output keeps chroma at half resolution, where the JPEG encoding's own error dwarfs a
    resampling one, so only luma gets the full-resolution Lanczos; chroma is box-averaged 2x
    (and again while that still covers its target), converted, then resized. About a third of
    the work of resizing three full channels, and no colour conversion or subsampling left
    for the encoder."""
    rgb = _crop(rgb, policy)
    half = (size + 1) // 2
    luma = _downscale(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY, dst=_scratch("gray", rgb.shape[:2])), size, size, "luma")
    small = _halve(rgb)
    while min(small.shape[:2]) >= 2 * half:
        small = _halve(small)
    _, cr, cb = cv2.split(_downscale(cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb), half, half))
    return luma, cb, cr


def _decode_target(w: int, h: int, size: int, policy: str, oversample: float) -> tuple[int, int]:
    """The smallest decoded (width, height) that still covers the resize at `oversample`."""
    t = size * oversample
    if policy == "crop":
        side = min(w, h)
        return int(np.ceil(t * w / side)), int(np.ceil(t * h / side))
    return int(np.ceil(t)), int(np.ceil(t))


def _decode_scale(w: int, h: int, tw: int, th: int) -> tuple[int, int]:
    """The decoded size at the largest reduction 1/8, 1/4, 1/2 or 1/1 that still covers (tw, th).

    Only the power-of-two scales: libjpeg-turbo has SIMD inverse DCTs for those, while the
    other M/8 scales (3/8, 5/8, ...) decode slower than the full image (measured: 5/8 of a
    640x640 photo 1.4 ms, full size 0.75 ms)."""
    for f in (8, 4, 2):
        sw, sh = -(-w // f), -(-h // f)
        if sw >= tw and sh >= th:
            return sw, sh
    return w, h


def _decode_jpeg(data: bytes, width: int, height: int) -> np.ndarray | None:
    """libjpeg-turbo DCT-domain scaled decode to (width, height) from _decode_scale, into this
    thread's scratch buffer (valid until the next call), or None when libjpeg reports any
    damage (the caller then lets Pillow decide between a reject and a tolerable warning).
    Nearest-neighbour chroma upsampling: resize_planes box-averages chroma back anyway."""
    try:
        return simplejpeg.decode_jpeg(data, "RGB", fastupsample=True, min_width=width, min_height=height,
                                      buffer=_scratch("decoded", (height, width, 3)), strict=True)
    except ValueError:
        return None


def prepare_image(data: bytes, size: int = 300, policy: str = "squash", quality: int = 90,
                  max_pixels: int = 100_000_000, min_side: int = 32, oversample: float = 1.2) -> Prepared | Rejected:
    """Decode safely, orient, resize, re-encode; a bad file becomes a Rejected value."""
    fmt = sniff(data)
    if fmt is None:
        return Rejected(Reason.NOT_AN_IMAGE, f"unrecognized leading bytes {data[:8].hex()}")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
        w, h = im.size
        if w * h > max_pixels:
            return Rejected(Reason.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > prepare.max_pixels {max_pixels}")
        orientation = int(im.getexif().get(ORIENTATION_TAG, 1)) if fmt in ("jpeg", "tiff", "webp", "png") else 1
        orientation = orientation if 1 <= orientation <= 8 else 1
        if orientation >= 5:
            w, h = h, w
        if min(w, h) < min_side:
            return Rejected(Reason.TOO_SMALL, f"{w}x{h} is smaller than prepare.min_side {min_side}")
        mode = im.mode
        # Decoded dimensions are before orientation: swap the target back for quarter turns.
        tw, th = _decode_target(w, h, size, policy, oversample)
        if orientation >= 5:
            tw, th = th, tw
        arr = _decode_jpeg(data, *_decode_scale(*im.size, tw, th)) if fmt == "jpeg" and mode == "RGB" else None
        if arr is None:  # CMYK, grayscale, damaged JPEGs and every other format: Pillow decides
            if fmt == "jpeg":
                im.draft(mode, (tw, th))  # DCT-domain 1/2, 1/4, 1/8 only
            im.load()
            arr = _to_rgb(im)
    except Image.DecompressionBombError as e:  # pragma: no cover - MAX_IMAGE_PIXELS is off; kept as a guard
        return Rejected(Reason.DECOMPRESSION_BOMB, str(e))
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct_error) as e:
        msg = f"{type(e).__name__}: {e}"
        truncated = any(k in msg.lower() for k in ("truncated", "premature end"))
        reason = Reason.TRUNCATED_IMAGE if truncated else Reason.CORRUPT_IMAGE
        return Rejected(reason, msg[:300])
    # Orienting after the resize is exact (a square result commutes with the EXIF flips and
    # quarter turns) and touches size x size pixels instead of the full image.
    y, cb, cr = (np.ascontiguousarray(_orient(p, orientation)) for p in resize_planes(arr, size, policy))
    return Prepared(image=simplejpeg.encode_jpeg_yuv_planes(y, cb, cr, quality), width=w, height=h, format=fmt,
                    mode=mode, orientation=orientation, sha256=hashlib.sha256(data).hexdigest(), gray32=thumb32(y))


def thumb32(luma: np.ndarray) -> np.ndarray:
    """The 32x32 float32 luminance thumbnail the perceptual hash is taken from: exact 2x box
    steps while the side is >= 64 (6x cheaper than one 300 -> 32 area resize), then area."""
    while min(luma.shape) >= 64:
        luma = _halve(luma)
    return cv2.resize(luma, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m.astype(np.float32)


def phash(gray32: np.ndarray) -> np.ndarray:
    """64-bit DCT perceptual hashes of a stack of 32x32 images (N, 32, 32) -> int64[N].

    The classic pHash: 2-D DCT, keep the 8x8 lowest frequencies, one bit per coefficient
    above their median. Done for the whole batch in two matrix products."""
    g = np.asarray(gray32, np.float32).reshape(-1, 32, 32)
    d = _dct_matrix()
    low = (d @ g @ d.T)[:, :8, :8].reshape(len(g), 64)
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).view(np.int64).ravel()


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")


# ---------------------------------------------------------------- the Arrow adapter


IMAGES_ARROW = pa.schema([
    ("post_id", pa.string()), ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("format", pa.string()), ("mode", pa.string()), ("orientation", pa.int32()),
    ("sha256", pa.string()), ("phash", pa.int64()), ("reason", pa.string()), ("detail", pa.string()),
])


@functools.lru_cache(maxsize=1)
def _init_worker() -> None:
    cv2.setNumThreads(1)  # one Spark task per core: no nested thread pools


def prepare_batch(batch: pa.RecordBatch, **options) -> pa.RecordBatch:
    """post_id + image_bytes -> one row per post: the prepared image, or reason/detail if rejected."""
    _init_worker()
    results = [prepare_image(b, **options) for b in batch.column("image_bytes").to_pylist()]
    ok = [r for r in results if isinstance(r, Prepared)]
    hashes = iter(phash(np.stack([r.gray32 for r in ok])).tolist() if ok else [])

    def col(attr, kind):
        return pa.array([getattr(r, attr) if isinstance(r, Prepared) else None for r in results], kind)

    return pa.RecordBatch.from_arrays([
        batch.column("post_id"), col("image", pa.binary()), col("width", pa.int32()), col("height", pa.int32()),
        col("format", pa.string()), col("mode", pa.string()), col("orientation", pa.int32()),
        col("sha256", pa.string()),
        pa.array([next(hashes) if isinstance(r, Prepared) else None for r in results], pa.int64()),
        pa.array([r.reason.value if isinstance(r, Rejected) else None for r in results], pa.string()),
        pa.array([r.detail if isinstance(r, Rejected) else None for r in results], pa.string()),
    ], schema=IMAGES_ARROW)


# ---------------------------------------------------------------- the stage


def prepare_images(spark, cfg) -> "Summary":
    """posts -> <lake>/tables/images (+ rejects): one prepared image per decodable post."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from sparkml.lake import Lake, Summary, begin_output, read_table, write_rejected
    from sparkml.schemas import IMAGES

    lake = Lake(cfg.lake)
    out = lake.table("images")
    begin_output(spark, out)
    posts = read_table(spark, lake.table("posts"), "ingest")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.prepare.batch_rows))
    opts = dict(size=cfg.prepare.size, policy=cfg.prepare.policy, quality=cfg.prepare.quality,
                max_pixels=cfg.prepare.max_pixels, min_side=cfg.prepare.min_side,
                oversample=cfg.prepare.oversample)
    schema = T.StructType([T.StructField(f.name, f.dataType, True) for f in IMAGES.fields]
                          + [T.StructField("reason", T.StringType()), T.StructField("detail", T.StringType())])
    # Decoding is the cost: do it once, keep the result on local disk for the two writes.
    result = (posts.select("post_id", "image_bytes")
              .mapInArrow(lambda batches: (prepare_batch(b, **opts) for b in batches), schema)
              .persist(StorageLevel.DISK_ONLY))
    rejected = write_rejected(spark, lake, "prepare_images",
                              result.where(F.col("reason").isNotNull()).select("post_id", "reason", "detail"))
    good = result.where(F.col("reason").isNull())
    good.select(*IMAGES.fieldNames()).write.mode("overwrite").parquet(out)
    # One aggregate over the persisted result (not two more passes over the written table).
    counts = good.groupBy("format", "mode", (F.col("orientation") != 1).alias("reoriented")).count().collect()
    n_posts = posts.count()  # from the input, so a lost row shows as an imbalance
    result.unpersist()
    formats: dict[str, int] = {}
    modes: dict[str, int] = {}
    for r in counts:
        formats[r["format"]] = formats.get(r["format"], 0) + r["count"]
        modes[r["mode"]] = modes.get(r["mode"], 0) + r["count"]
    return Summary(stage="prepare_images", input_rows=n_posts, output_rows=sum(formats.values()),
                   rejected=rejected, output=out,
                   extra={"formats": formats, "modes": modes, "size": cfg.prepare.size, "policy": cfg.prepare.policy,
                          "oversample": cfg.prepare.oversample,
                          "reoriented": sum(r["count"] for r in counts if r["reoriented"])})
