"""A deterministic, learnable InstaCities1M-like sample with the mess real data has.

Writes, under `out`:

    img_resized_1M/cities_instagram/<city>/<id>.jpg     images (640x640 mostly; some 300, phone sizes)
    captions_resized_1M/cities_instagram/<city>/<id>.txt captions (UTF-8 unless planted otherwise)
    manifest.jsonl    the same posts with user_id, likes, followers, posted_at (images by relative path)
    me/<id>.jpg       '#me' posts (manifest only): real faces in scenes, quote images (sparkml.sample.selfies)
    ground_truth.json every planted case: post_id, kind, and what it is a copy of; per '#me' post
                      its kind, face box and like-ratio factors

Learnable, not noise: each city has its own palette, ground texture (stripe angle and
frequency) and landmark shape; each post has one or two topics (night, beach, food, ...)
with a visual cue and caption words; 10% of images wear another city's style (label
noise). Likes over followers depend on the topic, so likability is learnable too.

    generate(Sample(out="./data/sample", posts=2000, seed=7))
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.config import Sample
from core.schemas import CAP_DIR, CITIES, IMG_DIR
from sparkml.sample.selfies import AS_OF, MePost, write_me


GROUND_TRUTH = "ground_truth.json"
MANIFEST = "manifest.jsonl"

SHAPES = ("circle", "rect", "triangle", "diamond", "bars")

CITY_WORDS = {
    "london": ["thames", "bigben", "uk", "tube", "piccadilly", "soho"],
    "newyork": ["nyc", "manhattan", "brooklyn", "timessquare", "centralpark", "bigapple"],
    "sydney": ["operahouse", "bondi", "harbour", "aussie", "nsw", "manly"],
    "losangeles": ["la", "hollywood", "venice", "santamonica", "dtla", "socal"],
    "chicago": ["windycity", "chitown", "bean", "lakemichigan", "loop", "wrigley"],
    "melbourne": ["melbs", "yarra", "flinders", "stkilda", "laneways", "victoria"],
    "miami": ["southbeach", "wynwood", "brickell", "florida", "ocean", "keybiscayne"],
    "toronto": ["cntower", "the6ix", "ontario", "yyz", "kensington", "distillery"],
    "singapore": ["marinabay", "sentosa", "merlion", "hawker", "orchard", "sg"],
    "sanfrancisco": ["goldengate", "sf", "bayarea", "alcatraz", "mission", "cablecar"],
}

TOPIC_WORDS = {
    "night": ["night", "nightlife", "lights", "dark", "moon", "midnight"],
    "beach": ["beach", "sand", "sea", "surf", "summer", "waves"],
    "sunset": ["sunset", "golden", "sky", "evening", "dusk", "goldenhour"],
    "food": ["food", "foodie", "brunch", "delicious", "dinner", "yummy"],
    "snow": ["snow", "winter", "cold", "frozen", "snowday", "ice"],
    "skyline": ["skyline", "architecture", "building", "tower", "downtown", "skyscraper"],
    "party": ["party", "friends", "fun", "drinks", "weekend", "celebration"],
    "coffee": ["coffee", "latte", "cafe", "morning", "espresso", "barista"],
}
TOPICS = tuple(TOPIC_WORDS)
# Likes per follower: people like sunsets and food more than dark night shots.
TOPIC_APPEAL = {"night": 0.7, "beach": 1.4, "sunset": 1.8, "food": 1.5, "snow": 1.0,
                "skyline": 1.0, "party": 0.9, "coffee": 1.1}

FILLER = ["love", "instagood", "photooftheday", "happy", "beautiful", "today", "best", "new",
          "day", "life", "travel", "city", "good", "home", "tbt", "amazing"]
STOP = ["the", "a", "in", "with", "and", "at", "my", "of", "to", "for", "on", "this", "is", "so"]
EXTRAS = ["\U0001F60D", "\u2764\ufe0f", "http://t.co/x7Gq2", "@friend_12", "www.example.com/p/1", "!!", "..."]


@dataclass(frozen=True)
class CityStyle:
    sky: tuple[int, int, int]
    ground: tuple[int, int, int]
    accent: tuple[int, int, int]
    horizon: float
    stripe_angle: float
    stripe_freq: float
    shape: str


def city_styles() -> dict[str, CityStyle]:
    """Fixed per city (independent of the sample seed), so every sample shares the same cues."""
    rng = np.random.default_rng(20171001)
    styles = {}
    for i, city in enumerate(CITIES):
        sky = tuple(int(v) for v in rng.integers(60, 230, 3))
        ground = tuple(int(v) for v in rng.integers(30, 200, 3))
        accent = tuple(int(v) for v in rng.integers(0, 256, 3))
        styles[city] = CityStyle(
            sky=sky, ground=ground, accent=accent,
            horizon=float(0.35 + 0.3 * ((i * 7) % 10) / 9),
            stripe_angle=float(np.pi * i / len(CITIES)),
            stripe_freq=float(4 + 3 * (i % 4)),
            shape=SHAPES[i % len(SHAPES)],
        )
    return styles


STYLES = city_styles()
BASE = 256  # images are drawn at this size, then resized to the post's size


def render(style: CityStyle, topics: list[str], rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draw one post's image: city palette, texture and landmarks, then topic cues."""
    h = w = BASE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / BASE
    horizon = style.horizon + rng.normal(0, 0.08)
    sky = np.array(style.sky, np.float32) + rng.normal(0, 12, 3)
    ground = np.array(style.ground, np.float32) + rng.normal(0, 12, 3)
    img = np.empty((h, w, 3), np.float32)
    grad = (1.15 - 0.35 * yy / max(horizon, 0.1))[..., None]
    img[:] = sky * grad
    if "sunset" in topics:
        t = np.clip(yy / max(horizon, 0.1), 0, 1)[..., None]
        img[:] = np.array([250, 120, 60], np.float32) * (1 - t) + np.array([200, 60, 140], np.float32) * t
    below = yy > horizon
    theta = style.stripe_angle + rng.normal(0, 0.08)
    stripes = np.sin(2 * np.pi * style.stripe_freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    tex = ground[None, None, :] * (1 + 0.25 * stripes[..., None])
    img[below] = tex[below]

    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    # Scene clutter: a few large objects of random tone and place. They carry no label, but
    # give every photo its own coarse layout, as real photos have (perceptual hashes of
    # distinct images must differ as they do on real data).
    for _ in range(int(rng.integers(4, 8))):
        cx, cy = rng.uniform(0, 1) * w, rng.uniform(0, 1) * h
        rx, ry = rng.uniform(0.1, 0.3) * w, rng.uniform(0.1, 0.3) * h
        tone = tuple(int(v) for v in np.clip(rng.uniform(10, 245) + rng.normal(0, 20, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([cx - rx, cy - ry, cx + rx, cy + ry], fill=tone)
    accent = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in style.accent)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.15, 0.85) * h
        r = rng.uniform(0.05, 0.12) * w
        _shape(draw, style.shape, cx, cy, r, accent)
    for topic in topics:
        _topic_cue(draw, topic, rng, w, h, horizon)
    arr = np.asarray(pil, np.float32)
    if "night" in topics:
        arr *= 0.35
        for _ in range(40):
            x, y = int(rng.integers(0, w - 3)), int(rng.integers(0, h - 3))
            arr[y:y + 3, x:x + 3] = (255, 220, 120)
    arr *= rng.uniform(0.85, 1.15)
    arr += rng.normal(0, 8, 3)
    pil = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    # Fine grain at the final size, like sensor noise: keeps the JPEGs photo-like.
    final = np.asarray(pil, np.int16) + rng.integers(-4, 5, (size[1], size[0], 1), dtype=np.int16)
    return Image.fromarray(np.clip(final, 0, 255).astype(np.uint8))


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, color) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif kind == "rect":
        draw.rectangle([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=color)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=color)
    else:  # bars
        for k in range(3):
            x = cx - r + k * r * 0.8
            draw.rectangle([x, cy - r * 1.5, x + r * 0.4, cy + r], fill=color)


def _topic_cue(draw: ImageDraw.ImageDraw, topic: str, rng: np.random.Generator, w: int, h: int, horizon: float) -> None:
    """Each topic's cue, placed and sized at random so it is recognisable but not a fixed layout."""
    cx, cy, r = rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.7) * h, rng.uniform(0.15, 0.3) * w
    if topic == "beach":
        top = rng.uniform(0.6, 0.85) * h
        draw.rectangle([0, top, w, h], fill=(230, 210, 150))
        draw.rectangle([0, top - rng.uniform(0.06, 0.14) * h, w, top], fill=(40, 120, 200))
    elif topic == "food":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(245, 245, 240))
        for _ in range(4):
            x, y = cx + rng.uniform(-0.6, 0.4) * r, cy + rng.uniform(-0.6, 0.4) * r
            c = tuple(int(v) for v in rng.integers(60, 230, 3))
            draw.ellipse([x, y, x + r * 0.3, y + r * 0.3], fill=c)
    elif topic == "snow":
        for _ in range(300):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            draw.ellipse([x, y, x + 2, y + 2], fill=(250, 250, 255))
    elif topic == "skyline":
        x = rng.uniform(-0.2, 0.3) * w
        end = x + rng.uniform(0.5, 1.0) * w
        while x < end:
            bw = rng.uniform(0.04, 0.1) * w
            top = horizon * h - rng.uniform(0.1, 0.35) * h
            draw.rectangle([x, top, x + bw, horizon * h], fill=(35, 35, 45))
            x += bw + 2
    elif topic == "party":
        for _ in range(120):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            draw.rectangle([x, y, x + 4, y + 3], fill=c)
    elif topic == "coffee":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(235, 225, 210))
        draw.ellipse([cx - 0.7 * r, cy - 0.7 * r, cx + 0.7 * r, cy + 0.7 * r], fill=(110, 70, 40))


