"""Image preparation per record: format sniffing, safe decode (EXIF orientation, header checks
before any pixel is decoded), resize to the square the datasets store, JPEG re-encode.

Plain functions on plain values (no Spark); sparkml.images.prepare_images.prepare_batch is the adapter that
runs them over an Arrow batch on executors, and sparkml.images.phash hashes the result.

Fast path: JPEG is decoded by libjpeg-turbo (simplejpeg), in the DCT domain at the largest
power-of-two reduction (1/8, 1/4, 1/2) that still leaves `oversample` x the target on each
side (a 12 MP phone photo decodes at 1/8, a 640x640 one at full size by default and at 1/2
with oversample 1). The result is resized straight into the planes of the 4:2:0 JPEG it
becomes: luma with Pillow's antialiased LANCZOS from full resolution (the same weights,
evaluated only at the output positions by a numba-compiled loop), chroma at half
resolution, and encoded from those planes. A colour JPEG without metadata segments has its
header read by libjpeg alone; anything else goes through Pillow's open (EXIF orientation).
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
import math
import threading
from dataclasses import dataclass

import cv2
import numba
import numpy as np
import simplejpeg
from PIL import Image, ImageFile

from core.schemas import Reason
from sparkml.images.phash import hash_base

# We enforce prepare.max_pixels ourselves from the header, before any decoding.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ORIENTATION_TAG = 0x0112


@dataclass
class Prepared:
    image: bytes          # JPEG, size x size, RGB
    width: int            # original width as displayed (after EXIF orientation)
    height: int
    format: str           # jpeg, png, gif, webp, bmp, tiff
    mode: str             # original colour mode (RGB, L, CMYK, P, RGBA, ...)
    orientation: int      # EXIF orientation applied (1 = none)
    sha256: str           # of the original bytes
    hash_base: np.ndarray  # the result's luminance at 64..127 px a side, for the perceptual hashes


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


def _grey8(arr: np.ndarray, floating: bool) -> np.ndarray:
    """One 16/32-bit integer or float channel -> uint8: float data in [0, 1] x 255, data within
    0..255 as it is, 16-bit data / 256, anything else stretched from its minimum to its maximum
    (NaN and infinities as 0)."""
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if floating and lo >= 0 and hi <= 1:
        a = a * 255
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a // 256
    else:
        a = (a - lo) * (255 / (hi - lo))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB; transparency is composited on white."""
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.repeat(_grey8(np.asarray(im), floating=im.mode == "F")[..., None], 3, axis=2)
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
def _lanczos_taps(n_in: int, n_out: int, a: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's LANCZOS along one axis as taps: output j = sum_t w[j, t] * input[lo[j] + t].

    Output j is centred at (j + 0.5) * n_in / n_out; its weights are the Lanczos-a kernel
    stretched by the reduction, so it low-passes at the output's Nyquist rate (antialiased;
    plain Lanczos interpolation when enlarging), clipped at the edges and renormalised,
    exactly as Pillow's resample computes them. Windows are shifted to lie inside the
    input, with zero weights where Pillow's window is shorter."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale
    first = np.maximum((centre - a * stretch + 0.5).astype(np.int64), 0)
    end = np.minimum((centre + a * stretch + 0.5).astype(np.int64), n_in)
    k = min(int((end - first).max()), n_in)
    lo = np.minimum(first, n_in - k)
    idx = lo[:, None] + np.arange(k)[None, :]
    x = (idx - centre[:, None] + 0.5) / stretch
    w = np.sinc(x) * np.sinc(x / a) * ((idx >= first[:, None]) & (idx < end[:, None]) & (np.abs(x) < a))
    return lo, (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _compiled(fn):
    """numba-compile fn with its machine code cached on disk, so a new Python worker loads it
    instead of compiling it again: its first image takes 0.33 s instead of 0.77 s (measured,
    `bench/prepare.py --cold-only`). Code
    shipped in a zip (--py-files) has no cache location numba accepts unless NUMBA_CACHE_DIR
    names one: it is then compiled per worker as before."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


@_compiled
def _resample_rows(src, lo, w, out):  # pragma: no cover - compiled by numba
    """out[j] = sum_t w[j, t] * src[lo[j] + t] for whole rows: the inner loop runs along a
    contiguous row, which LLVM vectorises (uint8 or float32 in, float32 out)."""
    for j in range(out.shape[0]):
        acc = out[j]
        acc[:] = 0.0
        for t in range(w.shape[1]):
            wt = w[j, t]
            row = src[lo[j] + t]
            for x in range(acc.shape[0]):
                acc[x] += wt * row[x]


_SCRATCH = threading.local()
_SCRATCH_MAX = 64 << 20  # bytes; anything larger (a rare huge decode) is not kept
_SCRATCH_KEEP = 16       # arrays kept per thread (images of many sizes would grow it otherwise)


def _scratch(key: str, shape: tuple[int, ...], dtype: type = np.uint8) -> np.ndarray:
    """A work array reused by the next image of the same shape in this thread: fresh
    megabyte arrays per image cost page faults (~7% of a 640 px image's time, measured)."""
    kept = _SCRATCH.__dict__
    a = kept.get((key, shape, dtype))
    if a is None:
        a = np.empty(shape, dtype)
        if a.nbytes <= _SCRATCH_MAX:
            if len(kept) >= _SCRATCH_KEEP:
                del kept[next(iter(kept))]
            kept[key, shape, dtype] = a
    return a


def _resample(planes: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    """Lanczos-3 resize of uint8 planes of one shape: Pillow's LANCZOS to within rounding (the
    filter evaluated only at the output positions, in float32, rounded once). Rows first, for
    all planes side by side, then a transpose so the columns are resampled as rows too."""
    h, w = planes[0].shape
    n = len(planes)
    src = planes[0] if n == 1 else np.concatenate(planes, axis=1)
    rows = _scratch("resample_rows", (height, n * w), np.float32)
    if h != height:
        _resample_rows(np.ascontiguousarray(src), *_lanczos_taps(h, height), rows)
    else:
        np.copyto(rows, src)
    cols = cv2.transpose(rows, dst=_scratch("resample_cols", (n * w, height), np.float32))
    out = []
    for i in range(n):
        plane = cols[i * w:(i + 1) * w]
        if w != width:
            resampled = _scratch("resample_out", (width, height), np.float32)
            _resample_rows(plane, *_lanczos_taps(w, width), resampled)
            plane = resampled
        out.append(cv2.transpose(cv2.add(plane, 0.0, dtype=cv2.CV_8U)))  # rounded, saturated
    return out


def _crop(arr: np.ndarray, policy: str) -> np.ndarray:
    """squash: the whole image (as the original study did); crop: the centre square."""
    h, w = arr.shape[:2]
    if policy == "crop" and h != w:
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        arr = arr[y:y + side, x:x + side]
    return np.ascontiguousarray(arr)


def _halve(arr: np.ndarray, scratch: str | None = None) -> np.ndarray:
    h, w = arr.shape[:2]
    size = ((w + 1) // 2, (h + 1) // 2)
    dst = _scratch(scratch, (size[1], size[0]) + arr.shape[2:]) if scratch else None
    return cv2.resize(arr, size, dst=dst, interpolation=cv2.INTER_AREA)


def resize_planes(rgb: np.ndarray, size: int, policy: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB -> the planes of a size x size 4:2:0 JPEG: Y (size x size), Cb and Cr (half size).

    The output keeps chroma at half resolution, where the JPEG encoding's own error dwarfs a
    resampling one, so only luma gets the Lanczos from full resolution; chroma is box-averaged
    2x (and again while that still covers its target), converted, then resized. About a third
    of the work of resizing three full channels, and no colour conversion or subsampling left
    for the encoder."""
    rgb = _crop(rgb, policy)
    half = (size + 1) // 2
    [luma] = _resample([cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY, dst=_scratch("gray", rgb.shape[:2]))], size, size)
    small = _halve(rgb, "halved")
    while min(small.shape[:2]) >= 2 * half:
        small = _halve(small)
    _, cr, cb = cv2.split(cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb))
    cb, cr = _resample([cb, cr], half, half)
    return luma, cb, cr


def _decode_target(w: int, h: int, size: int, policy: str, oversample: float) -> tuple[int, int]:
    """The smallest decoded (width, height) that still covers the resize at `oversample`."""
    t = size * oversample
    if policy == "crop":
        side = min(w, h)
        return math.ceil(t * w / side), math.ceil(t * h / side)
    return math.ceil(t), math.ceil(t)


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


def _plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a colour (YCbCr) JPEG that has no APP1 segment, from libjpeg's header
    read and a walk over the marker segments: a few microseconds against ~50 for Pillow's
    open. None for anything else (grayscale, CMYK, Exif or XMP metadata that may carry an
    orientation, an unreadable header): Pillow reads those."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace != "YCbCr":
        return None
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xE1:  # Exif or XMP
            return None
        if marker in (0xDA, 0xD9):  # start of scan: the metadata segments are behind us
            return width, height
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def _decode_jpeg(data: bytes, width: int, height: int) -> tuple[np.ndarray | None, str | None]:
    """libjpeg-turbo DCT-domain scaled decode to (width, height) from _decode_scale, into this
    thread's scratch buffer (valid until the next call); (None, libjpeg's message) when it
    reports any damage (the caller then decides between a reject and a tolerable warning).
    Nearest-neighbour chroma upsampling: resize_planes box-averages chroma back anyway."""
    try:
        return simplejpeg.decode_jpeg(data, "RGB", fastupsample=True, min_width=width, min_height=height,
                                      buffer=_scratch("decoded", (height, width, 3)), strict=True), None
    except ValueError as e:
        return None, str(e)


def prepare_image(data: bytes, size: int = 300, policy: str = "squash", quality: int = 90,
                  max_pixels: int = 100_000_000, min_side: int = 32, oversample: float = 1.2) -> Prepared | Rejected:
    """Decode safely, orient, resize, re-encode; a bad file becomes a Rejected value."""
    fmt = sniff(data)
    if fmt is None:
        return Rejected(Reason.NOT_AN_IMAGE, f"unrecognized leading bytes {data[:8].hex()}")
    try:
        im, header = None, _plain_jpeg_size(data) if fmt == "jpeg" else None
        if header:  # a colour JPEG without metadata segments: no orientation to read
            (w, h), mode, orientation = header, "RGB", 1
        else:
            im = Image.open(io.BytesIO(data))  # reads the header only
            (w, h), mode = im.size, im.mode
            orientation = int(im.getexif().get(ORIENTATION_TAG, 1)) if fmt in ("jpeg", "tiff", "webp", "png") else 1
            orientation = orientation if 1 <= orientation <= 8 else 1
        stored = (w, h)  # as decoded, before orientation
        if w * h > max_pixels:
            return Rejected(Reason.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > prepare.max_pixels {max_pixels}")
        if orientation >= 5:
            w, h = h, w
        if min(w, h) < min_side:
            return Rejected(Reason.TOO_SMALL, f"{w}x{h} is smaller than prepare.min_side {min_side}")
        # Decoded dimensions are before orientation: swap the target back for quarter turns.
        tw, th = _decode_target(w, h, size, policy, oversample)
        if orientation >= 5:
            tw, th = th, tw
        arr, damage = _decode_jpeg(data, *_decode_scale(*stored, tw, th)) if fmt == "jpeg" and mode == "RGB" \
            else (None, None)
        if damage and "premature end of data segment" in damage.lower():
            # the scan ends before the rows the header claims: Pillow would pad the rest with grey
            return Rejected(Reason.TRUNCATED_IMAGE, f"{damage} ({w}x{h} claimed)")
        if arr is None:  # CMYK, grayscale, damaged JPEGs and every other format: Pillow decides
            if im is None:
                im = Image.open(io.BytesIO(data))
            if fmt == "jpeg":
                im.draft(mode, (tw, th))  # DCT-domain 1/2, 1/4, 1/8 only
            im.load()
            arr = _to_rgb(im)
    except Image.DecompressionBombError as e:  # pragma: no cover - MAX_IMAGE_PIXELS is off; kept as a guard
        return Rejected(Reason.DECOMPRESSION_BOMB, str(e))
    # Any failure of the decoders on these bytes (Pillow's plugins raise more than their
    # documented types on damaged headers) is this file's reject, never the job's end.
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        truncated = any(k in msg.lower() for k in ("truncated", "premature end"))
        reason = Reason.TRUNCATED_IMAGE if truncated else Reason.CORRUPT_IMAGE
        return Rejected(reason, msg[:300])
    # Orienting after the resize is exact (a square result commutes with the EXIF flips and
    # quarter turns) and touches size x size pixels instead of the full image.
    y, cb, cr = (np.ascontiguousarray(_orient(p, orientation)) for p in resize_planes(arr, size, policy))
    return Prepared(image=simplejpeg.encode_jpeg_yuv_planes(y, cb, cr, quality), width=w, height=h, format=fmt,
                    mode=mode, orientation=orientation, sha256=hashlib.sha256(data).hexdigest(),
                    hash_base=hash_base(y))
