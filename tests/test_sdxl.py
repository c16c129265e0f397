"""SDXL DreamBooth on a tiny SDXL built by tiny_sd.py --family sdxl: the guarantees of the SD 1.x path."""
import csv
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import (CLASS_PROMPT, GRADIENT_LIKE, PROMPT, load_weights, logged_scalars, make_images, run_cli,
                      run_train, train_args)

TRAINED = ("unet", "text_encoder", "text_encoder_2")
RANK = 2


def sdxl_args(model, instance, out, class_dir, *extra):
    """Full fine-tune of the UNet and both text encoders with prior preservation, validation and
    diagnostics: 4 updates, a checkpoint at 2."""
    return train_args(model, instance, out, "--train_text_encoder", "--with_prior_preservation", "--class_prompt",
                      CLASS_PROMPT, "--class_data_dir", class_dir, "--num_class_images", 2, "--class_inference_steps",
                      2, "--max_train_steps", 4, "--save_steps", 2, "--validation_prompt", PROMPT,
                      "--num_validation_images", 1, "--validation_num_inference_steps", 2, "--validation_steps", 4,
                      "--diagnostics_steps", 2, *extra)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, instance_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("sdxl")
    run_train(*sdxl_args(tiny_sdxl, instance_dir, work / "out", work / "class"))
    return work


def assert_same(a, b, components=TRAINED, atol=1e-6):
    for component in components:
        wa, wb = load_weights(a, component), load_weights(b, component)
        assert wa.keys() == wb.keys()
        worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
        assert worst <= atol, f"{component}: largest weight difference {worst}"


