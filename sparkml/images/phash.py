"""Perceptual hashes of prepared images, for near-duplicate search (sparkml.images.dedup).

    g = thumb32(luma)      # 32x32 float32 thumbnail of a prepared image's luminance
    phash(np.stack([g]))   # -> int64[1], the classic 64-bit DCT pHash

Re-posts are often cropped or framed differently, and the whole image's 64-bit pHash stops
matching beyond ~2% per side. So every image also gets the hashes of centred zooms (ZOOMS:
crops of 2.5% and 5% per side): a copy cropped by c per side hashes like the original's zoom
nearest c, and a framed copy's zoom like the original. Each zoom also has a 256-bit hash
(16x16 lowest DCT frequencies) that dedup uses to verify the candidates the 64-bit band
search finds: unrelated photos that come close in 64 bits stay far apart in 256.

    h64, h256 = zoom_hashes(np.stack([hash_base(luma)]))  # int64 (1, 3) and (1, 3 * 4)
"""

from __future__ import annotations

import functools

import cv2
import numpy as np


def _halve(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    return cv2.resize(arr, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)


def thumb32(luma: np.ndarray) -> np.ndarray:
    """A 32x32 float32 luminance thumbnail: exact 2x box steps while the side is >= 64, then
    area. With `phash` it is the single whole-image hash the pipeline used before the zooms,
    kept as bench/dedup.py's reference for recall and hashing cost."""
    while min(luma.shape) >= 64:
        luma = _halve(luma)
    return cv2.resize(luma, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


ZOOMS = (0.0, 0.025, 0.05)  # centred crops, fraction of the side cut from each side; the first is the whole image
WORDS_256 = 4  # int64 words per 256-bit hash


def hash_base(luma: np.ndarray) -> np.ndarray:
    """The luminance the hashes are computed from: exact 2x box steps down to 64..127 px a side
    (75 for a 300 px image); float32."""
    while min(luma.shape) >= 128:
        luma = _halve(luma)
    return luma.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _zoom_dct(n: int, zoom: float) -> np.ndarray:
    """(16, n): the 16 lowest DCT-II rows of a 32-sample box (area) resize of the centred window
    [zoom * n, (1 - zoom) * n) of n samples. Resize and DCT in one matrix, so a zoom's hash costs
    two small matrix products and no image is resampled."""
    lo, step = zoom * n, (1 - 2 * zoom) * n / 32
    box = np.zeros((32, n))
    for j in range(32):
        a, b = lo + j * step, lo + (j + 1) * step
        for i in range(int(a), min(n, int(np.ceil(b)))):
            box[j, i] = max(0.0, min(b, i + 1) - max(a, i)) / step
    return (_dct_matrix()[:16].astype(np.float64) @ box).astype(np.float32)


def _bits(low: np.ndarray) -> np.ndarray:
    """One bit per coefficient above the row's median, packed into big-endian int64 words."""
    bits = low > np.median(low, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).view(np.int64)


def zoom_hashes(bases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w) hash bases -> 64-bit pHashes int64 (N, Z) (8x8 lowest frequencies of each zoom's
    32x32 thumbnail) and 256-bit hashes int64 (N, Z * 4) (16x16), one column block per ZOOMS."""
    bases = np.asarray(bases, np.float32)
    n, h, w = bases.shape
    h64, h256 = [], []
    for z in ZOOMS:
        coef = _zoom_dct(h, z) @ bases @ _zoom_dct(w, z).T  # (N, 16, 16)
        h64.append(_bits(coef[:, :8, :8].reshape(n, 64)))
        h256.append(_bits(coef.reshape(n, 256)))
    return np.concatenate(h64, axis=1), np.concatenate(h256, axis=1)


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
    return _bits((d @ g @ d.T)[:, :8, :8].reshape(len(g), 64)).ravel()


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & 0xFFFFFFFFFFFFFFFF).count("1")
