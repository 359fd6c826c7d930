"""The package's import structure: its modules import each other without a circle (the graph of `tinytis.*`
imports, at module level or inside functions, is a DAG), and importing any of them, or the command-line scripts,
does not import transformers (bench.py imports it only inside the functions that measure the peer)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tinytis"
SCRIPTS = ("generate", "eval", "train", "bench")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The tinytis modules a file imports: `from P import N` counts as P.N where that is a module, else as P."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (its modules in order, the first again at the end), or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for c in (visit(n) for n in sorted(graph)) if c), None)


def test_the_cycle_finder_finds_a_circle_and_passes_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_imports_the_package_has():
    graph = import_graph()
    assert "tinytis.model" in graph["tinytis.engine"]  # from tinytis.model import Transformer
    assert "tinytis.kernels" in graph["tinytis.nf4_linear"]  # from tinytis import kernels: the package
    assert "tinytis.kernels._triton" in graph["tinytis.kernels.rope_cache"]  # from tinytis.kernels._triton import tl
    assert "tinytis.nf4" in graph["tinytis.kernels.nf4_matmul"]
    assert "tinytis.evaluate" in graph["tinytis.bench.peers"]  # an import inside a function


def test_the_package_import_graph_is_a_dag():
    assert find_cycle(import_graph()) is None


def test_no_module_nor_script_imports_transformers():
    code = f"""
import importlib, json, pkgutil, sys
import tinytis
names = ["tinytis"] + sorted(m.name for m in pkgutil.walk_packages(tinytis.__path__, "tinytis.")) + {list(SCRIPTS)!r}
for name in names:
    importlib.import_module(name)
print(json.dumps({{"imported": names, "transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers")}}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"tinytis.bench.speed", "tinytis.bench.peers", "tinytis.bench.gpu", "tinytis.bench.load", "bench"} <= set(r["imported"])
    assert set(r["imported"]) >= set(import_graph())  # every module of the package was imported
    assert r["transformers"] == []