def test_output_loads_generates_and_only_the_vae_is_untouched(tiny_sdxl, sdxl_run):
    import paddle
    from ppdiffusers import StableDiffusionXLPipeline

    out = sdxl_run / "out"
    for component in TRAINED + ("vae",):
        before, after = load_weights(tiny_sdxl, component), load_weights(out, component)
        assert before.keys() == after.keys()
        unchanged = all(np.array_equal(before[k], after[k]) for k in before)
        assert unchanged == (component == "vae"), component
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, height=64, width=64, num_inference_steps=2, output_type="np",
                  generator=paddle.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all() and images.std() > 0
    assert len([n for n in os.listdir(sdxl_run / "class") if n.endswith(".png")]) == 2
    assert os.path.isfile(out / "validation" / "step-000004.png")
    with open(out / "diagnostics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4] and all(float(r["class_drift"]) > 0 for r in rows[1:])


def test_resume_gives_the_uninterrupted_weights_and_generates_no_class_image_again(tiny_sdxl, instance_dir,
                                                                                  sdxl_run, tmp_path, monkeypatch):
    import train_dreambooth

    def no_sampling(*a, **k):
        raise AssertionError("class images were generated a second time")

    monkeypatch.setattr(train_dreambooth, "load_sampling_pipeline", no_sampling)
    whole, resumed = sdxl_run / "out", tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    for name in ("diagnostics_probes.npz", "diagnostics.csv"):
        shutil.copy(whole / name, resumed / name)
    run_train(*sdxl_args(tiny_sdxl, instance_dir, resumed, sdxl_run / "class", "--resume_from_checkpoint", "latest"))
    assert_same(resumed, whole)
    with open(resumed / "diagnostics.csv") as a, open(whole / "diagnostics.csv") as b:
        assert a.read() == b.read()


@pytest.fixture(scope="module")
def batch_of_two(tiny_sdxl, instance_dir, tmp_path_factory):
    """One gradient-like update of the UNet and both encoders at batch 2: what accumulation and two
    processes must reproduce."""
    out = tmp_path_factory.mktemp("sdxl-batch2")
    run_train(*train_args(tiny_sdxl, instance_dir, out, "--train_text_encoder", "--train_batch_size", 2,
                          "--max_train_steps", 1, *GRADIENT_LIKE))
    return out


def test_accumulation_equals_the_larger_batch(tiny_sdxl, instance_dir, batch_of_two, tmp_path):
    run_train(*train_args(tiny_sdxl, instance_dir, tmp_path, "--train_text_encoder", "--train_batch_size", 1,
                          "--gradient_accumulation_steps", 2, "--max_train_steps", 1, *GRADIENT_LIKE))
    assert_same(tmp_path, batch_of_two, atol=1e-5)


def test_two_processes_equal_one_process(tiny_sdxl, instance_dir, batch_of_two, tmp_path):
    """Both encoders are trained under DataParallel, the first one's last layer without a gradient
    (SDXL reads its penultimate layer)."""
    args = train_args(tiny_sdxl, instance_dir, tmp_path / "two", "--train_text_encoder", "--max_train_steps", 1,
                      *GRADIENT_LIKE)
    result = run_cli([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                      str(tmp_path / "log"), "train_dreambooth.py", *args])
    logs = "".join(open(tmp_path / "log" / f).read() for f in os.listdir(tmp_path / "log") if "workerlog" in f)
    assert result.returncode == 0, logs[-3000:]
    assert "Weights identical on all 2 ranks" in logs
    assert_same(tmp_path / "two", batch_of_two, atol=1e-5)


def test_the_first_loss_equals_an_independent_sdxl_computation(tiny_sdxl, instance_dir, tmp_path):
    """The pipeline's own encode_prompt and the six size/crop numbers by hand: a 72x64 image is not
    resized for 64x64 and is center-cropped 4 pixels from its left."""
    import paddle
    from ppdiffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline

    import train_dreambooth as tdb

    run_train(*train_args(tiny_sdxl, instance_dir, tmp_path / "out", "--center_crop", "--max_train_steps", 1))
    logged = logged_scalars(tmp_path / "out", "train/loss")[1]

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    alphas_cumprod = DDPMScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler").alphas_cumprod.numpy()
    names = sorted(os.listdir(instance_dir))
    item = np.random.default_rng([0, tdb.ORDER_STREAM, 0]).permutation(len(names))[0]
    image = Image.open(os.path.join(instance_dir, names[item])).convert("RGB")
    assert image.size == (72, 64)
    pixels = np.asarray(image.crop((4, 0, 68, 64)), np.float32).transpose(2, 0, 1) / 127.5 - 1
    rng = np.random.default_rng([0, tdb.NOISE_STREAM, 0, 0, 0])
    eps, noise = (rng.standard_normal((4, 8, 8), dtype=np.float32) for _ in range(2))
    t = int(rng.integers(0, 1000))
    with paddle.no_grad():
        posterior = vae.encode(paddle.to_tensor(pixels[None])).latent_dist
        latent = (posterior.mean.numpy()[0] + posterior.std.numpy()[0] * eps) * 0.13025
        noisy = np.sqrt(alphas_cumprod[t]) * latent + np.sqrt(1 - alphas_cumprod[t]) * noise
        states, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        time_ids = paddle.to_tensor([[64, 72, 0, 4, 64, 64]], dtype="float32")
        pred = pipe.unet(paddle.to_tensor(noisy[None].astype(np.float32)), paddle.to_tensor([t]), states,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert logged == pytest.approx(float(((pred.numpy()[0].astype(np.float64) - noise) ** 2).mean()), rel=1e-4)


def test_add_time_ids_carry_the_crop_really_made(tiny_sdxl, tmp_path, monkeypatch):
    """Random crops and flips of a wide and a tall image: each sample's time ids name the size before
    resizing, the target size, and a crop corner at which the (mirrored, if flipped) resized image
    gives exactly the pixels that were trained on."""
    from ppdiffusers import UNet2DConditionModel

    import train_dreambooth

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide.png": (96, 80), "tall.png": (80, 96)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / name)
    samples, time_ids = [], []
    real_pixels, real_forward = train_dreambooth.TrainImage.pixels, UNet2DConditionModel.forward

    def pixels(self, rng, args):
        out, flip = real_pixels(self, rng, args)
        samples.append((self, out, flip))
        return out, flip

    def forward(self, *a, added_cond_kwargs=None, **k):
        time_ids.extend(added_cond_kwargs["time_ids"].numpy().tolist())
        return real_forward(self, *a, added_cond_kwargs=added_cond_kwargs, **k)

    monkeypatch.setattr(train_dreambooth.TrainImage, "pixels", pixels)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    run_train(*train_args(tiny_sdxl, folder, tmp_path / "out", "--random_flip", "--train_batch_size", 2,
                          "--max_train_steps", 4, "--diagnostics_steps", 0))
    assert len(samples) == len(time_ids) == 8
    corners, flips = set(), set()
    for (item, trained_pixels, flip), ids in zip(samples, time_ids):
        original_h, original_w, top, left, h, w = map(int, ids)
        assert [original_h, original_w, h, w] == [96 if item.image.height > item.image.width else 80,
                                                  80 if item.image.height > item.image.width else 96, 64, 64]
        view = item.image.transpose(Image.FLIP_LEFT_RIGHT) if flip else item.image
        crop = np.asarray(view.crop((left, top, left + 64, top + 64)), np.float32).transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_array_equal(crop, trained_pixels)
        corners.add((top, left))
        flips.add(flip)
    assert len(corners) > 2 and flips == {False, True}, "the draws must vary for the test to mean anything"


# --- LoRA


LORA = ("--use_lora", "--train_text_encoder", "--lora_rank", RANK, "--lora_alpha", 4)


@pytest.fixture(scope="module")
def lora_run(tiny_sdxl, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-lora")
    run_train(*train_args(tiny_sdxl, instance_dir, out, *LORA, "--train_batch_size", 2, "--max_train_steps", 1,
                          *GRADIENT_LIKE))
    return out


def lora_files(out):
    from safetensors.numpy import load_file

    import train_dreambooth

    return (load_file(os.path.join(out, "paddle_lora_weights.safetensors")),
            load_file(os.path.join(out, train_dreambooth.TEXT_ENCODER_LORA)))


def outputs(pipe):
    """Both encoders' conditioning and the UNet's prediction on it, for one prompt."""
    import paddle

    with paddle.no_grad():
        states, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        x = paddle.to_tensor(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
        time_ids = paddle.to_tensor([[64, 64, 0, 0, 64, 64]], dtype="float32")
        pred = pipe.unet(x, paddle.to_tensor([500]), states,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return states.numpy(), pooled.numpy(), pred.numpy()


def test_lora_round_trip_through_load_lora_weights_and_load_lora(tiny_sdxl, lora_run):
    """ppdiffusers' own StableDiffusionXLPipeline.load_lora_weights reads the UNet LoRA; load_lora adds
    both encoders'. The loaded encoders equal the base ones with W += down @ up written into them."""
    from ppdiffusers import StableDiffusionXLPipeline

    import train_dreambooth

    unet_file, text_file = lora_files(lora_run)
    assert {k.split(".")[0] for k in text_file} == {"text_encoder", "text_encoder_2"}
    base = outputs(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl))
    unet_only = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    unet_only.load_lora_weights(str(lora_run))
    unet_only = outputs(unet_only)
    assert np.array_equal(unet_only[0], base[0]) and np.abs(unet_only[2] - base[2]).max() > 1e-4
    loaded = outputs(train_dreambooth.load_lora(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), str(lora_run)))
    assert np.abs(loaded[0] - base[0]).max() > 1e-4 and np.abs(loaded[1] - base[1]).max() > 1e-4
    merged = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)  # Paddle Linear weights are [in, out]
    for key, down in text_file.items():
        if key.endswith(".lora_linear_layer.down.weight"):
            name, _, module = key.removesuffix(".lora_linear_layer.down.weight").partition(".")
            weight = getattr(merged, name).state_dict()[f"{module}.weight"]
            weight.set_value(weight.numpy() + down @ text_file[key.replace(".down.", ".up.")])
    merged = outputs(merged)
    np.testing.assert_allclose(loaded[0], merged[0], atol=1e-5)
    np.testing.assert_allclose(loaded[1], merged[1], atol=1e-5)


def test_lora_with_gradient_checkpointing_trains_the_same(tiny_sdxl, instance_dir, lora_run, tmp_path):
    run_train(*train_args(tiny_sdxl, instance_dir, tmp_path, *LORA, "--train_batch_size", 2, "--max_train_steps", 1,
                          "--gradient_checkpointing", *GRADIENT_LIKE))
    for a, b in zip(lora_files(tmp_path), lora_files(lora_run)):
        assert a.keys() == b.keys()
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5


# --- The seam's edges


def test_an_unsupported_pipeline_class_is_one_line(tmp_path):
    import train_dreambooth

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "KandinskyV22Pipeline"}')
    instance = make_images(tmp_path / "inst", n=1)
    with pytest.raises(train_dreambooth.DreamBoothError, match="is a KandinskyV22Pipeline model; this trainer "
                                                               "supports StableDiffusionPipeline, "
                                                               "StableDiffusionXLPipeline"):
        run_train(*train_args(tmp_path / "model", instance, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_separate_vae_trains_and_is_saved_with_the_result(tiny_model, tiny_sdxl, instance_dir, tmp_path):
    """--pretrained_vae_model_name_or_path (here the tiny SDXL's VAE under the tiny SD): the saved
    pipeline holds that VAE, and a VAE folder that does not load is one line."""
    import train_dreambooth

    vae = os.path.join(tiny_sdxl, "vae")
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--pretrained_vae_model_name_or_path", vae))
    saved, given = load_weights(tmp_path / "out", "vae"), load_weights(tiny_sdxl, "vae")
    assert saved.keys() == given.keys() and all(np.array_equal(saved[k], given[k]) for k in given)
    with pytest.raises(train_dreambooth.DreamBoothError, match="--pretrained_vae_model_name_or_path .*cannot load"):
        run_train(*train_args(tiny_model, instance_dir, tmp_path / "bad", "--pretrained_vae_model_name_or_path",
                              tmp_path / "nothing"))
