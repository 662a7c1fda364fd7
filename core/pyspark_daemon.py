"""pyspark's worker daemon (spark.python.daemon.module, set by core.session), with the archives on
the workers' path read once instead of before every task.

pyspark's worker calls importlib.invalidate_caches() before each task, and up to Python 3.12 a
zipimporter's invalidate_caches reads its archive's whole directory again (3.13 only forgets it):
with Spark's pyspark.zip (3 MB) on the path that took a third of the Python workers' CPU in
tests/test_prepare_dedup.py (py-spy, 2026-12-07); on Spark 3.5, whose workers' path also reaches
into spark-core's jar (15 MB), more. An archive a worker reads does not change while the daemon runs
(Spark's own, the application's --py-files, a file SparkContext.addPyFile fetched: Spark does not
add a path again), so the workers' archive importers keep what they read.

Where pyspark is installed as a package (pip, a bundle's venv in local mode), Spark still puts the
copy of it zipped inside that package first on the path: those two archives go after the package,
so workers import the same files from their compiled bytecode instead of compiling the zip's
sources (1.2 s more per daemon, more in every worker for each module it imports later). On a
cluster, where Spark's installation provides pyspark, the path is left in its order.
"""

from __future__ import annotations

import os
import sys
import zipimport


class _Unchanging(zipimport.zipimporter):
    """A zipimporter that keeps the archive's directory it read when made."""

    def invalidate_caches(self) -> None:
        pass


def _inside_installed_pyspark(entry: str) -> bool:
    """entry is <dir>/pyspark/python/lib/<archive> and <dir> is on the path (pip's layout)."""
    lib = os.path.dirname(entry)
    package = os.path.dirname(os.path.dirname(lib))
    return (os.path.basename(lib) == "lib" and os.path.basename(package) == "pyspark"
            and os.path.dirname(package) in sys.path)


def settle_path() -> None:
    """Archive importers made from here on (sys.path_hooks) and those made already keep what they
    read; pyspark's own archives go after the installed package."""
    sys.path_hooks.insert(0, _Unchanging)  # what is not in an archive: ZipImportError, the next hook
    for entry, finder in list(sys.path_importer_cache.items()):
        if type(finder) is zipimport.zipimporter:
            sys.path_importer_cache[entry] = _Unchanging(entry)
    moved = [e for e in sys.path if os.path.isfile(e) and _inside_installed_pyspark(e)]
    sys.path[:] = [e for e in sys.path if e not in moved] + moved


if __name__ == "__main__":
    settle_path()
    from pyspark import daemon

    daemon.manager()
