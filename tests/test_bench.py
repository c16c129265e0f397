"""The benchmark must keep working: its quick mode (tiny model, 3 updates, plain + floor), for SD and
SDXL, and its floor must compute what the trainer computes."""
import os
import re
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import PROMPT, ROOT, logged_scalars, run_cli, run_train, train_args

sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_benchmark_quick_prints_a_table_with_ratios(tmp_path):
    """One repeat: the summary that --repeats adds is checked on made-up measurements below."""
    result = run_cli([sys.executable, "bench/benchmark.py", "--quick", "--work", str(tmp_path / "work")])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| plain |")]
    assert len(rows) == 1, result.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    # variant, update s, period s, CPU s, floor, period/floor, CPU/floor CPU median, ... min, RSS MiB, wall s
    for ratio in cells[5:8]:
        assert re.fullmatch(r"\d+\.\d+", ratio) and float(ratio) > 0, rows[0]
    assert float(cells[8]) > 0 and float(cells[9]) > 0, rows[0]
    # period / floor from the shown times, which are rounded to 1 ms: on the tiny model that alone is a few %
    period, floor_period, ratio = float(cells[2]), float(cells[4].split(",")[0]), float(cells[5])
    rounding = period / floor_period * (0.0005 / period + 0.0005 / floor_period) + 0.005
    assert abs(ratio - period / floor_period) <= rounding, rows[0]
    assert re.search(r"^\| floor, batch 1, run 1 \| \d+\.\d+ \|", result.stdout, re.M), result.stdout
    from train_dreambooth import choose_mkl_code_path

    if choose_mkl_code_path(dict(os.environ)):  # AMD: the trainer's kernels differ from a bare Paddle loop's
        reference = [line for line in result.stdout.splitlines()
                     if line.startswith("| floor, batch 1, MKL_DEBUG_CPU_TYPE= (MKL's own code path")]
        assert len(reference) == 1 and float(reference[0].split("|")[2]) > 0, result.stdout


def test_repeats_add_the_median_of_each_ratio_over_the_repeats(tmp_path):
    """--repeats 3 on made-up measurements (what main() collects: one row per variant and repeat, each with
    the floor measured right before it): a summary row per variant, each ratio's median over the repeats and,
    in brackets, every repeat's ratio in order; the rows of each repeat stay in the table."""
    import argparse

    import benchmark

    key = (1, 0)
    floors = {key: [dict(median=m, cpu=2 * c, cpu_min=c, rss=2**20, wall=1.0)
                    for m, c in ((0.1, 0.2), (0.2, 0.2), (0.1, 0.4))]}
    periods, cpu_mins = (0.3, 0.5, 0.15), (0.5, 0.6, 0.4)  # period / floor: 3, 2.5, 1.5; CPU min: 2.5, 3, 1
    rows = [dict(name=f"plain #{i + 1}", variant="plain", update=p, period=p, cpu=2 * c, cpu_min=c, rss=2**20,
                 wall=2.0, floor_key=key, floor=floors[key][i]) for i, (p, c) in enumerate(zip(periods, cpu_mins))]
    args = argparse.Namespace(steps=2, warmup=1, threads=1, repeats=3)
    table = benchmark.render(rows, floors, {}, [], args, 64)
    assert [line.split("|")[6].strip() for line in table.splitlines() if line.startswith("| plain #")] == \
        ["3.00", "2.50", "1.50"]
    summary = [line for line in table.splitlines() if line.startswith("| plain |")]
    assert summary == ["| plain | 2.50 (3.00, 2.50, 1.50) | 2.50 (2.50, 3.00, 1.00) |  |"], table
    assert not [line for line in benchmark.render(rows[:1], floors, {}, [], argparse.Namespace(
        steps=2, warmup=1, threads=1, repeats=1), 64).splitlines() if "Median over" in line]


