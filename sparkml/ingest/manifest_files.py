"""Reading CSV and JSON Lines manifests so that every record of the input is accounted for.

Spark's own readers lose records silently on real files: a CSV quote left open swallows every
following row into one caption, a row with extra columns shifts its fields, a JSON line holding
`[]` vanishes and one holding an array of two objects becomes two posts, and invalid UTF-8 makes
the whole line a corrupt record (whose text then is invalid UTF-8 too). Here each record is
parsed in Python on the executors:
- JSON Lines: Spark's text source splits the files by line (large files still split); each
  line's raw bytes are decoded (invalid UTF-8 replaced with U+FFFD and flagged) and parsed with
  json; anything but one object per line is a bad row with the reason in its text.
- CSV: one task per file (a quoted field may span lines, so a CSV file cannot be split; Spark's
  multiLine mode does the same), parsed with the csv module in strict mode. A record that does
  not parse (an unclosed quote) is rejected as its first line, and parsing resumes on the next
  line, so the rows after it survive; a record with more or fewer fields than the header is
  rejected.
Blank lines carry no record and are counted apart. Every output row has the manifest columns as
text, `_corrupt` (why the record is unusable, valid UTF-8) and `_caption_not_utf8`.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Iterator

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core import storage
from core.schemas import MANIFEST_COLUMNS

SCHEMA = T.StructType([T.StructField(c, T.StringType()) for c in MANIFEST_COLUMNS] + [
    T.StructField("_corrupt", T.StringType()), T.StructField("_caption_not_utf8", T.BooleanType()),
    T.StructField("_blank", T.BooleanType())])
_ARROW = pa.schema([(f.name, pa.bool_() if isinstance(f.dataType, T.BooleanType) else pa.string())
                    for f in SCHEMA.fields])


def _text(value) -> str | None:
    """A JSON value as manifest text: strings as they are, numbers and booleans as written."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    raise TypeError(type(value).__name__)


def _clean(s: str) -> tuple[str, bool]:
    """Text decoded with surrogateescape -> (valid text with U+FFFD, whether any byte was invalid)."""
    try:
        s.encode("utf-8")
        return s, False
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True


def _row(values: dict, corrupt: str | None = None, caption_bad: bool = False, blank: bool = False) -> dict:
    return {**{c: values.get(c) for c in MANIFEST_COLUMNS}, "_corrupt": corrupt, "_caption_not_utf8": caption_bad,
            "_blank": blank}


def parse_json_line(raw: bytes) -> dict:
    """One JSON Lines line (its raw bytes) -> an output row."""
    try:
        text, bad = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", "replace"), True
    text = text.lstrip("\ufeff")
    if not text.strip():
        return _row({}, blank=True)
    try:
        obj = json.loads(text)
    except ValueError as e:
        return _row({}, f"{e}: {text[:200]}")
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string"}.get(type(obj), "a " + type(obj).__name__)
        return _row({}, f"the line is {kind}, not one JSON object: {text[:200]}")
    values = {}
    for c in MANIFEST_COLUMNS:
        try:
            values[c] = _text(obj.get(c))
        except TypeError as e:
            return _row({}, f"field {c} is {e} (a list or object), not text or a number: {text[:200]}")
    caption_bad = bad and isinstance(obj.get("caption"), str) and "\ufffd" in obj["caption"]
    return _row(values, None, caption_bad)


def parse_csv(data: bytes) -> Iterator[dict]:
    """A whole CSV file -> output rows, one per record (the header is not one)."""
    lines = data.decode("utf-8", "surrogateescape").lstrip("\ufeff").splitlines(keepends=True)
    header, i = None, 0
    while i < len(lines):
        reader = csv.reader(iter(lines[i:]), strict=True)
        done = 0  # lines of lines[i:] the records read so far took
        try:
            for fields in reader:
                done = reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    yield _row({}, blank=True)
                    continue
                cleaned = [_clean(f) for f in fields]
                if header is None:
                    header = [t.strip() for t, _ in cleaned]
                    continue
                if len(fields) != len(header):
                    yield _row({}, f"line {i + done}: {len(fields)} fields where the header has {len(header)}: "
                                   f"{','.join(t for t, _ in cleaned)[:200]}")
                    continue
                record = {h: t if t != "" else None for h, (t, _) in zip(header, cleaned)}  # CSV: empty = absent
                caption_bad = any(b for h, (_, b) in zip(header, cleaned) if h == "caption")
                yield _row({c: record.get(c) for c in MANIFEST_COLUMNS}, None, caption_bad)
            return
        except csv.Error as e:
            start = i + done  # the failed record's first line; the records after it are read again
            yield _row({}, f"line {start + 1}: {e}: {_clean(lines[start])[0].strip()[:200]}")
            i = start + 1


def header_columns(data: bytes) -> list[str]:
    """The header of a CSV file (for the required-column check)."""
    first = next(csv.reader(io.StringIO(data.decode("utf-8", "replace").lstrip("\ufeff"), newline="")), [])
    return [c.strip() for c in first]


def read_json_lines(spark: SparkSession, uri: str) -> DataFrame:
    lines = spark.read.text(uri).select(F.col("value").cast("binary").alias("raw"))

    def parse(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            yield pa.RecordBatch.from_pylist([parse_json_line(r) for r in b.column("raw").to_pylist()], schema=_ARROW)

    return lines.mapInArrow(parse, SCHEMA)


def read_csv(spark: SparkSession, files: list[str], endpoint: str | None, region: str | None) -> DataFrame:
    paths = spark.createDataFrame([(f,) for f in files], "uri string").repartition(max(1, len(files)), "uri")

    def parse(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            for u in b.column("uri").to_pylist():
                rows = []
                for row in parse_csv(storage.read_uri(u, endpoint, region) or b""):
                    rows.append(row)
                    if len(rows) == 4096:
                        yield pa.RecordBatch.from_pylist(rows, schema=_ARROW)
                        rows = []
                if rows:
                    yield pa.RecordBatch.from_pylist(rows, schema=_ARROW)

    return paths.mapInArrow(parse, SCHEMA)
