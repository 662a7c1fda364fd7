"""The '#me' part of the generated sample: posts of people, for the likability study.

Selfies are real faces (the 100 face crops of scikit-image's `lfw_subset`, from Labeled Faces in
the Wild, tinted to a skin tone) composited as a head with hair and shoulders into a generated
scene: outdoors on grass under trees (the grass texture scikit-image ships) or indoors. Quote
images ("memes") are text in a coloured band over a blurred scene, with no face. The like ratio (likes /
followers) carries a planted, learnable link to the picture, as the original found: close-ups
and green outdoor scenes do better, memes worse:

    ratio = 0.03 * (1.8 if close-up) * (1.6 if green outdoors) * (0.5 if meme) * lognormal(0, 0.35)

Everything is deterministic from the sample seed; the ground truth records, per post, its kind,
the face box in the image's pixels and the ratio factors.

    me = write_me(Sample(out="./data/sample", me_posts=600), Path("./data/sample"))
"""

from __future__ import annotations

import functools
import io
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

AS_OF = datetime(2018, 1, 1, tzinfo=timezone.utc)  # "now" for the sample's post ages
ME_DIR = "me"
BASE_RATIO = 0.03
CLOSE_UP, GREEN, MEME = 1.8, 1.6, 0.5
MEME_SHARE = 0.12
SKIN = ((255, 224, 196), (234, 192, 160), (198, 144, 110), (141, 85, 54), (241, 194, 125), (224, 172, 105))
QUOTES = (
    "be yourself everyone else is already taken", "monday again", "good vibes only", "do more of what makes you happy",
    "coffee first then the world", "stay wild moon child", "not all who wander are lost", "but first let me take a selfie",
    "dream big work hard", "life is short eat dessert first", "weekend loading", "keep calm and carry on",
)
ME_WORDS = ("me", "selfie", "selfietime", "happy", "smile", "instagood", "love", "friday", "mood", "ootd", "nofilter")


@dataclass
class MePost:
    post_id: str
    kind: str                 # selfie | meme
    close: bool               # selfie: a close-up (face about a third of the width) or a person further away
    green: bool               # selfie: outdoors on grass, or indoors
    face: int                 # index into lfw_subset's faces
    box: tuple[float, float, float, float] | None  # the pasted face (x, y, w, h) in the image's pixels
    flip: bool
    skin: int
    appeal: float             # the ratio's planted factor
    user_id: str
    followers: int
    likes: int
    posted_at: str
    caption: str
    size: int
    image_rel: str = ""

    def truth(self) -> dict:
        d = asdict(self)
        d["box"] = list(self.box) if self.box else None
        return {k: d[k] for k in ("kind", "close", "green", "face", "box", "appeal", "size", "image_rel")}


@functools.lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    from skimage import data

    return data.lfw_subset()[:100]  # the first 100 are faces, the rest are not


@functools.lru_cache(maxsize=1)
def _grass() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.open(os.path.join(data.__path__[0], "grass.png")).convert("L"))


def plan_me(n: int, seed: int, size: int) -> list[MePost]:
    """The '#me' posts: who posted them, what they show, and how well they did."""
    rng = np.random.default_rng([seed, 3])
    n_users = max(4, n // 5)
    user_followers = np.exp(rng.normal(6.0, 1.0, n_users)).astype(np.int64) + 20
    posts = []
    start = AS_OF - timedelta(days=365)
    for i in range(n):
        meme = rng.random() < MEME_SHARE
        close, green = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        if meme:
            close = green = False
            box, appeal = None, MEME
        else:
            fw = rng.uniform(0.28, 0.4) * size if close else rng.uniform(0.13, 0.2) * size
            cx, cy = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.5) * size
            box = (float(cx - fw / 2), float(cy - fw * 0.55), float(fw), float(fw * 1.1))
            appeal = (CLOSE_UP if close else 1.0) * (GREEN if green else 1.0)
        u = int(rng.integers(0, n_users))
        followers = int(user_followers[u])
        ratio = BASE_RATIO * appeal * float(np.exp(rng.normal(0, 0.35)))
        words = [("#" if rng.random() < 0.6 else "") + w for w in rng.choice(ME_WORDS, int(rng.integers(2, 5)),
                                                                             replace=False)]
        posted = start + timedelta(seconds=float(rng.uniform(0, 360 * 86400)))
        pid = str(3_000_000 + i)
        posts.append(MePost(
            post_id=pid, kind="meme" if meme else "selfie", close=close, green=green,
            face=int(rng.integers(0, 100)), box=box, flip=bool(rng.random() < 0.5), skin=int(rng.integers(len(SKIN))),
            appeal=appeal, user_id=f"m{u:04d}", followers=followers, likes=int(round(followers * ratio)),
            posted_at=posted.isoformat().replace("+00:00", "Z"), caption=" ".join(words), size=size,
            image_rel=f"{ME_DIR}/{pid}.jpg"))
    return posts


