"""URIs and byte I/O: local paths, file://, s3:// / s3a://, gs://.

Two routes, each where it fits:
- the driver writes and checks small objects (summaries, markers) through Spark's own
  Hadoop FileSystem, so every scheme the cluster reads (EMRFS, GCS connector, s3a) works;
- executors read individual objects named in a table (manifest images, caption
  sidecars) through pyarrow.fs, one filesystem per worker process, with a thread pool
  to hide object-store latency.
"""

from __future__ import annotations

import functools
import os
import posixpath
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pyarrow.fs as pafs

S3_SCHEMES = ("s3", "s3a", "s3n")
S3_ATTEMPTS = 6  # tries per executor-side S3 request (pyarrow.fs) before it fails its task, unless AWS_MAX_ATTEMPTS

# The file a completed output carries, written last (core.lake.close_output): its counts, the run
# that made it and that run's inputs. Readers on either side take an output without it as unfinished.
SUMMARY_FILE = "_SUMMARY.json"
FAILED_FILE = "_FAILED.json"  # the counts of a run whose counts did not balance (never read as complete)


def qualify(uri: str) -> str:
    """Canonical form: local paths become file:///abs; other schemes are kept as given."""
    if uri.startswith("file:"):
        path = uri[len("file:"):]
        path = "/" + path.lstrip("/")
        return "file://" + posixpath.normpath(path)
    if "://" in uri:
        return uri
    return "file://" + os.path.abspath(uri)


def resolve(base_dir: str, ref: str) -> str:
    """`ref` (absolute URI, absolute path or relative path) resolved against a directory URI."""
    if "://" in ref or ref.startswith("file:"):
        return qualify(ref)
    base = qualify(base_dir)
    if ref.startswith("/"):
        if base.startswith("file://"):
            return qualify(ref)
        scheme_host = base[: base.index("/", base.index("://") + 3)]
        return scheme_host + posixpath.normpath(ref)
    scheme, rest = base.split("://", 1)
    netloc, _, path = rest.partition("/")
    joined = posixpath.normpath(posixpath.join("/" + path, ref))
    return f"{scheme}://{netloc}{joined}"


def parent(uri: str) -> str:
    q = qualify(uri)
    return q.rsplit("/", 1)[0]


def check_writable(uri: str) -> None:
    """A local lake (folder) must be creatable and writable: ConfigError naming it otherwise.
    Object stores are checked by their first write (permissions there are per prefix)."""
    from core.config import ConfigError

    q = qualify(uri)
    if not q.startswith("file://"):
        return
    path = q[len("file://"):]
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-probe.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"lake {uri} is not writable: {e.strerror or e}") from None


def check_reachable(uris: list[str], endpoint: str | None, region: str | None, timeout: float = 10.0) -> None:
    """Each S3 bucket named in uris answers within `timeout` seconds (four attempts): an endpoint
    that cannot be reached is one ConfigError line now, not minutes of the S3 clients' retries
    and a Java trace. A bucket that does not exist is one too; a refused HEAD (permissions that
    allow objects but not the bucket) is left to the job."""
    import boto3
    import botocore.config
    import botocore.exceptions

    from core.config import ConfigError

    buckets = sorted({u.split("://", 1)[1].split("/", 1)[0] for u in uris
                      if "://" in u and u.split("://", 1)[0] in S3_SCHEMES})
    if not buckets:
        return
    try:
        s3_attempts()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    client = boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None,
                          config=botocore.config.Config(connect_timeout=timeout, read_timeout=timeout,
                                                        retries={"max_attempts": 4, "mode": "standard"}))
    for bucket in buckets:
        try:
            client.head_bucket(Bucket=bucket)
        except botocore.exceptions.NoCredentialsError:
            raise ConfigError("no AWS credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or an "
                              "instance role") from None
        except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as e:
            raise ConfigError(f"S3 endpoint {endpoint or 'of AWS'} cannot be reached for bucket {bucket} "
                              f"({type(e).__name__}, 4 attempts); check s3.endpoint and the network") from None
        except botocore.exceptions.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise ConfigError(f"S3 bucket {bucket} does not exist at {endpoint or 'AWS'}") from None


# ---------------------------------------------------------------- driver side (Hadoop FS)


def _hadoop(spark, uri: str):
    jvm = spark._jvm
    path = jvm.org.apache.hadoop.fs.Path(qualify(uri))
    return path.getFileSystem(spark._jsc.hadoopConfiguration()), path


def exists(spark, uri: str) -> bool:
    fs, path = _hadoop(spark, uri)
    return bool(fs.exists(path))


def is_dir(spark, uri: str) -> bool:
    fs, path = _hadoop(spark, uri)
    return bool(fs.exists(path) and fs.getFileStatus(path).isDirectory())


