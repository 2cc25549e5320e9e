"""The benchmark scripts that cannot run here for real: `benchmarks/gpu.py` (the one-shot GPU benchmark) runs whole
on the CPU with tiny models of the same families (`--dry-run`), so that the script is ready when a GPU is."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO

GPU_BENCH = REPO / "benchmarks" / "gpu.py"


def gpu_bench():
    """benchmarks/gpu.py as a module (its SPECS and FIXTURES, its timing helper)."""
    if "gpu_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_bench", GPU_BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up while it runs
        spec.loader.exec_module(module)
    return sys.modules["gpu_bench"]


def test_gpu_benchmark_dry_run(tmp_path):
    from vlmtune.families import family_of_dir

    bench = gpu_bench()
    out = tmp_path / "gpu-bench"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(GPU_BENCH), "--dry-run", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {(row["model"], row["run"]): row for row in results["rows"]}
    assert len(rows) == len(results["rows"]) == len(bench.FIXTURES) * len(bench.SPECS)
    for fixture in bench.FIXTURES:
        family = family_of_dir(fixture)
        for spec in bench.SPECS:
            row = rows[(fixture.name, spec.name)]
            if spec.packed and family.recurrent_state:  # linear attention packs only with its CUDA kernels
                assert row["status"].startswith("skipped: packing"), row
                continue
            assert row["status"] == "ok", row
            assert row["samples_per_s"] > 0 and row["tflops"] >= 0 and row["mfu"] is None, row
            if spec.mode == "train":
                assert row["loss"] > 0 and row["tokens_per_s"] > 0, row
    assert [m["model"] for m in results["models"]] == [f.name for f in bench.FIXTURES]
    table = (out / "results.md").read_text(encoding="utf-8")
    assert sum(line.startswith("| ") for line in table.splitlines()) == len(rows) + 2  # + title and rule lines
    assert table in done.stdout


def test_gpu_benchmark_timing_keeps_to_the_budget():
    bench = gpu_bench()
    calls = []
    feed = bench.Feed([0])
    now = time.perf_counter()
    seconds, steps = bench.timed(lambda: calls.append(feed.take(1)), 2, 5, (now + 60, now + 60), feed, cuda=False)
    assert (len(calls), steps, len(feed.used)) == (7, 5, 5) and seconds >= 0
    with pytest.raises(bench.OverBudget):  # one warm-up step, then no time for a timed one
        bench.timed(lambda: time.sleep(0.05), 3, 5, (now, now), feed, cuda=False)
