"""Where a run's outputs live under its lake root, and the bookkeeping every stage does.

    <lake>/tables/<name>            Parquet tables (posts, images, duplicates, ...)
    <lake>/tables/rejected/stage=S  rejected records of stage S (post_id, reason, detail)
    <lake>/datasets/<name>          Petastorm training datasets
    <lake>/models/<name>            models
    <lake>/reports/                 reports
    <output>/_SUMMARY.json          written last by each stage: its counts and timing
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from core import storage
from core.schemas import TABLES, with_reject

log = logging.getLogger("instalearn")

SUMMARY_FILE, FAILED_FILE = storage.SUMMARY_FILE, storage.FAILED_FILE


class Lake:
    def __init__(self, root: str):
        self.root = storage.qualify(root).rstrip("/")

    def table(self, name: str) -> str:
        return f"{self.root}/tables/{name}"

    def rejected(self, stage: str | None = None) -> str:
        base = self.table("rejected")
        return base if stage is None else f"{base}/stage={stage}"

    def dataset(self, name: str) -> str:
        return f"{self.root}/datasets/{name}"

    def model(self, name: str) -> str:
        return f"{self.root}/models/{name}"

    def cache(self, name: str) -> str:
        """Kept between runs so that a re-run does not redo work (fetched URLs); safe to delete."""
        return f"{self.root}/cache/{name}"

    def report(self, name: str = "") -> str:
        return f"{self.root}/reports/{name}".rstrip("/")


class IncompleteInput(RuntimeError):
    """An upstream output is missing or was left half-written: run its stage first."""


class UnusableInput(IncompleteInput):
    """The input exists but cannot train or test a model (one class only, no test rows)."""


# The outputs this process's stage has read (URI -> their run_id): cli.run records them in the
# stage's summary, so that a later reader can tell when an input was rewritten underneath it.
_reads: dict[str, str | None] = {}


def inputs_read(output: str) -> dict[str, str | None]:
    """The inputs read so far, each named relative to `output` when they share a filesystem
    (so a lake copied or moved whole keeps its links), else by its URI."""
    out_scheme, out_path = storage.qualify(output).split("://", 1)
    named = {}
    for uri, run_id in _reads.items():
        scheme, path = uri.split("://", 1)
        same = scheme == out_scheme and path.split("/", 1)[0] == out_path.split("/", 1)[0]
        named[posixpath.relpath(path, out_path) if same else uri] = run_id
    return named


_run: dict[str, str | None] = {"id": None}  # this process's stage run: the id its outputs' summaries carry


def start_run() -> str:
    """A stage's run begins in this process (cli.run): a new run id, no inputs read yet."""
    _run["id"] = uuid.uuid4().hex
    _reads.clear()
    return _run["id"]


def staleness(spark: SparkSession, output: str) -> str | None:
    """Why the output is not a complete one made from the inputs there now ('missing or
    incomplete', or 'stale: made from X, which has been rewritten'), None when it is."""
    if not storage.exists(spark, f"{output}/{SUMMARY_FILE}"):
        return "missing or incomplete"
    for name, run_id in (read_summary(spark, output).get("inputs") or {}).items():
        upstream = storage.resolve(output, name)
        now = read_summary(spark, upstream).get("run_id") if storage.exists(spark, f"{upstream}/{SUMMARY_FILE}") \
            else None
        if run_id and now != run_id:
            return f"stale: it was made from {upstream}, which has been rewritten (or removed) since"
    return None


def open_input(spark: SparkSession, output: str, remedy: str, fresh: bool = True) -> dict:
    """The summary of an output another stage completed (its _SUMMARY.json exists and balances)
    and, when `fresh`, made from the inputs that are there now; else IncompleteInput naming the
    remedy (" first" becomes " again" for a stale one). Recorded as read: its run id goes into
    the summaries of this run's outputs (close_output). fresh=False is for a model that stays
    usable after its training data changed (score)."""
    why = staleness(spark, output) if fresh else \
        (None if storage.exists(spark, f"{output}/{SUMMARY_FILE}") else "missing or incomplete")
    summary = read_summary(spark, output) if why is None else {}
    if why is None and summary.get("balanced") is False:
        why = "unbalanced (its counts do not add up: records were lost)"
    if why is not None:
        stale = why.startswith("stale")
        raise IncompleteInput(f"{output} is {why}{'; ' if stale else ': '}"
                              f"{remedy.replace(' first', ' again') if stale else remedy}")
    _reads[storage.qualify(output)] = summary.get("run_id")
    return summary


def read_complete(spark: SparkSession, uri: str, remedy: str, summary: str | None = None) -> DataFrame:
    """Parquet at uri that its writer completed (open_input; its summary at `summary` when the
    output is a folder of several: a dataset's splits)."""
    open_input(spark, summary or uri, remedy)
    return spark.read.parquet(uri)


def read_table(spark: SparkSession, lake: Lake, name: str) -> DataFrame:
    """A registered table another stage wrote; a missing or half-written one names the job to run."""
    return read_complete(spark, lake.table(name), f"run jobs/{TABLES[name].written_by}.py first")


