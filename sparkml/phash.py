"""Perceptual hashes of prepared images, for near-duplicate search (sparkml.dedup).

    g = thumb32(luma)      # 32x32 float32 thumbnail of a prepared image's luminance
    phash(np.stack([g]))   # -> int64[1], the classic 64-bit DCT pHash
"""

from __future__ import annotations

import functools

import cv2
import numpy as np


def _halve(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    return cv2.resize(arr, ((w + 1) // 2, (h + 1) // 2), interpolation=cv2.INTER_AREA)


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