def caption_for(city: str, topics: list[str], rng: np.random.Generator) -> str:
    words: list[str] = []
    if rng.random() < 0.75:
        name = city if rng.random() < 0.5 else "#" + city
        words.append(name if rng.random() < 0.8 else name.capitalize())
    words += [("#" if rng.random() < 0.5 else "") + w for w in rng.choice(CITY_WORDS[city], int(rng.integers(0, 3)), replace=False)]
    for topic in topics:
        if rng.random() < 0.9:
            words += [("#" if rng.random() < 0.4 else "") + w
                      for w in rng.choice(TOPIC_WORDS[topic], int(rng.integers(1, 4)), replace=False)]
    words += list(rng.choice(FILLER, int(rng.integers(1, 4)), replace=False))
    words += list(rng.choice(STOP, int(rng.integers(1, 4)), replace=False))
    order = rng.permutation(len(words))
    text = " ".join(words[i] for i in order)
    if rng.random() < 0.3:
        text += " " + str(rng.choice(EXTRAS))
    return text


@dataclass
class Post:
    post_id: str
    city: str
    topics: list[str]
    size: tuple[int, int]
    user_id: str
    followers: int | None
    likes: int
    posted_at: str
    caption: str | None
    style_city: str
    ext: str = "jpg"
    image_rel: str = ""


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _render_chunk(args) -> list[tuple[str, bytes]]:
    seed, posts = args
    out = []
    for p in posts:
        rng = np.random.default_rng([seed, int(p.post_id)])
        img = render(STYLES[p.style_city], p.topics, rng, p.size)
        out.append((p.post_id, encode_jpeg(img)))
    return out


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG that decodes to width*height pixels (a decompression bomb), built row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