def conform(df: DataFrame, name: str) -> DataFrame:
    """df's columns in the registered order and types of table `name` (extra columns dropped).
    Nullability is the writer's to keep: Spark cannot cast array<int> to array<int not null>."""
    have = {f.name: f.dataType.simpleString() for f in df.schema.fields}
    return df.select(*[F.col(f.name) if have.get(f.name) == f.dataType.simpleString()
                       else F.col(f.name).cast(f.dataType) for f in TABLES[name].schema.fields])


def write_table(df: DataFrame, lake: Lake, name: str, partition_by: str | None = None) -> str:
    """Replace <lake>/tables/<name> with df in the registered schema; returns its URI."""
    uri = lake.table(name)
    writer = conform(df, name).write.mode("overwrite")
    (writer.partitionBy(partition_by) if partition_by else writer).parquet(uri)
    return uri


@dataclass
class Summary:
    """The counts a stage reports; input must equal output + rejected + removed duplicates."""

    stage: str
    input_rows: int
    output_rows: int
    rejected: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    output: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.input_rows == self.output_rows + sum(self.rejected.values()) + sum(self.duplicates.values())

    def to_json(self) -> str:
        body = asdict(self)
        extra = body.pop("extra")
        body.update(extra)
        body["balanced"] = self.balanced
        return json.dumps(body, indent=2, sort_keys=True, default=str)

    def line(self) -> str:
        rej = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())) or "none"
        dup = ", ".join(f"{k}={v}" for k, v in sorted(self.duplicates.items()))
        dup = f" duplicates[{dup}]" if dup else ""
        return (f"{self.stage}: input={self.input_rows} output={self.output_rows} "
                f"rejected[{rej}]{dup} {self.seconds:.1f}s -> {self.output}")


class Busy(IncompleteInput):
    """Another run is writing the same output right now."""


_locks: dict[str, int] = {}  # lock path -> descriptor, the output locks this process holds (cli.run releases them)
_leases: dict[str, "_Lease"] = {}  # s3 lock URI -> its lease, the same for S3 lakes
LEASE_SECONDS = 60.0  # an S3 lock is renewed every LEASE/2; one not renewed for 3 leases is a dead run's


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _lock(spark: SparkSession, output: str) -> None:
    """One writer per output: an flock on <parent>/.<name>.lock for a local lake (released with
    the process, whatever kills it); on S3 a lock object created only if absent (a conditional
    write), renewed while the stage runs and taken over once a dead run stopped renewing it.
    GCS and stores without conditional writes get no lock (docs/architecture.md)."""
    q = storage.qualify(output)
    scheme = q.split("://", 1)[0]
    if scheme in storage.S3_SCHEMES:
        hadoop = spark.sparkContext._jsc.hadoopConfiguration()
        parent, name = q.rstrip("/").rsplit("/", 1)
        uri = f"{parent}/.{name}.lock"
        if uri not in _leases:
            _leases[uri] = _Lease.take(output, uri, hadoop.get("fs.s3a.endpoint"), hadoop.get("fs.s3a.endpoint.region"))
        return
    if not q.startswith("file://"):
        return
    parent, name = q[len("file://"):].rstrip("/").rsplit("/", 1)
    os.makedirs(parent, exist_ok=True)
    path = f"{parent}/.{name}.lock"
    if path in _locks:  # this process holds it already
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise Busy(f"{output} is being written by another run right now ({holder}): wait for it to end, or stop "
                   "it, then run this again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder().encode(), 0)
    _locks[path] = fd


class _Lease:
    """An S3 lock object {holder, renewed} held by this process: created with If-None-Match: *,
    renewed (If-Match its ETag) by a thread, deleted on release."""

    def __init__(self, client, bucket: str, key: str, etag: str):
        self.client, self.bucket, self.key, self.etag = client, bucket, key, etag
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, daemon=True, name="lake-lease")
        self.thread.start()

    @staticmethod
    def _body() -> bytes:
        return json.dumps({"holder": _holder(), "renewed": time.time()}).encode()

    @classmethod
    def take(cls, output: str, uri: str, endpoint: str | None, region: str | None) -> "_Lease | None":
        import boto3
        from botocore.exceptions import ClientError

        bucket, _, key = uri.split("://", 1)[1].partition("/")
        if endpoint and "://" not in endpoint:  # Hadoop takes a bare host name (EMR sets one)
            endpoint = f"https://{endpoint}"
        client = boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None)
        try:
            etag = client.put_object(Bucket=bucket, Key=key, Body=cls._body(), IfNoneMatch="*")["ETag"]
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NotImplemented", "InvalidArgument"):
                log.warning("%s: this S3 store has no conditional writes, so two runs at once are not kept apart", uri)
                return None
            if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            held = client.get_object(Bucket=bucket, Key=key)
            try:
                info = json.loads(held["Body"].read())
            except ValueError:
                info = {}
            age = time.time() - float(info.get("renewed", 0))
            if age < 3 * LEASE_SECONDS:
                raise Busy(f"{output} is being written by another run right now ({info.get('holder', 'unknown')}, "
                           f"renewed {age:.0f}s ago): wait for it to end, or stop it, then run this again") from None
            try:  # its run died: take the lock over, unless another run did so first
                etag = client.put_object(Bucket=bucket, Key=key, Body=cls._body(), IfMatch=held["ETag"])["ETag"]
            except ClientError:
                raise Busy(f"{output} is being taken over by another run right now: run this again later") from None
            log.warning("%s: took over a lock last renewed %.0fs ago by %s (that run is gone)", uri, age,
                        info.get("holder", "unknown"))
        return cls(client, bucket, key, etag)

    def _renew(self) -> None:
        while not self.stop.wait(LEASE_SECONDS / 2):
            try:
                self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                   IfMatch=self.etag)["ETag"]
            except Exception as e:  # noqa: BLE001 - taken over or unreachable: say so, keep running
                log.warning("s3://%s/%s: could not renew this run's lock (%s)", self.bucket, self.key, e)

    def release(self) -> None:
        self.stop.set()
        self.thread.join()
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 - an expired lock is taken over by the next run anyway
            log.warning("s3://%s/%s: could not remove this run's lock (%s)", self.bucket, self.key, e)


