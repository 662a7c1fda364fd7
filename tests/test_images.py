import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.schemas import IMG_DIR
from core.schemas import Reason
from sparkml.images.phash import hamming, phash, zoom_hashes
from sparkml.images.resize import Prepared, Rejected, _decode_scale, _plain_jpeg_size, _resample, prepare_image, sniff
from tests.conftest import SHARED, planted

REAL = SHARED / "data" / "realsample"


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255 ** 2 / np.mean((a - b) ** 2))


def _file(root: Path, pid: str) -> bytes:
    (path,) = list((root / IMG_DIR).glob(f"*/{pid}.*"))
    return path.read_bytes()


def test_bad_files_become_reasons(sample):
    root, truth = sample
    expect = {"truncated": Reason.TRUNCATED_IMAGE, "not_an_image": Reason.NOT_AN_IMAGE,
              "decompression_bomb": Reason.DECOMPRESSION_BOMB, "zero_byte": Reason.NOT_AN_IMAGE}
    for kind, reason in expect.items():
        for case in planted(truth, kind):
            out = prepare_image(_file(root, case["post_id"]))
            assert isinstance(out, Rejected) and out.reason == reason, (kind, out)
    assert prepare_image(b"GIF89a" + b"\x00" * 20).reason == Reason.CORRUPT_IMAGE
    tiny = _jpeg(Image.new("RGB", (8, 8)))
    assert prepare_image(tiny).reason == Reason.TOO_SMALL


def test_odd_formats_and_modes_become_300px_rgb_jpeg(sample):
    root, truth = sample
    for kind in ("png", "png_as_jpg", "gif", "webp", "cmyk", "grayscale", "exif_rotated"):
        for case in planted(truth, kind):
            out = prepare_image(_file(root, case["post_id"]), size=300)
            assert isinstance(out, Prepared), (kind, out)
            assert sniff(out.image) == "jpeg"
            img = Image.open(io.BytesIO(out.image))
            assert img.size == (300, 300) and img.mode == "RGB"
    (gif,) = planted(truth, "gif")
    assert prepare_image(_file(root, gif["post_id"])).mode == "P"


def test_exif_orientation_is_applied(sample):
    root, truth = sample
    for case in planted(truth, "exif_rotated"):
        data = _file(root, case["post_id"])
        out = prepare_image(data, size=128, policy="squash")
        assert out.orientation == 6 and [out.width, out.height] == case["displayed_size"]
        from PIL import ImageOps
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").resize((128, 128), Image.LANCZOS)
        upright = _psnr(_decode(out.image), np.asarray(shown, np.float32))
        sideways = _psnr(_decode(out.image), np.asarray(shown.rotate(90), np.float32))
        assert upright > 25 and upright > sideways + 5


def test_policies_and_quality_against_lanczos():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    data = _jpeg(base)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    ref = np.asarray(full.resize((300, 300), Image.LANCZOS), np.float32)
    baseline = _psnr(_decode(_jpeg(full.resize((300, 300), Image.LANCZOS))), ref)  # the original's way
    squash = prepare_image(data, size=300, policy="squash", quality=95)
    assert (squash.width, squash.height) == (1600, 1200)
    assert _psnr(_decode(squash.image), ref) > baseline - 1  # DCT-domain 1/2 decode (800x600) + Lanczos
    crop = prepare_image(data, size=300, policy="crop", quality=95)
    centre = np.asarray(full.crop((200, 0, 1400, 1200)).resize((300, 300), Image.LANCZOS), np.float32)
    assert _psnr(_decode(crop.image), centre) > _psnr(_decode(crop.image), ref) + 3


def test_decode_scale_is_the_largest_power_of_two_reduction_that_covers():
    assert _decode_scale(640, 640, 360, 360) == (640, 640)  # 1/2 would leave 320
    assert _decode_scale(720, 960, 360, 360) == (360, 480)
    assert _decode_scale(1080, 1080, 360, 360) == (540, 540)
    assert _decode_scale(3024, 4032, 360, 360) == (378, 504)  # 1/8
    assert _decode_scale(1001, 999, 125, 125) == (126, 125)  # rounds up, as libjpeg does


