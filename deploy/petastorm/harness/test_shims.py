"""A pytest plugin for running petastorm's own tests (make test-petastorm): what the tests, unlike
the library, still take from APIs that current numpy, pyarrow and pandas removed.

- numpy 1 aliases (np.unicode_, np.string_, np.float, ...) are renamed in the test modules'
  source as they are imported (petastorm.tests.* only), so the library under test stays the
  patched build exactly: an alias left in it would still fail;
- test_end_to_end imports `pyarrow.hdfs` and uses nothing of it: an empty module stands in;
- test_arrow_table_serializer takes assert_frame_equal from `pandas.util.testing`, which pandas 2
  renamed `pandas.testing`.

sitecustomize.py beside it loads it in every Python the tests start (their Spark workers unpickle
test functions); pytest runs with --assert=plain, since its assertion rewriting would import the
test modules past the renaming.
"""

import importlib.abc
import importlib.machinery
import re
import sys

RENAMES = {"unicode_": "str_", "string_": "bytes_", "float_": "float64", "float": "float64", "int": "int_",
           "bool8": "bool_"}
_NAMES = re.compile(r"\bnp\.(" + "|".join(map(re.escape, RENAMES)) + r")\b(?!\w)")


class _TestsLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):  # from the source every time: a cached .pyc would skip the renaming
        path = self.get_filename(fullname)
        text = _NAMES.sub(lambda m: f"np.{RENAMES[m.group(1)]}", self.get_data(path).decode())
        return self.source_to_code(text.encode(), path)


class _TestsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if not name.startswith("petastorm.tests."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _TestsLoader(spec.loader.name, spec.loader.path)
        return spec


sys.meta_path.insert(0, _TestsFinder())


def _stand_in(name: str, **attrs) -> None:
    import types

    if name not in sys.modules:
        try:
            importlib.import_module(name)
            return
        except ImportError:
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module


_stand_in("pyarrow.hdfs")
try:
    import pandas.testing as _pdt

    _stand_in("pandas.util.testing", assert_frame_equal=_pdt.assert_frame_equal)
except ImportError:  # pandas is not there: the test that needs it fails on its own
    pass