def write_bytes(spark, uri: str, data: bytes) -> None:
    fs, path = _hadoop(spark, uri)
    out = fs.create(path, True)
    try:
        out.write(bytearray(data))
    finally:
        out.close()


def read_bytes(spark, uri: str) -> bytes:
    fs, path = _hadoop(spark, uri)
    stream = fs.open(path)
    try:
        return bytes(spark._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
    finally:
        stream.close()


def upload(spark, local_dir: str, uri: str) -> None:
    """Copy a local folder's files to the folder uri (any scheme the cluster's Hadoop reads)."""
    fs, dst = _hadoop(spark, uri)
    jvm = spark._jvm
    fs.mkdirs(dst)
    for name in sorted(os.listdir(local_dir)):
        fs.copyFromLocalFile(False, True, jvm.org.apache.hadoop.fs.Path(qualify(os.path.join(local_dir, name))),
                             jvm.org.apache.hadoop.fs.Path(dst, name))


def download(spark, uri: str, local_dir: str) -> None:
    """Copy the files of the folder uri into an existing local folder."""
    fs, src = _hadoop(spark, uri)
    jvm = spark._jvm
    for status in fs.listStatus(src):
        if status.isFile():
            path = status.getPath()
            fs.copyToLocalFile(False, path, jvm.org.apache.hadoop.fs.Path(qualify(os.path.join(local_dir, path.getName()))),
                               True)


def rename(spark, src: str, dst: str) -> None:
    """Move a file or folder to dst: one atomic step on a local disk (os.replace: a file at dst is
    replaced whole); elsewhere the file system's rename (a copy on object stores), dst removed first."""
    s, d = qualify(src), qualify(dst)
    if s.startswith("file://") and d.startswith("file://"):
        os.replace(s[len("file://"):], d[len("file://"):])
        return
    fs, path = _hadoop(spark, s)
    _, target = _hadoop(spark, d)
    if fs.exists(target):
        fs.delete(target, True)
    if not fs.rename(path, target):
        raise OSError(f"could not move {src} to {dst}")


def delete(spark, uri: str) -> None:
    fs, path = _hadoop(spark, uri)
    if fs.exists(path):
        fs.delete(path, True)


# ---------------------------------------------------------------- executor side (pyarrow.fs)


def s3_attempts() -> int:
    """Tries per executor-side S3 request: AWS_MAX_ATTEMPTS when set (the AWS SDKs' and CLI's own
    variable; on a cluster spark.executorEnv.AWS_MAX_ATTEMPTS), else S3_ATTEMPTS."""
    value = os.environ.get("AWS_MAX_ATTEMPTS", "").strip()
    if not value:
        return S3_ATTEMPTS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"AWS_MAX_ATTEMPTS={value!r}: give a whole number of attempts, 1 or more")
    return int(value)


def arrow_filesystem(scheme: str, endpoint: str | None = None, region: str | None = None) -> pafs.FileSystem:
    """One filesystem object per worker process, scheme, endpoint and region (credentials from the
    environment)."""
    return _arrow_filesystem(scheme, endpoint, region, s3_attempts() if scheme in S3_SCHEMES else 0)


@functools.lru_cache(maxsize=16)
def _arrow_filesystem(scheme: str, endpoint: str | None, region: str | None, attempts: int) -> pafs.FileSystem:
    if scheme == "file":
        return pafs.LocalFileSystem()
    if scheme in S3_SCHEMES:
        kwargs = {}
        if endpoint:
            parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
            kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme)
        if region:
            kwargs["region"] = region
        # S3 answers 503 SlowDown under load: more attempts (with the SDK's backoff) than the
        # default 3 before a read fails its task
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
    if scheme == "gs":
        return pafs.GcsFileSystem()
    raise ValueError(f"unsupported URI scheme {scheme!r}: use a local path, file://, s3://, s3a:// or gs://")


def arrow_path(uri: str) -> tuple[str, str]:
    """(scheme, path as pyarrow.fs expects it) for a URI."""
    # not urlsplit: '#' and '?' are legal in file and object names (Instagram exports, user folders)
    scheme, rest = qualify(uri).split("://", 1)
    return scheme, rest


def read_uri(uri: str, endpoint: str | None = None, region: str | None = None) -> bytes | None:
    """The object's bytes, or None when it does not exist."""
    scheme, path = arrow_path(uri)
    fs = arrow_filesystem(scheme, endpoint, region)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        # pyarrow reports a missing object on some stores as a generic OSError
        if "not found" in str(e).lower() or "no such file" in str(e).lower() or "is a directory" in str(e).lower():
            return None
        raise


def read_head(uri: str, n: int, endpoint: str | None = None, region: str | None = None) -> bytes | None:
    """The first n bytes of an object (a CSV header), or None when it does not exist."""
    scheme, path = arrow_path(uri)
    try:
        with arrow_filesystem(scheme, endpoint, region).open_input_stream(path) as f:
            return f.read(n)
    except FileNotFoundError:
        return None


