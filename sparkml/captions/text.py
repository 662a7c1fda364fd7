"""Caption preprocessing exactly as the original InstaCities1M LDA code, as one function for
Spark (over Arrow batches on executors) and for queries.

The original, per caption: '#' -> ' '; keep only ASCII letters, digits and spaces (so a
newline or an emoji between two words glues them); lowercase; tokens by `\\w+`; drop the
stop words (the `stop-words` package's 2018 English list, 174 words, plus a custom list)
*before* stemming; Porter-stem what is left (nltk). `reference_preprocess` is that code,
character loop and all, kept for tests and the benchmark; `preprocess` gives the same
output with compiled regexes and a memoised stemmer (caption vocabularies are Zipfian).

    preprocess("Sunset at #Bondi beach!! http://t.co/x")  # ['sunset', 'bondi', 'beach', 'httptcox']
"""

from __future__ import annotations

import functools
import re
import string

import pyarrow as pa

CUSTOM_STOP = ("rt", "http", "t", "gt", "co", "s", "https", "http", "tweet", "markars_", "photo", "pictur",
               "picture", "say", "photo", "much", "tweet", "now", "blog")


@functools.lru_cache(maxsize=1)
def stop_words() -> frozenset[str]:
    from stop_words import get_stop_words

    words = get_stop_words("en")
    if len(words) != 174:  # the 2025 release has 1333 words and drops 'new', 'good', 'best', ...
        raise RuntimeError(f"stop-words must be 2018.7.23 (174 English words), found {len(words)}")
    return frozenset(words) | frozenset(CUSTOM_STOP)


@functools.lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem.porter import PorterStemmer

    return PorterStemmer()


@functools.lru_cache(maxsize=1 << 20)
def stem(token: str) -> str:
    return _stemmer().stem(token)


_NOT_KEPT = re.compile(r"[^A-Za-z0-9 ]+")
_TOKEN = re.compile(r"\w+")


def preprocess(caption: str | None) -> list[str]:
    """Caption -> stemmed tokens, the original's rules (see the module docstring)."""
    if not caption:
        return []
    text = _NOT_KEPT.sub("", caption.replace("#", " ")).lower()
    stop = stop_words()
    return [stem(t) for t in _TOKEN.findall(text) if t not in stop]


def reference_preprocess(caption: str | None) -> list[str]:
    """The original code's way, one character and one stem call at a time (no memo)."""
    if not caption:
        return []
    whitelist = string.ascii_letters + string.digits + " "
    caption = caption.replace("#", " ")
    filtered = ""
    for char in caption:
        if char in whitelist:
            filtered += char
    from nltk.tokenize import RegexpTokenizer

    tokens = RegexpTokenizer(r"\w+").tokenize(filtered.lower())
    stop = stop_words()
    return [_stemmer().stem(t) for t in tokens if t not in stop]


TOKENS_ARROW = pa.schema([("post_id", pa.string()), ("tokens", pa.list_(pa.string()))])


def tokens_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """post_id + caption -> post_id + tokens (an empty list for a missing or empty caption)."""
    tokens = [preprocess(c) for c in batch.column("caption").to_pylist()]
    return pa.RecordBatch.from_arrays([batch.column("post_id"), pa.array(tokens, pa.list_(pa.string()))],
                                      schema=TOKENS_ARROW)