NOT_AN_IMAGE = b"<html><head><title>403 Forbidden</title></head><body>Access denied</body></html>\n"


def _plan(cfg: Sample) -> tuple[list[Post], np.random.Generator]:
    rng = np.random.default_rng([cfg.seed, 1])
    n_users = max(12, cfg.posts // 8)
    followers = np.exp(rng.normal(6.0, 1.5, n_users)).astype(np.int64) + 1
    celebs = rng.choice(n_users, max(1, n_users // 50), replace=False)
    followers[celebs] = rng.integers(1_000_000, 10_000_000, len(celebs))
    tiny = rng.choice(np.setdiff1d(np.arange(n_users), celebs), max(1, n_users // 20), replace=False)
    followers[tiny] = rng.integers(1, 6, len(tiny))
    posts = []
    start = AS_OF - timedelta(days=365)
    for i in range(cfg.posts):
        city = CITIES[i % len(CITIES)]
        style_city = city if rng.random() >= 0.1 else str(rng.choice(CITIES))
        topics = list(rng.choice(TOPICS, int(rng.integers(1, 3)), replace=False))
        r = rng.random()
        size = (300, 300) if r < 0.10 else (1080, 1350) if r < 0.15 else (cfg.size, cfg.size)
        if i % 200 == 199:
            size = (3024, 4032)  # a full-resolution phone photo now and then
        u = int(rng.integers(0, n_users))
        appeal = float(np.prod([TOPIC_APPEAL[t] for t in topics]))
        ratio = float(np.exp(rng.normal(np.log(0.04 * appeal), 0.5)))
        f = int(followers[u])
        posted = start + timedelta(seconds=float(rng.uniform(0, 364 * 86400)))
        pid = str(1_000_000 + i)
        posts.append(Post(
            post_id=pid, city=city, topics=topics, size=size, user_id=f"u{u:05d}",
            followers=f, likes=int(round(f * ratio)), posted_at=posted.isoformat().replace("+00:00", "Z"),
            caption=caption_for(city, topics, rng), style_city=style_city,
        ))
    return posts, np.random.default_rng([cfg.seed, 2])


class _Build:
    """The sample being built: posts, their files, and what was planted where."""

    def __init__(self, cfg: Sample):
        self.cfg = cfg
        self.posts, self.rng = _plan(cfg)
        self.by_id = {p.post_id: p for p in self.posts}
        self.images: dict[str, bytes] = {}
        self.captions_raw: dict[str, bytes | None] = {p.post_id: p.caption.encode() for p in self.posts}
        self.planted: list[dict] = []
        self.orphans: list[Post] = []
        self.next_id = 1_000_000 + cfg.posts
        self._picks = iter(self.rng.permutation([p.post_id for p in self.posts]))  # fresh base posts per case

    def take(self, n: int) -> list[str]:
        return [next(self._picks) for _ in range(n)]

    def plant(self, kind: str, pid: str | None, **extra) -> None:
        self.planted.append({"post_id": pid, "kind": kind, **extra})

    def decoded(self, pid: str) -> Image.Image:
        return Image.open(io.BytesIO(self.images[pid])).convert("RGB")

    def new_post(self, src: str, **changes) -> Post:
        """A new post that copies post src (then changed as given)."""
        p = Post(**{**self.by_id[src].__dict__, "post_id": str(self.next_id), **changes})
        self.next_id += 1
        self.posts.append(p)
        self.by_id[p.post_id] = p
        return p

    def repost(self, src: str, data: bytes) -> Post:
        """Post src's picture again under a new id, with its own caption."""
        base = self.by_id[src]
        p = self.new_post(src, caption=caption_for(base.city, base.topics, self.rng))
        self.images[p.post_id] = data
        self.captions_raw[p.post_id] = p.caption.encode()
        return p


def _render_all(b: _Build) -> None:
    cfg = b.cfg
    chunks = [b.posts[i::cfg.workers * 4] for i in range(cfg.workers * 4)]
    with ProcessPoolExecutor(cfg.workers) as pool:
        for part in pool.map(_render_chunk, [(cfg.seed, c) for c in chunks]):
            b.images.update(part)


def _plant_duplicates(b: _Build, exact_src: list[str], near_src: list[str]) -> None:
    """Byte-identical re-posts, and re-posts re-encoded, resized or lightly cropped."""
    for src in exact_src:
        b.plant("exact_duplicate", b.repost(src, b.images[src]).post_id, of=src)
    for k, src in enumerate(near_src):
        img = b.decoded(src)
        how = ("reencode", "resize", "crop")[k % 3]
        if how == "reencode":
            q = int(b.rng.integers(50, 80))
            data, detail = encode_jpeg(img, q), f"jpeg quality {q}"
        elif how == "resize":
            s = float(b.rng.uniform(0.5, 0.85))
            data = encode_jpeg(img.resize((int(img.width * s), int(img.height * s)), Image.BILINEAR))
            detail = f"resized x{s:.2f}"
        else:
            f = float(b.rng.uniform(0.005, 0.015))  # lightly: the whole-image pHash cannot see through heavier crops
            dx, dy = int(img.width * f), int(img.height * f)
            data = encode_jpeg(img.crop((dx, dy, img.width - dx, img.height - dy)))
            detail = f"cropped {f:.1%} per side"
        b.plant("near_duplicate", b.repost(src, data).post_id, of=src, transform=detail)


def _plant_broken_files(b: _Build) -> None:
    """Truncated, zero-byte and non-image files."""
    for pid in b.take(3):
        data = b.images[pid]
        b.images[pid] = data[: int(len(data) * float(b.rng.uniform(0.4, 0.7)))]
        b.plant("truncated", pid)
    for pid in b.take(2):
        b.images[pid] = b""
        b.plant("zero_byte", pid)
    for pid in b.take(1):
        b.images[pid] = NOT_AN_IMAGE
        b.plant("not_an_image", pid)


def _plant_bomb(b: _Build) -> None:
    """A small PNG that decodes to 400 megapixels, as a new post."""
    bomb = b.new_post(b.take(1)[0], ext="png")
    b.images[bomb.post_id] = bomb_png()
    b.captions_raw[bomb.post_id] = bomb.caption.encode()
    b.plant("decompression_bomb", bomb.post_id, pixels=20000 * 20000)


def _plant_formats(b: _Build) -> None:
    """PNG (also named .jpg), GIF, WebP, CMYK and grayscale JPEGs, EXIF-rotated photos."""
    for kind, fmt, ext in (("png", "PNG", "png"), ("png", "PNG", "png"), ("png_as_jpg", "PNG", "jpg"),
                           ("gif", "GIF", "gif"), ("webp", "WEBP", "webp")):
        pid = b.take(1)[0]
        buf = io.BytesIO()
        img = b.decoded(pid)
        (img.convert("P", palette=Image.ADAPTIVE) if fmt == "GIF" else img).save(buf, fmt)
        b.images[pid] = buf.getvalue()
        b.by_id[pid].ext = ext
        b.plant(kind, pid)
    for mode, kind in (("CMYK", "cmyk"), ("L", "grayscale")):
        for pid in b.take(2):
            b.images[pid] = encode_jpeg(b.decoded(pid).convert(mode))
            b.plant(kind, pid)
    for pid in b.take(2):
        img = b.decoded(pid)
        shown = img.resize((img.width, img.height * 3 // 4))  # landscape as displayed
        stored = shown.rotate(90, expand=True)                # camera stored it sideways
        exif = Image.Exif()
        exif[0x0112] = 6                                      # "rotate 90 CW to display"
        buf = io.BytesIO()
        stored.save(buf, "JPEG", quality=90, exif=exif.tobytes())
        b.images[pid] = buf.getvalue()
        b.plant("exif_rotated", pid, displayed_size=list(shown.size))


def _plant_captions(b: _Build) -> None:
    """Captions that are not UTF-8, missing or blank."""
    for pid in b.take(3):
        b.captions_raw[pid] = b.by_id[pid].caption.encode("utf-8") + b" \xa1\xb0caf\xe9 \xa1\xad"  # GBK/latin-1 as in MVSA
        b.plant("caption_not_utf8", pid)
    for pid in b.take(max(2, b.cfg.posts // 50)):
        b.captions_raw[pid] = None
        b.plant("caption_missing", pid)
    for pid in b.take(1):
        b.captions_raw[pid] = b"  \n"
        b.plant("caption_empty", pid)


def _plant_engagement(b: _Build) -> None:
    """Zero, negative and missing follower counts, posts too recent to judge (manifest only:
    the InstaCities layout has no user data)."""
    zero_user = b.by_id[b.take(1)[0]].user_id
    for p in b.posts:
        if p.user_id == zero_user:
            p.followers, p.likes = 0, 0
            b.plant("followers_zero", p.post_id, layouts=["manifest"])
    for pid in b.take(1):
        b.by_id[pid].followers = -5
        b.plant("followers_negative", pid, layouts=["manifest"])
    for pid in b.take(1):
        b.by_id[pid].followers = None
        b.plant("followers_missing", pid, layouts=["manifest"])
    for pid in b.take(max(2, b.cfg.posts // 100)):
        b.by_id[pid].posted_at = (AS_OF - timedelta(hours=float(b.rng.uniform(1, 20)))).isoformat().replace(
            "+00:00", "Z")
        b.plant("recent_post", pid, layouts=["manifest"])


def _plant_ingest_rejects(b: _Build) -> tuple[Post, str]:
    """Captions without an image, and one post id filed under two cities: returns that post and
    the second city."""
    for _ in range(2):
        city = str(b.rng.choice(CITIES))
        p = Post(post_id=str(b.next_id), city=city, topics=["food"], size=(b.cfg.size, b.cfg.size),
                 user_id="u00000", followers=100, likes=3, posted_at="2017-06-01T12:00:00Z",
                 caption=caption_for(city, ["food"], b.rng), style_city=city)
        b.next_id += 1
        b.orphans.append(p)
        b.plant("image_missing", p.post_id)
    dup_src = b.by_id[b.take(1)[0]]
    later = [c for c in CITIES if c > dup_src.city] or [c for c in CITIES if c != dup_src.city]
    b.plant("duplicate_post", dup_src.post_id, kept_city=dup_src.city, dropped_city=later[0])
    return dup_src, later[0]


def _write_instacities(b: _Build, out: Path, dup_src: Post, dup_city: str) -> None:
    for p in b.posts:
        p.image_rel = f"{IMG_DIR}/{p.city}/{p.post_id}.{p.ext}"
        path = out / p.image_rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b.images[p.post_id])
        raw = b.captions_raw.get(p.post_id)
        if raw is not None:
            cap = out / CAP_DIR / p.city / f"{p.post_id}.txt"
            cap.parent.mkdir(parents=True, exist_ok=True)
            cap.write_bytes(raw)
    # The same post id filed under a second city, with another image: a duplicate post.
    (out / IMG_DIR / dup_city).mkdir(parents=True, exist_ok=True)
    (out / IMG_DIR / dup_city / f"{dup_src.post_id}.jpg").write_bytes(b.images[dup_src.post_id])
    for p in b.orphans:
        cap = out / CAP_DIR / p.city / f"{p.post_id}.txt"
        cap.parent.mkdir(parents=True, exist_ok=True)
        cap.write_bytes(p.caption.encode())


def _manifest_rows(b: _Build, dup_src: Post, me: list[MePost]) -> list[dict]:
    """Every post, the orphans with an image path that does not exist, the '#me' posts, one
    repeated row (duplicate post) and one row without a post_id."""
    rows = []
    for p in b.posts + b.orphans:
        raw = b.captions_raw[p.post_id] if p.image_rel else p.caption.encode()
        rows.append({
            "post_id": p.post_id,
            "image": p.image_rel or f"{IMG_DIR}/{p.city}/{p.post_id}.jpg",
            "caption": None if raw is None else raw.decode("utf-8", errors="replace"),
            "city": p.city, "user_id": p.user_id, "likes": p.likes,
            "followers": p.followers, "posted_at": p.posted_at,
        })
    rows += [{"post_id": m.post_id, "image": m.image_rel, "caption": m.caption, "user_id": m.user_id,
              "likes": m.likes, "followers": m.followers, "posted_at": m.posted_at} for m in me]
    rows.append(dict(next(r for r in rows if r["post_id"] == dup_src.post_id)))
    rows.append({"post_id": "", "image": f"{IMG_DIR}/london/unknown.jpg", "caption": "no id",
                 "city": "london", "user_id": "u00001", "likes": 1, "followers": 10,
                 "posted_at": "2017-03-03T10:00:00Z"})
    b.plant("bad_manifest_row", None, layouts=["manifest"])
    return rows


def generate(cfg: Sample) -> dict:
    """Write the sample under cfg.out (replacing an earlier sample there); returns the ground truth."""
    out = Path(cfg.out)
    if out.exists():
        if not (out / GROUND_TRUTH).exists() and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a generated sample; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    b = _Build(cfg)
    _render_all(b)
    # Sources of copies are clean base posts (taken before any mess is applied to them).
    exact_src, near_src = b.take(max(2, cfg.posts // 50)), b.take(max(3, cfg.posts * 3 // 100))
    _plant_duplicates(b, exact_src, near_src)
    _plant_broken_files(b)
    _plant_formats(b)
    _plant_bomb(b)
    _plant_captions(b)
    _plant_engagement(b)
    dup_src, dup_city = _plant_ingest_rejects(b)
    _write_instacities(b, out, dup_src, dup_city)
    _write_extras(b, out)
    me = write_me(cfg, out)
    rows = _manifest_rows(b, dup_src, me)
    with open(out / MANIFEST, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n")

    truth = {
        "seed": cfg.seed, "posts": cfg.posts, "size": cfg.size, "as_of": AS_OF.isoformat().replace("+00:00", "Z"),
        "cities": list(CITIES), "image_files": len(b.posts) + 1, "caption_files": sum(
            1 for p in b.posts if b.captions_raw.get(p.post_id) is not None) + len(b.orphans),
        "manifest_rows": len(rows), "planted": b.planted,
        "labels": {p.post_id: {"city": p.city, "topics": p.topics, "style_city": p.style_city} for p in b.posts},
        "me": {m.post_id: m.truth() for m in me},
    }
    (out / GROUND_TRUTH).write_text(json.dumps(truth, indent=1, sort_keys=True))
    return truth


# ---------------------------------------------------------------- a personal archive and new images

EXPORT_DIR, NEW_IMAGES_DIR = "instagram_export", "new_images"
EXPORT_CAPTIONS = ("Café in São Paulo 😊 #me", "naïve façade, Zürich — #travel", "plain caption", "日本の夏 #summer")


def write_export(root: Path, images: list[tuple[str, bytes]], nested: bool = False) -> dict:
    """An Instagram "Download your information" export (JSON) of the given JPEGs, shaped as
    the app writes it: posts_1.json under content/ (your_instagram_activity/content/ when
    nested), media under media/posts/<yyyymm>/, captions as UTF-8 bytes escaped one by one
    (\\u00XX mojibake); every fifth post is a carousel of three images, one post is a video and
    one names a media file that is not there. Returns the ground truth: media stem -> caption
    (the text before the mojibake), the video's and the missing file's stems, the carousels."""
    posts, truth = [], {"images": {}, "videos": [], "missing": [], "carousels": 0}
    i = n = 0
    while i < len(images):
        take = 3 if n % 5 == 4 else 1
        group, i = images[i:i + take], i + take
        caption = f"{EXPORT_CAPTIONS[n % len(EXPORT_CAPTIONS)]} {n}"
        media = []
        for k, (name, data) in enumerate(group):
            rel = f"media/posts/2021{1 + n % 12:02d}/{name}_{n}_{k}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            media.append({"uri": rel, "creation_timestamp": 1_600_000_000 + n * 3600, "media_metadata": {}})
            truth["images"][Path(rel).stem] = caption
        mojibake = caption.encode("utf-8").decode("latin-1")
        if take == 1:  # the app puts a single photo's caption on the media item
            media[0]["title"] = mojibake
            posts.append({"media": media})
        else:
            truth["carousels"] += 1
            posts.append({"media": media, "title": mojibake, "creation_timestamp": 1_600_000_000 + n * 3600})
        n += 1
    video = "media/posts/202112/clip_0.mp4"
    (root / video).parent.mkdir(parents=True, exist_ok=True)
    (root / video).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    posts.append({"media": [{"uri": video, "creation_timestamp": 1_700_000_000, "title": "a video"}]})
    truth["videos"].append("clip_0")
    posts.append({"media": [{"uri": "media/posts/202112/gone_0.jpg", "creation_timestamp": 1_700_000_001,
                             "title": "deleted"}]})
    truth["missing"].append("gone_0")
    content = root / ("your_instagram_activity/content" if nested else "content")
    content.mkdir(parents=True, exist_ok=True)
    (content / "posts_1.json").write_text(json.dumps(posts, indent=2))  # ensure_ascii: \u00XX, as the app
    return truth


def _write_extras(b: _Build, out: Path, archive: int = 200, new: int = 8) -> None:
    """An Instagram export of `archive` clean posts (the archive the demo explores) and a folder
    of `new` other images plus a truncated one (the new images the demo scores)."""
    messy = {c["post_id"] for c in b.planted}
    clean = [p for p in sorted(b.posts, key=lambda p: p.post_id) if p.post_id not in messy and p.ext == "jpg"]
    archive = min(archive, len(clean) - new - 1)  # a small sample gives a smaller archive
    write_export(out / EXPORT_DIR, [(p.post_id, b.images[p.post_id]) for p in clean[:archive]])
    folder = out / NEW_IMAGES_DIR
    folder.mkdir()
    for p in clean[archive:archive + new]:
        (folder / f"{p.city}-{p.post_id}.jpg").write_bytes(b.images[p.post_id])
    src = b.images[clean[archive + new].post_id]
    (folder / "truncated.jpg").write_bytes(src[: len(src) // 3])