def write_uri(uri: str, data: bytes, endpoint: str | None = None, region: str | None = None,
              durable: bool = True) -> None:
    """Write data to uri so that no reader ever sees part of it: a local file is written beside
    its name and renamed into place (fsync'ed first unless not `durable`: a cache whose reader
    treats an empty file as absent); an S3 or GCS object only appears when its upload completes."""
    scheme, path = arrow_path(uri)
    fs = arrow_filesystem(scheme, endpoint, region)
    if scheme == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete_uri(uri: str, endpoint: str | None = None, region: str | None = None) -> None:
    """Remove one file or object if it exists (no Spark: training processes call it)."""
    scheme, path = arrow_path(uri)
    try:
        arrow_filesystem(scheme, endpoint, region).delete_file(path)
    except FileNotFoundError:
        pass


def _pmap(fn, items: list, threads: int) -> list:
    if threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def read_many(uris: list[str | None], threads: int, endpoint: str | None = None,
              region: str | None = None) -> list[bytes | None]:
    """read_uri over many URIs, `threads` at a time; None for missing objects and None URIs."""
    return _pmap(lambda u: None if u is None else read_uri(u, endpoint, region), uris, threads)


def sizes(uris: list[str], threads: int, endpoint: str | None = None,
          region: str | None = None) -> list[int | None]:
    """Object sizes in bytes (None where missing or unusable), without reading contents."""
    return [size for size, _ in stat_many(uris, threads, endpoint, region)]


def stat_many(uris: list[str], threads: int, endpoint: str | None = None,
              region: str | None = None) -> list[tuple[int | None, str | None]]:
    """(size or None where missing, None) per URI, or (None, why) where the name itself cannot be
    used (a NUL byte, a name longer than the file system allows, a scheme we do not read)."""
    def one(u):
        scheme = "file"
        try:
            scheme, path = arrow_path(u)
            info = arrow_filesystem(scheme, endpoint, region).get_file_info(path)
        except (ValueError, TypeError) as e:
            return None, f"{type(e).__name__}: {e}"[:300]
        except OSError as e:
            if scheme != "file":
                # an object store that still fails after its client's retries (503 SlowDown, 500,
                # resets): the task fails and Spark retries it; never a reject for a good record
                raise
            return None, f"{type(e).__name__}: {e}"[:300]
        return (info.size if info.type == pafs.FileType.File else None), None

    return _pmap(one, uris, threads)


def _walk_local(root: str, skipped: list | None) -> list[tuple[str, int]]:
    """Files under a local folder without leaving it: symlinked folders are not followed (a link
    loop would repeat the tree forever), symlinked files are kept only when they point inside the
    folder; each left out goes to `skipped` as (URI, why)."""
    real_root = os.path.realpath(root)
    out = []
    for top, dirs, files in os.walk(root, followlinks=False):
        for d in dirs:
            if os.path.islink(os.path.join(top, d)) and skipped is not None:
                skipped.append((qualify(os.path.join(top, d)), "a symlinked folder (not followed)"))
        for f in files:
            full = os.path.join(top, f)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if os.path.commonpath([real_root, target]) != real_root or not os.path.isfile(target):
                    if skipped is not None:
                        skipped.append((qualify(full), f"a symlink to {target}, outside {root}"))
                    continue
            try:
                out.append((qualify(full), os.stat(full).st_size))
            except OSError:
                continue  # removed while listing
    return sorted(out)


def inside(root: str, uri: str) -> bool:
    """Whether uri names a file under the folder root (after '..' and, locally, symlinks)."""
    root_q, q = qualify(root).rstrip("/"), qualify(uri)
    if not q.startswith(root_q + "/"):
        return False
    if not root_q.startswith("file://"):
        return True
    real_root = os.path.realpath(root_q[len("file://"):])
    return os.path.commonpath([real_root, os.path.realpath(q[len("file://"):])]) == real_root


def list_files(root: str, endpoint: str | None = None, region: str | None = None,
               skipped: list | None = None) -> list[tuple[str, int]]:
    """Every file under root, recursively, as (qualified URI, size), zero-byte files included
    (Spark's file sources skip those, which would lose them silently). A local folder is walked
    without leaving it (_walk_local); what was left out goes to `skipped`."""
    q = qualify(root).rstrip("/")
    scheme, path = arrow_path(q)
    if scheme == "file":
        return _walk_local(path, skipped) if os.path.isdir(path) else (
            [(q, os.stat(path).st_size)] if os.path.isfile(path) else [])
    fs = arrow_filesystem(scheme, endpoint, region)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = q[: len(q) - len(path.rstrip("/"))]
    return sorted((prefix + i.path, int(i.size)) for i in infos if i.type == pafs.FileType.File)
