"""The benchmark must keep working: its quick mode (tiny model, 3 updates, plain + floor)."""
import re
import sys

from conftest import run_cli


def test_benchmark_quick_prints_a_table_with_ratios(tmp_path):
    result = run_cli([sys.executable, "bench/benchmark.py", "--quick", "--work", str(tmp_path / "work")])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| plain |")]
    assert rows, result.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    # variant, update s, period s, CPU s, floor, update/floor, period/floor, CPU/floor CPU, RSS MiB, wall s
    for ratio in cells[5:8]:
        assert re.fullmatch(r"\d+\.\d+", ratio) and float(ratio) > 0, rows[0]
    assert float(cells[8]) > 0 and float(cells[9]) > 0, rows[0]