def release_locks() -> None:
    while _locks:
        os.close(_locks.popitem()[1])
    while _leases:
        lease = _leases.popitem()[1]
        if lease is not None:
            lease.release()


def lock_output(spark: SparkSession, output: str) -> None:
    """Take the output's lock (a second run at once refuses), leaving the output as it is: for a
    stage that writes beside it and replaces it only when done (train_cnn)."""
    _lock(spark, output)


def begin_output(spark: SparkSession, output: str) -> None:
    """Take the output's lock (a second run at once refuses), then remove the old summary, so a
    failed re-run never looks complete."""
    _lock(spark, output)
    storage.delete(spark, f"{output}/{SUMMARY_FILE}")
    storage.delete(spark, f"{output}/{FAILED_FILE}")


def write_summary(spark: SparkSession, summary: Summary, name: str = SUMMARY_FILE) -> None:
    """The summary as it is (close_output adds the run's id and inputs first)."""
    storage.write_bytes(spark, f"{summary.output}/{name}", summary.to_json().encode())


def _json_default(value):
    return value.item() if hasattr(value, "item") else str(value)  # numpy scalars as numbers


def close_output(spark: SparkSession, summary: Summary | dict, name: str = SUMMARY_FILE) -> None:
    """Mark an output complete: its summary (a stage's counts, or a dict with `output` for a
    stage's other outputs: a report, a model beside a table) with this run's id and the inputs
    it was made from, written last. name=FAILED_FILE keeps the counts of an unbalanced run
    without marking it complete."""
    if isinstance(summary, Summary):
        summary.extra.update(run_id=_run["id"], inputs=inputs_read(summary.output))
        write_summary(spark, summary, name)
        return
    output = summary["output"]
    text = json.dumps({**summary, "run_id": _run["id"], "inputs": inputs_read(output)}, indent=2, sort_keys=True,
                      default=_json_default)
    storage.write_bytes(spark, f"{output}/{name}", text.encode())


def read_summary(spark: SparkSession, output: str) -> dict:
    return json.loads(storage.read_bytes(spark, f"{output}/{SUMMARY_FILE}"))


def write_rejected(spark: SparkSession, lake: Lake, stage: str, rejects: DataFrame) -> dict[str, int]:
    """Replace this stage's rejected records; returns reason -> count."""
    conform(rejects, "rejected").repartition(1).sortWithinPartitions("reason", "post_id") \
        .write.mode("overwrite").parquet(lake.rejected(stage))
    counts = spark.read.parquet(lake.rejected(stage)).groupBy("reason").count().collect()
    return {r["reason"]: int(r["count"]) for r in counts}


@contextmanager
def per_record(spark: SparkSession, lake: Lake, stage: str, inputs: DataFrame,
               batch_fn: Callable[[pa.RecordBatch], pa.RecordBatch], table: str,
               batch_rows: int) -> Iterator[tuple[DataFrame, dict[str, int]]]:
    """The skeleton of a stage that maps every record by plain per-record code: batch_fn turns
    an Arrow batch of `inputs` into one row per record in `with_reject(table schema)`; the result
    is computed once (kept on local disk), its rejects go to the rejected table, the rest to
    <lake>/tables/<table>. Yields (kept rows, rejected reason -> count) for the stage's own
    counts, then frees the persisted result.

        with per_record(spark, lake, "detect_faces", images, fn, "faces", 64) as (good, rejected):
            n = good.count()
    """
    from core import progress

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_rows))
    acc = progress.counter(spark, inputs.count())
    result = inputs.mapInArrow(lambda batches: progress.counted(batches, batch_fn, acc),
                               with_reject(TABLES[table].schema)).persist(StorageLevel.DISK_ONLY)
    try:
        rejected = write_rejected(spark, lake, stage, result.where(F.col("reason").isNotNull()))
        good = result.where(F.col("reason").isNull())
        write_table(good, lake, table)
        yield good, rejected
    finally:
        result.unpersist()


def union_all(frames: list[DataFrame]) -> DataFrame:
    """unionByName over a non-empty list of frames with the same columns."""
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out

