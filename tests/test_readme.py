"""Every ```python block of README.md and docs/*.md runs as written, each in a
fresh process in an empty working directory; a block that raises fails the
test. Nothing is injected: a block that forgets an import or uses a name it
never defines fails, as it would for a reader who copies it."""
import ast
import builtins
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))


def blocks_of(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


BLOCKS = [(f"{path.relative_to(ROOT)}:{i}", code) for path in PAGES
          for i, code in enumerate(blocks_of(path))]

RUNNER = r'''
import sys
from pathlib import Path

code = Path(sys.argv[1]).read_text()
exec(compile(code, sys.argv[2], "exec"), {"__name__": "__main__"})
print("BLOCK OK")
'''


def free_names(code: str) -> set[str]:
    """The names a block reads but never binds (assignment, loop, import, def,
    with/except target, comprehension), builtins aside."""
    tree = ast.parse(code)
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else read).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return read - bound


def test_pages_have_their_blocks():
    assert len(blocks_of(README)) >= 2, "README.md: the own-text KDTrainer and the loss loop"
    assert len(BLOCKS) >= 12, f"found only {len(BLOCKS)} python blocks in {PAGES}"


@pytest.mark.parametrize("where,code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_block_defines_every_name_it_uses(where, code):
    assert not free_names(code), f"{where} uses names it never defines: {sorted(free_names(code))}"


def _calls(code: str, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == name]


def test_the_readme_loss_example_shifts_its_labels():
    """A causal LM's row i predicts token i + 1: the first kd_loss example of the
    README drops the last position of both logits and the first label."""
    code = next(b for b in blocks_of(README) if "fd.kd_loss(" in b)
    call = _calls(code, "kd_loss")[0]
    student, teacher = (ast.unparse(a) for a in call.args[:2])
    labels = next(ast.unparse(k.value) for k in call.keywords if k.arg == "labels")
    assert student.endswith("[:, :-1]") and teacher.endswith("[:, :-1]"), (student, teacher)
    assert labels.endswith("[:, 1:]"), labels


def test_the_readme_has_an_own_text_kdtrainer_example():
    """A list of strings, tokenized, trained, evaluated, saved and reloaded."""
    code = next(b for b in blocks_of(README) if "KDTrainer(" in b)
    for needed in ("texts = [", "tok(t)", ".train()", ".evaluate()", ".save_model(",
                   "from_pretrained("):
        assert needed in code, needed


@pytest.mark.parametrize("where,code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_block_runs(where, code, tmp_path):
    (tmp_path / "block.py").write_text(code)
    cmd = [sys.executable, "-c", RUNNER, str(tmp_path / "block.py"), where]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - t0
    assert out.returncode == 0 and "BLOCK OK" in out.stdout, (
        f"{where} failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}")
    if "SoftLabelWriter" in code:  # the writer is called resumable: a rerun works too
        again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, f"{where} fails when rerun:\n{again.stderr[-3000:]}"
    print(f"{where}: {took:.1f} s")


# ------------------------------------------------ what `make demo` prints

def test_bench_table_names_a_missing_liger(tmp_path):
    """The footer names Liger-Kernel as the fused-linear peer: without
    liger-kernel the table says so in a row instead of dropping it."""
    import importlib.util

    from fastdistill import bench

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed here: its row is a real timing")
    report = bench.Report()
    bench.bench_fused_linear(report, 16, 8, 64, "jsd", repeat=1, with_compile=False, log=lambda *_: None)
    table = bench.format_table(report)
    row = next(line for line in table.splitlines() if "Liger" in line and line.startswith("|"))
    assert "liger-kernel not installed (pip install liger-kernel)" in row
    assert "Liger-Kernel" in table.splitlines()[-2]  # the peer footer
    assert any("fastdistill" in r.impl and r.seconds for r in report.rows)
    bench.save_chart(report, tmp_path / "chart.png")  # the untimed row is left out of the chart


def test_bench_output_has_no_cuda_runtime_warning(tmp_path):
    """A CUDA toolkit without a GPU: cpp_extension's import logs "No CUDA runtime
    is found"; torch.compile imports it in the middle of the rows. After
    bench.run has started, that import prints nothing."""
    code = ("from fastdistill import bench\n"
            f"bench.run(cases_to_run=(), out_dir={str(tmp_path / 'out')!r})\n"
            "import torch.utils.cpp_extension\n"
            "print('CUDA_HOME', torch.utils.cpp_extension.CUDA_HOME)\n")
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"CUDA_HOME {tmp_path}" in out.stdout  # the condition of the warning did hold
    assert "No CUDA runtime" not in out.stdout + out.stderr, out.stderr


def test_dd_exports_what_readme_and_design_name():
    """README.md and DESIGN.md reach the trainer as fd.dd.DatasetDistiller."""
    from fastdistill import dd

    for name in ("DatasetDistiller", "grouped_gradients", "per_sample_grad_norms",
                 "gradient_match_loss", "distribution_match_loss", "attention_match_loss",
                 "trajectory_match_loss", "dsa", "ConvNet", "load_dataset"):
        assert name in dd.__all__ and callable(getattr(dd, name)), name
    assert all(hasattr(dd, name) for name in dd.__all__)