def test_sdxl_benchmark_quick_gives_lora_against_its_lora_floor(tiny_sdxl, tmp_path):
    """--family sdxl --quick --variants LoRA: the --use_lora run against the floor that trains the same adapters
    on the frozen UNet, the only floor measured. (The SD run above is the plain variant against the plain floor;
    the quick mode's other SDXL variant, the full fine-tune, is the trainer's SDXL path of tests/test_sdxl.py.)"""
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8") as f:
        committed = f.read()
    # The session's tiny SDXL is the model --quick builds (tiny_sd.py --family sdxl, seed 0) where it finds none:
    # given it, the run skips that build (the SD test above runs it).
    shutil.copytree(tiny_sdxl, tmp_path / "work-quick" / "tiny-sdxl")
    result = run_cli([sys.executable, "bench/benchmark.py", "--family", "sdxl", "--quick", "--variants", "LoRA",
                      "--work", str(tmp_path / "work")])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| LoRA |")]
    assert len(rows) == 1, result.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[4].endswith("(batch 1, LoRA rank 4)"), rows[0]  # against its own floor
    for ratio in cells[5:8]:
        assert re.fullmatch(r"\d+\.\d+", ratio) and float(ratio) > 0, rows[0]
    period, floor_period = float(cells[2]), float(cells[4].split(",")[0])
    assert float(cells[5]) == pytest.approx(period / floor_period, abs=period / floor_period * 0.03 + 0.005)
    assert re.search(r"^\| floor, batch 1, LoRA rank 4, run 1 \| \d+\.\d+ \|", result.stdout, re.M), result.stdout
    assert not re.search(r"^\| (full|floor, batch 1, run 1) \|", result.stdout, re.M), result.stdout
    with open(os.path.join(ROOT, "bench", "RESULTS.md"), encoding="utf-8") as f:
        assert f.read() == committed  # trying the benchmark leaves the committed results alone


def test_sdxl_floor_computes_the_trainers_loss_on_the_trainers_batch(tiny_sdxl, instance_dir, tmp_path):
    """The floor's update (random inputs of the trainer's shapes, the same LoRA) is the trainer's: fed the
    batch the trainer drew for its first update, the floor's loss is the trainer's logged loss."""
    import paddle
    from ppdiffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    import benchmark
    import families
    import train_dreambooth as tdb

    run_train(*train_args(tiny_sdxl, instance_dir, tmp_path / "out", "--use_lora", "--lora_rank",
                          benchmark.LORA_RANK, "--center_crop", "--max_train_steps", 1))
    logged = logged_scalars(tmp_path / "out", "train/loss")[1]

    # The trainer's first batch, from its documented randomness (as tests/test_sdxl.py rebuilds it).
    names = sorted(os.listdir(instance_dir))
    item = np.random.default_rng([0, tdb.ORDER_STREAM, 0]).permutation(len(names))[0]
    image = Image.open(os.path.join(instance_dir, names[item])).convert("RGB")  # 72x64: center crop 4 from the left
    pixels = np.asarray(image.crop((4, 0, 68, 64)), np.float32).transpose(2, 0, 1) / 127.5 - 1
    rng = np.random.default_rng([0, tdb.NOISE_STREAM, 0, 0, 0])
    eps, noise = (rng.standard_normal((4, 8, 8), dtype=np.float32) for _ in range(2))
    t = int(rng.integers(0, 1000))
    alphas_cumprod = DDPMScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler").alphas_cumprod.numpy()
    with paddle.no_grad():
        posterior = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae").encode(
            paddle.to_tensor(pixels[None])).latent_dist
        latent = (posterior.mean.numpy()[0] + posterior.std.numpy()[0] * eps) * 0.13025
        states, _, pooled, _ = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl).encode_prompt(
            PROMPT, do_classifier_free_guidance=False)
    noisy = np.sqrt(alphas_cumprod[t]) * latent + np.sqrt(1 - alphas_cumprod[t]) * noise
    batch = dict(noisy=paddle.to_tensor(noisy[None].astype(np.float32)), timesteps=paddle.to_tensor([t]),
                 states=states, text_embeds=pooled, target=paddle.to_tensor(noise[None]),
                 time_ids=paddle.to_tensor([[64, 72, 0, 4, 64, 64]], dtype="float32"))

    paddle.seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    trained = benchmark.floor_lora(unet, benchmark.LORA_RANK)
    drawn = benchmark.floor_inputs(unet, tiny_sdxl, 1, 64, 64, np.random.default_rng(0))
    assert {k: v.shape for k, v in drawn.items()} == {k: list(v.shape) for k, v in batch.items()}
    assert float(benchmark.floor_loss(unet, batch)) == pytest.approx(logged, rel=1e-4)
    # ... and it trains as many values as --use_lora does
    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert sum(int(p.numel()) for p in trained) == families.add_attention_lora(
        reference, families.SD.lora_projections, benchmark.LORA_RANK, benchmark.LORA_RANK)


SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
                 transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"])


def test_the_unet_activation_count_follows_sdxl_levels():
    """SDXL's UNet has a transformer depth and a head count per level (1, 2, 10 blocks; 5, 10, 20 heads;
    no attention at the top level). Counted here by hand for 1024x1024 (128x128 latents), 77 tokens:
    the attention layers at 64x64 (2 down, 3 up) and at 32x32 (2 down, 3 up, 1 mid)."""
    from memory_estimate import unet_activation_elements

    def count(**changes):
        return unet_activation_elements(dict(SDXL_UNET, **changes), 128, 128, 77, efficient_attention=True)

    # each transformer block beyond the first: ~26 C N plus cross-attention's 2 heads N tokens
    extra = 5 * 1 * (26 * 640 * 64**2 + 2 * 10 * 64**2 * 77) + 6 * 9 * (26 * 1280 * 32**2 + 2 * 20 * 32**2 * 77)
    assert count() - count(transformer_layers_per_block=1) == extra
    # plain attention keeps 2 heads N^2 of scores and probabilities per transformer block
    plain = unet_activation_elements(SDXL_UNET, 128, 128, 77)
    assert plain - count() == 5 * 2 * 2 * 10 * (64**2) ** 2 + 6 * 10 * 2 * 20 * (32**2) ** 2
    # checkpointed: inputs of blocks, and the largest recomputed internals (one of the 32x32 blocks) once
    checkpointed = unet_activation_elements(SDXL_UNET, 128, 128, 77, checkpointing=True, efficient_attention=True)
    assert checkpointed < count() / 5


def test_print_memory_estimate_counts_what_the_trainer_keeps_on_the_gpu(tiny_sdxl, instance_dir, tmp_path,
                                                                       monkeypatch):
    """SDXL LoRA: the frozen UNet stays (fp32); both frozen text encoders, and the VAE when latents are
    cached (--center_crop: no random crop to lose), are parked; start-up holds every part in fp32;
    validation brings the parked parts back. Counted here from the tiny model's own folders."""
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.models.attention_processor import Attention
    from ppdiffusers.transformers import CLIPTextModel, CLIPTextModelWithProjection

    import memory_estimate
    from conftest import run_train, train_args

    count = lambda model: sum(int(p.numel()) for p in model.parameters())  # noqa: E731
    unet_model = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    unet, vae = count(unet_model), count(AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae"))
    text = count(CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder")) + count(
        CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2"))
    lora = sum(4 * sum(layer.get_sublayer(name).weight.shape) for layer in unet_model.sublayers()
               if isinstance(layer, Attention) for name in ("to_q", "to_k", "to_v", "to_out.0"))
    for flags, vae_parked in [(["--center_crop"], True), ([], False)]:
        logged = []
        monkeypatch.setattr(memory_estimate, "log_estimate", lambda log, rows, note: logged.extend(rows))
        run_train(*train_args(tiny_sdxl, instance_dir, tmp_path / str(vae_parked), "--print_memory_estimate",
                              "--use_lora", "--max_train_steps", 1, *flags))
        rows = {label.split(" (")[0].split(":")[0]: size for label, size in logged}
        assert rows["trained weights, fp32"] == 4 * lora and rows["AdamW states, 2 x fp32"] == 8 * lora
        assert rows["frozen UNet base under LoRA, fp32"] == 4 * unet
        assert not [label for label in rows if "text_encoder" in label], rows  # parked
        assert rows.get("frozen VAE, fp32") == (None if vae_parked else 4 * vae), rows
        assert rows["start-up"] == 4 * (unet + lora + text + vae)
        assert rows["validation and diagnostics bring the parked parts back"] == 4 * (text + vae_parked * vae)
        training = [size for label, size in logged
                    if label.startswith(("trained", "frozen", "gradients", "AdamW", "UNet activations"))]
        assert len(training) == 6 - vae_parked and rows["total while training"] == sum(training)


def test_print_memory_estimate_logs_the_loaded_model(tiny_model, instance_dir, tmp_path, capsys):
    from conftest import run_train, train_args

    run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--print_memory_estimate",
                          "--train_text_encoder", "--max_train_steps", 1))
    out = capsys.readouterr().out
    assert "GPU memory estimate (estimate:" in out
    assert "trained weights, fp32 (UNet + text encoder:" in out and "AdamW states" in out and "total" in out
