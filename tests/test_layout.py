"""The import direction (docs/architecture.md): jobs -> sparkml -> dl -> core, no arrows back. The
training and scoring processes import dl without pulling in Spark."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

ORDER = {"core": 0, "dl": 1, "sparkml": 2}  # a package may import those below it only


def _imported(path: Path) -> set[str]:
    """The top-level first-party packages a module imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ORDER)


def test_packages_import_only_downwards():
    wrong = [f"{path.relative_to(ROOT)} imports {other}" for package, rank in ORDER.items()
             for path in sorted((ROOT / package).rglob("*.py")) for other in _imported(path) if ORDER[other] > rank]
    assert wrong == []


def test_the_torch_side_runs_without_spark():
    code = ("import sys, dl.train, dl.score, dl.data, dl.checkpoint, dl.models, dl.weights, dl.export, dl.spec, "
            "dl.distributed; print(sorted({m.split('.')[0] for m in sys.modules} & {'pyspark', 'sparkml', 'py4j'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
