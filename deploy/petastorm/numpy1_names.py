"""A pytest plugin for running petastorm's own tests (make test-petastorm). The tests, unlike the
library, still name numpy 1 aliases that numpy 2 removed (np.unicode_, np.string_, np.float, ...).
This renames them in the test modules' source as they are imported (petastorm.tests.* only), so
the library under test stays the patched build exactly: an alias left in it would still fail."""

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