def test_only_plain_colour_jpegs_skip_pillows_header_read():
    rgb = Image.fromarray(np.zeros((40, 60, 3), np.uint8))
    assert _plain_jpeg_size(_jpeg(rgb)) == (60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert _plain_jpeg_size(_jpeg(rgb, exif=exif.tobytes())) is None  # the orientation is Pillow's to read
    assert _plain_jpeg_size(_jpeg(rgb.convert("L"))) is None
    assert _plain_jpeg_size(_jpeg(rgb.convert("CMYK"))) is None
    assert _plain_jpeg_size(b"\xff\xd8\xff\xe0garbage") is None


@pytest.mark.parametrize("shape, out", [((640, 640), (300, 300)), ((480, 720), (150, 150)), ((1000, 333), (200, 300)),
                                        ((33, 35), (300, 300)), ((40, 40), (20, 40)), ((64, 64), (64, 64))])
def test_resample_is_pillows_lanczos(shape, out):
    # Pillow's LANCZOS on float images (no 8-bit rounding between its two passes) is the
    # definition: ours must agree to the rounding, for reductions, enlargements, identity,
    # and for several planes resampled side by side.
    rng = np.random.default_rng(1)
    h, w = shape
    a = np.asarray(Image.fromarray(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1), dtype=np.uint8)).resize((w, h), Image.BICUBIC))
    planes = [a, np.ascontiguousarray(255 - a[::-1])]
    got = _resample(planes, out[1], out[0])
    for g, p in zip(got, planes):
        ref = np.asarray(Image.fromarray(p.astype(np.float32), "F").resize((out[1], out[0]), Image.LANCZOS))
        assert g.shape == out and g.dtype == np.uint8
        assert np.abs(g.astype(np.int32) - np.clip(np.rint(ref), 0, 255)).max() <= 1


def test_colours_and_odd_sizes_survive_the_planes():
    # Left half pure red, right half pure blue, a green bar: a swapped or shifted chroma
    # plane shows as the wrong colour, an odd size as a wrong chroma plane size.
    arr = np.zeros((480, 720, 3), np.uint8)
    arr[:, :360, 0] = 255
    arr[:, 360:, 2] = 255
    arr[200:280, :, :] = (0, 255, 0)
    for size, policy in ((225, "crop"), (301, "squash")):
        out = prepare_image(_jpeg(Image.fromarray(arr)), size=size, policy=policy)
        img = _decode(out.image)
        assert img.shape == (size, size, 3)
        q = size // 8
        for (y, x), colour in (((q, q), (255, 0, 0)), ((q, size - q), (0, 0, 255)), ((size // 2, size // 2), (0, 255, 0))):
            assert np.abs(img[y - 2:y + 3, x - 2:x + 3].mean(axis=(0, 1)) - colour).max() < 30, (size, policy, y, x)


def test_transparency_goes_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = prepare_image(buf.getvalue(), size=32)
    assert _decode(out.image).mean() > 240


def test_phash_separates_real_photos_and_survives_reencoding():
    photos = sorted((REAL / "faces").glob("*.jpg")) + sorted((REAL / "nonfaces").glob("*.jpg"))
    assert len(photos) == 24
    images = [Image.open(p).convert("RGB") for p in photos]
    hashes = [int(zoom_hashes(prepare_image(_jpeg(im)).hash_base[None])[0][0, 0]) for im in images]
    distinct = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distinct) > 12
    for im, h in zip(images, hashes):
        small = im.resize((im.width * 2 // 3, im.height * 2 // 3))
        assert hamming(h, int(zoom_hashes(prepare_image(_jpeg(small, subsampling=2)).hash_base[None])[0][0, 0])) <= 4


def test_phash_batch_matches_single():
    rng = np.random.default_rng(1)
    g = rng.uniform(0, 255, (5, 32, 32)).astype(np.float32)
    batch = phash(g)
    assert batch.dtype == np.int64 and len(set(batch.tolist())) == 5
    assert [int(phash(g[i:i + 1])[0]) for i in range(5)] == batch.tolist()
    assert all(bin(int(h) & (2**64 - 1)).count("1") == 32 for h in batch)  # median split: half the bits


@pytest.mark.parametrize("pair", [("1014", "1697"), ("1016", "1699"), ("1046", "469"), ("1050", "1733")])
def test_real_reuploads_hash_identically(pair):
    import hashlib

    raw = [(REAL / "duplicates" / f"{p}.jpg").read_bytes() for p in pair]
    a, b = (prepare_image(r) for r in raw)
    # the digest is of the original bytes (what exact dedup compares), not of the re-encoded image
    assert a.sha256 == b.sha256 == hashlib.sha256(raw[0]).hexdigest() != hashlib.sha256(a.image).hexdigest()
    assert (zoom_hashes(a.hash_base[None])[0] == zoom_hashes(b.hash_base[None])[0]).all()
