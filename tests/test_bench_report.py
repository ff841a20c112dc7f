"""The CPU report's text (``fastdistill bench``): the table printed once, the
peer footer in full, a missing Liger named as not measured, the floor
explained, and a chart whose titles fit. Tiny shapes: seconds."""
import sys

import pytest

from fastdistill import bench


def _quiet(*_):
    pass


def test_the_table_is_printed_once_and_written_to_out(monkeypatch, tmp_path):
    real = bench.bench_sparse
    monkeypatch.setattr(bench, "bench_sparse", lambda report, n, v, k, **kw: real(report, 8, 64, 4, **kw))
    lines = []
    report = bench.run(quick=True, out_dir=tmp_path, cases_to_run=("sparse",), malloc="glibc",
                       log=lambda *a: lines.append(" ".join(map(str, a))))
    printed = "\n".join(lines)
    assert len(report.rows) >= 2
    # each row once, in the table (there were a line per row, then the table again)
    table_rows = [line for line in printed.splitlines() if line.startswith("| ") and "| 8x64 " in line]
    assert len(table_rows) == len(report.rows)
    assert sum("8x64" in line for line in printed.splitlines()) == len(report.rows) + 1  # + progress
    assert printed.count("| op ") == 1  # one table
    assert "sparse_kd[forward_kl top-4] 8x64 float32: " in printed  # the case's progress line
    table = (tmp_path / "kd_bench.md").read_text()
    assert table.startswith("| op ") and all(f" {r.impl} " in table for r in report.rows)


def _rows(op, shape, impls):
    return [bench.Row(op, shape, "float32", impl, 0.1 * (i + 1), None) for i, impl in enumerate(impls)]


def test_peer_footer_names_the_ops_in_full():
    """The footer printed the PEERS key "sinkhorn[" (a prefix) as `sinkhorn[ → POT`."""
    report = bench.Report()
    op = "sinkhorn[given cost, eps=0.05 100 it, fwd]"
    report.rows += _rows(op, "64x64", ["POT ot.bregman.sinkhorn_log (100 it)",
                                        "fastdistill sinkhorn cpp (one op)"])
    report.rows += _rows("sinkhorn_kd[l1 T=2 eps=0.1 20 it]", "8x64",
                         ["torch eager (SinKD reference port)", "fastdistill sinkhorn_kd_loss cpp"])
    footer = bench.format_table(report).splitlines()[-2]
    assert footer.startswith("peer (")
    assert "sinkhorn[ →" not in footer and "sinkhorn[ " not in footer
    assert f"{op} → POT (GeomLoss: not measured here, no timing)" in footer
    assert "sinkhorn_kd[l1 T=2 eps=0.1 20 it] → torch eager (SinKD reference port)" in footer
    assert "fused_linear_kd" not in footer  # no such rows in this report


def test_missing_liger_is_a_row_and_not_named_as_measured(monkeypatch):
    for name in ("liger_kernel", "liger_kernel.chunked_loss"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    report = bench.Report()
    bench.bench_fused_linear(report, 16, 8, 64, "jsd", repeat=1, with_compile=False, log=_quiet)
    table = bench.format_table(report)
    row = next(line for line in table.splitlines() if line.startswith("| ") and "Liger" in line)
    assert "liger-kernel not installed (pip install liger-kernel)" in row
    footer = table.splitlines()[-2]
    assert ("fused_linear_kd[jsd] → no peer timed, so no ratio (Liger-Kernel: not measured here, "
            "not installed)") in footer
    assert all(r.vs_peer is None for r in report.rows)


def test_the_fused_linear_floor_is_explained():
    report = bench.Report()
    bench.bench_fused_linear(report, 16, 8, 64, "jsd", repeat=1, with_compile=False, log=_quiet)
    table = bench.format_table(report)
    note = table.splitlines()[-3]
    assert note.startswith("x floor: the row's time / its case's floor")
    assert "four bare GEMMs" in note and "fresh output" in note and "page faults" in note
    assert "in place" in note and "GEMMs into reused outputs" in note
    fused = next(r for r in report.rows if r.impl == "fastdistill fused_linear_kd_loss")
    assert "x the GEMMs into reused outputs" in fused.notes


def test_chart_titles_fit_in_the_figure(monkeypatch, tmp_path):
    """The sparse chart's title was cut at "lower is bette"."""
    plt = pytest.importorskip("matplotlib.pyplot")
    report = bench.Report()
    report.rows += _rows("sparse_kd[forward_kl top-64]", "256x32000",
                         ["torch eager (sparse reference)", "densify + kd_loss cpp inplace_backward",
                          "fastdistill sparse_kd_loss cpp inplace_backward"])
    report.rows += _rows("fused_linear_kd[jsd]", "512x512x16000",
                         ["torch eager (materialized logits)", "fastdistill fused_linear_kd_loss"])
    report.floor_seconds["512x512x16000"] = 0.05
    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    assert bench.save_chart(report, tmp_path / "c.png") is not None
    fig = figs[-1]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        for text in (ax.title, ax._left_title, ax._right_title):
            if not text.get_text():
                continue
            bb = text.get_window_extent(renderer)
            assert bb.x0 >= box.x0 - 0.5 and bb.x1 <= box.x1 + 0.5, (text.get_text(), bb, box)
        assert "lower is better" in " ".join(t.get_text() for t in (ax.title, ax._left_title))