def _tone(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _scene(rng: np.random.Generator, w: int, green: bool) -> Image.Image:
    if not green:  # a room: a wall lit from one side, furniture and frames
        wall = np.array(_tone(rng, 110, 230), np.float32)
        light = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), w, dtype=np.float32)
        light = light[None, :, None] if rng.random() < 0.5 else light[:, None, None]
        pil = Image.fromarray(np.broadcast_to(wall * light, (w, w, 3)).clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(4, 10))):
            x, y = rng.uniform(0, w, 2)
            sx, sy = rng.uniform(0.1, 0.45, 2) * w
            d.rectangle([x, y, x + sx, y + sy], fill=_tone(rng, 30, 220))
        return pil
    horizon = int(rng.uniform(0.3, 0.6) * w)
    img = np.empty((w, w, 3), np.float32)
    img[:] = np.array([150, 190, 235], np.float32) * rng.uniform(0.8, 1.1)
    grass = _grass()
    oy, ox = rng.integers(0, grass.shape[0] - 200), rng.integers(0, grass.shape[1] - 200)
    g = cv2.resize(grass[oy:oy + 200, ox:ox + 200], (w, w)).astype(np.float32) / 255
    img[horizon:] = np.stack([40 + 60 * g, 110 + 90 * g, 30 + 40 * g], -1)[horizon:]
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 7))):  # trees
        cx, cy, r = rng.uniform(0, w), rng.uniform(0.1, 0.5) * w, rng.uniform(0.08, 0.22) * w
        d.ellipse([cx - r, cy - r, cx + r, cy + r],
                  fill=(int(rng.integers(20, 70)), int(rng.integers(90, 160)), int(rng.integers(20, 70))))
    return pil


def _person(pil: Image.Image, rng: np.random.Generator, m: MePost) -> None:
    """Shoulders, hair and the face, pasted with a soft elliptical edge at m.box."""
    x, y, fw, fh = m.box
    cx, cy = x + fw / 2, y + fh / 2
    w = pil.width
    d = ImageDraw.Draw(pil)
    shoulders, hair = rng.uniform(1.2, 2.0), rng.uniform(0.56, 0.75)
    d.polygon([(cx - shoulders * fw, w), (cx - 1.1 * fw, cy + 0.9 * fw), (cx + 1.1 * fw, cy + 0.9 * fw),
               (cx + shoulders * fw, w)], fill=_tone(rng, 0, 256))
    d.ellipse([cx - hair * fw, cy - (hair + 0.16) * fw, cx + hair * fw, cy + 0.55 * fw], fill=_tone(rng, 10, 90))
    g = cv2.resize(_faces()[m.face].astype(np.float32), (round(fw), round(fh)), interpolation=cv2.INTER_CUBIC)
    if m.flip:
        g = g[:, ::-1]
    skin = np.array(SKIN[m.skin], np.float32) / 255
    rgb = (np.clip(g, 0, 1)[..., None] * 1.25 * skin * 255 * rng.uniform(0.9, 1.1)).clip(0, 255).astype(np.uint8)
    hh, ww = g.shape
    mask = Image.new("L", (ww, hh), 0)
    ImageDraw.Draw(mask).ellipse([0, 0, ww - 1, hh - 1], fill=255)
    pil.paste(Image.fromarray(rgb), (round(x), round(y)), mask.filter(ImageFilter.GaussianBlur(max(1, ww // 20))))


def _meme(rng: np.random.Generator, w: int) -> Image.Image:
    """A quote over a blurred scene, in a band of its own colour: text, no face. The scene and
    the layout vary, so two posts of the same quote are not near-duplicates of each other."""
    pil = _scene(rng, w, bool(rng.random() < 0.5)).filter(ImageFilter.GaussianBlur(w / 60))
    d = ImageDraw.Draw(pil)
    words = str(rng.choice(QUOTES)).split()
    per_line = int(rng.integers(2, 4))
    lines = [" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]
    font = ImageFont.load_default(size=max(10, int(w * rng.uniform(0.06, 0.1))))
    top = rng.uniform(0.05, 0.9 - 0.14 * len(lines)) * w
    d.rectangle([0, top - 0.04 * w, w, top + font.size * 1.3 * len(lines) + 0.04 * w], fill=_tone(rng, 0, 256))
    ink = (255, 255, 255) if rng.random() < 0.5 else (15, 15, 15)
    y = top
    for line in lines:
        d.text((rng.uniform(0.04, 0.2) * w, y), line.upper(), fill=ink, font=font)
        y += font.size * 1.3
    return pil


def render_me(seed: int, m: MePost) -> bytes:
    rng = np.random.default_rng([seed, int(m.post_id)])
    if m.kind == "meme":
        pil = _meme(rng, m.size)
    else:
        pil = _scene(rng, m.size, m.green)
        _person(pil, rng, m)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _render_chunk(args) -> list[tuple[str, bytes]]:
    seed, posts = args
    return [(m.post_id, render_me(seed, m)) for m in posts]


def write_me(cfg, out: Path) -> list[MePost]:
    """Render and write the '#me' posts under out/me/; returns them (the manifest lists them)."""
    me = plan_me(cfg.me_posts, cfg.seed, cfg.size)
    if not me:
        return me
    (out / ME_DIR).mkdir(parents=True, exist_ok=True)
    chunks = [me[i::cfg.workers * 4] for i in range(cfg.workers * 4)]
    with ProcessPoolExecutor(cfg.workers) as pool:
        for part in pool.map(_render_chunk, [(cfg.seed, c) for c in chunks]):
            for pid, data in part:
                (out / ME_DIR / f"{pid}.jpg").write_bytes(data)
    return me
