"""The benchmark must keep working: its quick mode (tiny model, 3 updates, plain + floor)."""
import os
import re
import sys

import pytest

from conftest import ROOT, run_cli


def test_benchmark_quick_prints_a_table_with_ratios(tmp_path):
    result = run_cli([sys.executable, "bench/benchmark.py", "--quick", "--repeats", "2", "--work",
                      str(tmp_path / "work")])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| plain #")]
    assert len(rows) == 2, result.stdout
    period_ratios = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # variant, update s, period s, CPU s, floor, period/floor, CPU/floor CPU median, ... min, RSS MiB, wall s
        for ratio in cells[5:8]:
            assert re.fullmatch(r"\d+\.\d+", ratio) and float(ratio) > 0, row
        assert float(cells[8]) > 0 and float(cells[9]) > 0, row
        # period / floor from the shown times, which are rounded to 1 ms: on the tiny model that alone is a few %
        period, floor_period, ratio = float(cells[2]), float(cells[4].split(",")[0]), float(cells[5])
        rounding = period / floor_period * (0.0005 / period + 0.0005 / floor_period) + 0.005
        assert abs(ratio - period / floor_period) <= rounding, row
        period_ratios.append(cells[5])
    # the summary row: the median of the two repeats' ratios, and each of them
    summary = [line for line in result.stdout.splitlines() if line.startswith("| plain |")]
    assert len(summary) == 1, result.stdout
    median, each = re.match(r"\| plain \| ([0-9.]+) \(([0-9., ]+)\)", summary[0]).groups()
    assert [x.strip() for x in each.split(",")] == period_ratios
    assert float(median) == pytest.approx(sum(map(float, period_ratios)) / 2, abs=0.0101)  # two roundings
    from train_dreambooth import choose_mkl_code_path

    if choose_mkl_code_path(dict(os.environ)):  # AMD: the trainer's kernels differ from a bare Paddle loop's
        reference = [line for line in result.stdout.splitlines()
                     if line.startswith("| floor, batch 1, MKL_DEBUG_CPU_TYPE= (MKL's own code path")]
        assert len(reference) == 1 and float(reference[0].split("|")[2]) > 0, result.stdout


def test_memory_estimate_matches_docs_for_sd1():
    """docs/memory.md's activation rows come from memory_estimate for SD 1.x at 512 (64x64 latents)."""
    from memory_estimate import unet_activation_elements

    sd1 = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    gib = lambda elements: 4 * elements / 2**30  # noqa: E731  fp32
    assert round(gib(unet_activation_elements(sd1, 64, 64, 77)), 1) == 7.3
    assert round(gib(unet_activation_elements(sd1, 64, 64, 77, efficient_attention=True)), 1) == 2.0
    assert round(gib(unet_activation_elements(sd1, 64, 64, 77, checkpointing=True)), 1) == 1.3


def test_memory_estimate_matches_docs_for_sd3():
    """docs/memory.md's SD3 activation rows come from memory_estimate for SD3 medium at 1024 (128x128
    latents, 77 CLIP + 77 T5 tokens)."""
    from memory_estimate import transformer_activation_elements

    sd3 = dict(patch_size=2, num_attention_heads=24, attention_head_dim=64, num_layers=24)
    with open(os.path.join(ROOT, "docs", "memory.md"), encoding="utf-8") as f:
        doc = f.read().split("## Stable Diffusion 3")[1]
    rows = [({}, "| plain attention (scores kept) |"),
            ({"efficient_attention": True}, "| memory-efficient attention |"),
            ({"checkpointing": True}, "| `--gradient_checkpointing`, plain attention |"),
            ({"checkpointing": True, "efficient_attention": True},
             "| `--gradient_checkpointing` + memory-efficient attention |")]
    for flags, row in rows:
        gib = 4 * transformer_activation_elements(sd3, 128, 128, 154, **flags) / 2**30
        assert f"{row} ~{gib:.1f} GiB | ~{gib / 2:.1f} GiB |" in doc, row


def test_print_memory_estimate_logs_the_loaded_model(tiny_model, instance_dir, tmp_path, capsys):
    from conftest import run_train, train_args

    run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--print_memory_estimate",
                          "--train_text_encoder", "--max_train_steps", 1))
    out = capsys.readouterr().out
    assert "GPU memory estimate (estimate:" in out
    assert "trained weights, fp32 (UNet + text encoder:" in out and "AdamW states" in out and "total" in out
