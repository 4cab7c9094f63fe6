"""scripts/bench.py runs with cl-train's overrides and prints one JSON line per measurement."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.parametrize("pipeline", ["device", "per_image"])
def test_bench_prints_rates_for_each_part(pipeline, tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), f"--pipeline={pipeline}", "--steps=2", "--warmup=1",
                           "trainer.batch_size=32", "encoder.width=4", "trainer.workers=1"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["part"] for r in rows] == ["pipeline", "step", "end_to_end", "summary"]
    assert all(r["images_per_s"] > 0 and r["peak_mem_mib"] > 0 for r in rows[:3])
    assert rows[0]["pipeline"] == pipeline and rows[0]["batch_size"] == 32


def test_bench_methods_prints_a_step_row_per_method_and_a_relative_table(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--methods=simclr,moco,supcon,dino", "--repeats=2", "--steps=2", "--warmup=1",
                           "trainer.batch_size=32", "encoder.width=4"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["part"] for r in rows] == ["step simclr", "step moco", "step supcon", "step dino"]
    assert rows[1]["overrides"].endswith("method=moco") and all(r["ms_per_step"] > 0 for r in rows)
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method |") and [line.split(" | ")[0] for line in table[1:]] == \
        ["| simclr", "| moco", "| supcon", "| dino"]
    assert table[1].endswith("| 1.00x |")
