"""The package's own import graph: no module imports one that imports it back.

Circles (kd ↔ vocab_parallel, sparse ↔ softlabels.codec before the KD family
became ``fastdistill/kd/``) were hidden by imports inside functions; this
reads every import statement, wherever it sits, so a lazy one counts too.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fastdistill as fd

PKG = Path(fd.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py") if "kernels" not in p.parts}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastdistill modules ``name`` imports (package ``__init__``s it
    passes through are not edges: they are the re-export layer)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & known
            targets = subs or {mod}  # `from .pkg import sub` imports sub; `from .m import f`, m
        elif isinstance(node, ast.Import):
            targets = {a.name for a in node.names}
        else:
            continue
        out |= (targets & known) - {name}
    return out


def _graph():
    mods = _modules()
    leaves = {m for m, p in mods.items() if p.name != "__init__.py"}
    return {m: _imports(m, p, set(mods)) & leaves for m, p in mods.items() if m in leaves}


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = _graph()
    assert "fastdistill.kd.sparse" in graph and "fastdistill.softlabels.codec" in graph
    circle = _cycle(graph)
    assert circle is None, "import circle: " + " → ".join(circle)


def test_the_circle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_kd_family_is_one_package():
    graph = _graph()
    for m in ("loss", "options", "fused_linear", "sparse", "vocab_parallel", "taid"):
        assert f"fastdistill.kd.{m}" in graph
    # the codec is the soft labels' format: it needs nothing of the KD losses
    assert not {m for m in graph["fastdistill.softlabels.codec"] if m.startswith("fastdistill.kd")}
    assert "fastdistill.kd.loss" not in graph["fastdistill.kd.vocab_parallel"]


@pytest.mark.parametrize("first", ["fastdistill.kd.sparse", "fastdistill.softlabels.loss",
                                   "fastdistill.softlabels.codec", "fastdistill.kd.fused_linear",
                                   "fastdistill.kd.vocab_parallel", "fastdistill.hf.trainer"])
def test_any_module_imports_first_in_a_fresh_interpreter(first):
    code = (f"import {first}, fastdistill as fd; "
            "assert fd.kd_loss is fd.kd.loss.kd_loss and fd.kd.TEMPERATURE_RANGE; "
            "assert fd.softlabels.kd_loss and fd.sparse_kd_loss is fd.kd.sparse.sparse_kd_loss")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PKG.parent)


def test_public_names_stay_where_they_were():
    for name in ("kd_loss", "KDLoss", "DIVERGENCES", "fused_linear_kd_loss", "FusedLinearKDLoss",
                 "sparse_kd_loss", "sample_teacher", "TAIDSchedule"):
        assert getattr(fd, name) is getattr(fd.kd, name)
    for name in ("BETA_RANGE", "SKEW_MAX", "TAID_T_MIN", "TEMPERATURE_RANGE", "kd_options"):
        assert hasattr(fd.kd, name)
    for name in ("Codec", "SoftLabels", "encode", "kd_loss", "SoftLabelStore"):
        assert hasattr(fd.softlabels, name)


def test_every_internal_import_names_a_module():
    """A lazy import of a module that moved fails only when its function runs:
    find them all here."""
    mods = _modules()
    missing = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module
                                                                    else []))
            elif (node.module or "").startswith("fastdistill"):
                mod = node.module
            else:
                continue
            if mod.startswith("fastdistill.kernels"):
                continue
            if mod not in mods and not {f"{mod}.{a.name}" for a in node.names} & set(mods):
                missing.append(f"{path.name}:{node.lineno} imports {mod}")
    assert not missing, missing
