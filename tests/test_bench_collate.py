"""benchmarks/bench_collate.py runs end to end on a small store: every task's row and both hand-over rows."""
from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_collate  # noqa: E402


def test_bench_collate_reports_every_task_and_the_hand_over(tmp_path, capsys):
    csv = tmp_path / "results.csv"
    bench_collate.main(["--images", "24", "--batches", "3", "--step-ms", "2", "--data-dir", str(tmp_path),
                        "--csv", str(csv)])
    out = capsys.readouterr().out
    for task in bench_collate.TASKS:
        assert re.search(rf"^{task} +\d+\.\d \(", out, re.M), f"no row for {task}:\n{out}"
    for kind in ("waiting", "busy"):
        for ahead in (0, 2):
            assert re.search(rf"^  {kind} step, {ahead} ahead: -?\d+\.\d", out, re.M), out
    rows = csv.read_text().splitlines()
    assert len(rows) == 1 + len(bench_collate.TASKS) + 4 and "bench_collate" in rows[1]
    index = tmp_path / "store-24" / "index.rsi"
    written = index.stat().st_mtime_ns
    bench_collate.main(["--images", "24", "--batches", "1", "--tasks", "itm", "--prefetch", "0", "--step-ms", "0",
                        "--data-dir", str(tmp_path), "--no-csv"])
    assert index.stat().st_mtime_ns == written, "--data-dir's store was written again instead of reused"


def test_bench_collate_leaves_torch_threads_as_they_were(tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bench_collate.main(["--images", "8", "--batches", "1", "--tasks", "itm", "--prefetch", "0", "--step-ms", "0",
                            "--data-dir", str(tmp_path), "--no-csv"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
