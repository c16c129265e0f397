"""SDXL DreamBooth on a tiny SDXL built by tiny_sd.py --family sdxl: the guarantees of the SD 1.x path."""
import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (CLASS_PROMPT, GRADIENT_LIKE, PROMPT, assert_same_weights, load_weights, logged_scalars,
                      make_images, run_cli, run_train, train_args)

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
    run_train(*sdxl_args(tiny_sdxl, instance_dir, work / "out", work / "class", "--export_single_file"))
    return work


def assert_same(a, b, components=TRAINED, atol=1e-6):
    assert_same_weights(a, b, atol, components)


def test_output_loads_generates_and_only_the_vae_is_untouched(tiny_sdxl, sdxl_run):
    import paddle
    from ppdiffusers import StableDiffusionXLPipeline

    out = sdxl_run / "out"
    with open(os.path.join(tiny_sdxl, "text_encoder", "config.json")) as f:
        last = json.load(f)["num_hidden_layers"] - 1
    for component in TRAINED + ("vae",):
        before, after = load_weights(tiny_sdxl, component), load_weights(out, component)
        assert before.keys() == after.keys()
        changed = {k for k in before if not np.array_equal(before[k], after[k])}
        if component == "vae":
            assert not changed
        elif component == "unet":
            assert changed
        else:
            # SDXL reads the first encoder's penultimate hidden states: its last layer and final norm get no
            # gradient and stay as they were; every other weight of both encoders is trained.
            unread = {k for k in before if component == "text_encoder" and k.startswith(
                (f"text_model.encoder.layers.{last}.", "text_model.final_layer_norm."))}
            assert changed == set(before) - unread, (component, sorted(set(before) - unread - changed)[:5],
                                                     sorted(changed & unread)[:5])
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
    """Two gradient-like updates of the UNet and both encoders at batch 2 (the second batch's samples are
    keyed by their place in the epoch): what accumulation and two processes must reproduce."""
    out = tmp_path_factory.mktemp("sdxl-batch2")
    run_train(*train_args(tiny_sdxl, instance_dir, out, "--train_text_encoder", "--train_batch_size", 2,
                          "--max_train_steps", 2, *GRADIENT_LIKE))
    return out


def test_accumulation_equals_the_larger_batch(tiny_sdxl, instance_dir, batch_of_two, tmp_path):
    run_train(*train_args(tiny_sdxl, instance_dir, tmp_path, "--train_text_encoder", "--train_batch_size", 1,
                          "--gradient_accumulation_steps", 2, "--max_train_steps", 2, *GRADIENT_LIKE))
    assert_same(tmp_path, batch_of_two, atol=1e-5)


def test_two_processes_equal_one_process(tiny_sdxl, instance_dir, batch_of_two, tmp_path):
    """Both encoders are trained under DataParallel, the first one's last layer without a gradient
    (SDXL reads its penultimate layer)."""
    args = train_args(tiny_sdxl, instance_dir, tmp_path / "two", "--train_text_encoder", "--max_train_steps", 2,
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
                          "--export_single_file", *GRADIENT_LIKE))
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


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl"])
def test_only_sd3_puts_its_attention_fallback_into_paddle(request, model, instance_dir, tmp_path):
    """The plain attention is SD3's repair for builds without ppdiffusers' kernel: an SD or SDXL run leaves
    paddle.nn.functional.scaled_dot_product_attention_ as it was (absent on a CPU build, ppdiffusers' own
    kernel elsewhere), so nothing else in the process takes the fallback for a fused kernel. Order
    matters here: run after an SD3 test, this passes only because conftest takes the fallback away."""
    import paddle.nn.functional as F

    import family_sd3

    run_train(*train_args(request.getfixturevalue(model), instance_dir, tmp_path / "out", "--max_train_steps", 1,
                          "--diagnostics_steps", 0))
    assert getattr(F, "scaled_dot_product_attention_", None) is not family_sd3.plain_attention


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


# --- --export_single_file: the SGM checkpoint and the kohya LoRA, read back by ppdiffusers' own readers

def sgm_config_yaml(folder):
    """The pipeline's architecture in Stability's SGM config format (what sd_xl_base.yaml says of the real
    SDXL), derived from its config.json files, for ppdiffusers' single-file reader."""
    unet, vae = (json.loads((Path(folder) / sub / "config.json").read_text()) for sub in ("unet", "vae"))
    ch, vae_ch = unet["block_out_channels"][0], vae["block_out_channels"][0]
    # The original marks attention levels by downsampling factor (1, 2, 4, ...).
    attn = [2 ** i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")]
    return f"""
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: {vae["scaling_factor"]}
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {unet["projection_class_embeddings_input_dim"]}
        num_classes: sequential
        in_channels: {unet["in_channels"]}
        out_channels: {unet["out_channels"]}
        model_channels: {ch}
        attention_resolutions: {attn}
        num_res_blocks: {unet["layers_per_block"]}
        channel_mult: {[c // ch for c in unet["block_out_channels"]]}
        num_heads: {unet["attention_head_dim"]}
        use_linear_in_transformer: true
        transformer_depth: {list(unet["transformer_layers_per_block"])}
        context_dim: {unet["cross_attention_dim"]}
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
        embed_dim: {vae["latent_channels"]}
        ddconfig:
          double_z: true
          z_channels: {vae["latent_channels"]}
          resolution: {vae["sample_size"]}
          in_channels: {vae["in_channels"]}
          out_ch: {vae["out_channels"]}
          ch: {vae_ch}
          ch_mult: {[c // vae_ch for c in vae["block_out_channels"]]}
          num_res_blocks: {vae["layers_per_block"]}
          attn_resolutions: []
          dropout: 0.0
"""


# The hub ids whose configs and tokenizers ppdiffusers' SDXL reader builds the two text encoders from.
READER_TEXT_ENCODERS = {"openai/clip-vit-large-patch14": ("text_encoder", "tokenizer"),
                        "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": ("text_encoder_2", "tokenizer_2")}
SINGLE_FILE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def read_back_with_ppdiffusers(path, model, work, monkeypatch):
    """An SGM single file loaded by ppdiffusers' own SDXL reader (what StableDiffusionXLPipeline.from_single_file
    runs), offline: the architecture from sgm_config_yaml, and both text encoders' configs and tokenizers from
    folders named by the hub ids the reader asks for (with local_files_only it takes a folder of that name in
    the working directory). Two choices the reader makes from the cross-attention width of the real SDXL
    (2048), which the tiny one does not have, are given: model_type "SDXL" (from_single_file infers it from
    that width), and the UNet's pooled-prompt-and-sizes embedding, which it then builds as class_embedding
    ("projection") instead of add_embedding ("text_time"), from the same label_emb weights."""
    from ppdiffusers import StableDiffusionXLPipeline
    from ppdiffusers.pipelines.stable_diffusion.convert_from_ckpt import \
        download_from_original_stable_diffusion_ckpt

    work.mkdir(exist_ok=True)
    for hub_id, (encoder, tokenizer) in READER_TEXT_ENCODERS.items():
        if not (work / hub_id).is_dir():
            shutil.copytree(os.path.join(model, tokenizer), work / hub_id)
            shutil.copy(os.path.join(model, encoder, "config.json"), work / hub_id)
    (work / "sdxl.yaml").write_text(sgm_config_yaml(model))
    monkeypatch.chdir(work)
    pipe = download_from_original_stable_diffusion_ckpt(
        str(path), original_config_file=str(work / "sdxl.yaml"), model_type="SDXL",
        pipeline_class=StableDiffusionXLPipeline, from_safetensors=True, local_files_only=True, image_size=64)
    loaded = {name: {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
              for name in SINGLE_FILE_COMPONENTS}
    loaded["unet"] = {k.replace("class_embedding.", "add_embedding."): v for k, v in loaded["unet"].items()}
    return loaded


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_single_file_round_trips_through_ppdiffusers_sdxl_reader(tiny_sdxl, sdxl_run, tmp_path, monkeypatch, half):
    """The trainer's SGM file (and the float16 one export_single_file.py writes from the saved folder) loads
    back through ppdiffusers' SDXL reader into exactly the saved UNet, both text encoders and VAE
    (float16: each value rounded once)."""
    import export_single_file

    out = sdxl_run / "out"
    path = out / "out.safetensors"
    if half:
        path = export_single_file.export_pipeline(str(out), str(tmp_path / "half.safetensors"), half=True)["path"]
    loaded = read_back_with_ppdiffusers(path, tiny_sdxl, tmp_path / "reader", monkeypatch)
    for name in SINGLE_FILE_COMPONENTS:
        saved = load_weights(out, name)
        assert set(loaded[name]) == set(saved), name
        for key, value in saved.items():
            want = value.astype(np.float16).astype(np.float32) if half else value
            assert np.array_equal(loaded[name][key], want), f"{name}.{key} differs after the round trip"
    base = load_weights(tiny_sdxl, "text_encoder_2")
    assert any(not np.array_equal(base[k], v) for k, v in load_weights(out, "text_encoder_2").items()), "trained?"


def test_single_file_has_the_sgm_names_other_tools_look_up(sdxl_run):
    from safetensors.numpy import load_file

    tensors = load_file(str(sdxl_run / "out" / "out.safetensors"))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                "conditioner.embedders.1.model.")
    assert all(k.startswith(prefixes) for k in tensors), [k for k in tensors if not k.startswith(prefixes)]
    second = load_weights(sdxl_run / "out", "text_encoder_2")  # Paddle: Linear weights [in, out]
    hidden = second["text_model.final_layer_norm.weight"].shape[0]
    open_clip = "conditioner.embedders.1.model."
    # WebUI tells SDXL by this key; OpenCLIP keeps q, k, v in one in_proj and multiplies x @ text_projection.
    assert open_clip + "ln_final.weight" in tensors and "model.diffusion_model.label_emb.0.0.weight" in tensors
    assert tensors[open_clip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert np.array_equal(tensors[open_clip + "text_projection"], second["text_projection.weight"])
    ids = tensors["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == np.int64 and ids.tolist() == [list(range(ids.shape[1]))]


def test_lora_exports_as_kohya_sdxl_and_ppdiffusers_kohya_reader_gives_what_load_lora_gives(tiny_sdxl, lora_run):
    """The kohya file (UNet modules under their SGM names, lora_te1_ / lora_te2_, alpha = rank) through
    ppdiffusers' kohya reader (StableDiffusionXLPipeline.lora_state_dict, the first step of load_lora_weights):
    its UNet part loaded by load_lora_into_unet, its text-encoder parts (whose loader ppdiffusers 0.29 refuses
    on this stack) merged as W += up @ down * alpha / rank, give the outputs load_lora gives."""
    from ppdiffusers import StableDiffusionXLPipeline
    from safetensors.numpy import load_file

    import train_dreambooth

    kohya = load_file(str(lora_run / f"{lora_run.name}.safetensors"))
    unet_file, text_file = lora_files(lora_run)
    assert len(kohya) == 3 * (len(unet_file) + len(text_file)) // 2
    modules = {k.rsplit(".", 1)[0] for k in kohya if k.endswith(".alpha")}
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for m in modules if m.startswith("lora_unet_")), "kohya's SDXL files use the SGM block names"
    assert all(float(kohya[f"{m}.alpha"]) == kohya[f"{m}.lora_down.weight"].shape[0] == RANK for m in modules)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    state, alphas, from_diffusers = pipe.lora_state_dict(str(lora_run), weight_name=f"{lora_run.name}.safetensors",
                                                         unet_config=pipe.unet.config)
    assert from_diffusers and len(state) == 2 * len(modules) and len(alphas) == len(modules)
    state = {k: np.asarray(v) for k, v in state.items()}  # PyTorch orientation: up [out, r], down [r, in]
    merged = set()
    for key, down in state.items():
        m = re.fullmatch(r"(text_encoder(?:_2)?)\.(.+)\.to_(q|k|v|out)_lora\.down\.weight", key)
        if m:  # the reader's names for q_proj, k_proj, v_proj, out_proj
            weight = getattr(pipe, m[1]).state_dict()[f"{m[2]}.{m[3]}_proj.weight"]
            update = state[key.replace(".down.", ".up.")] @ down * (alphas[f"{key}.alpha"] / down.shape[0])
            weight.set_value(weight.numpy() + update.T)  # Paddle Linear weights are [in, out]
            merged.add(m[1])
    assert merged == {"text_encoder", "text_encoder_2"}
    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, from_diffusers=from_diffusers)
    loaded = outputs(train_dreambooth.load_lora(StableDiffusionXLPipeline.from_pretrained(tiny_sdxl), str(lora_run)))
    for what, got, want in zip(("prompt_embeds", "pooled_prompt_embeds", "UNet prediction"), outputs(pipe), loaded):
        assert np.abs(got - want).max() <= 1e-5, what


def test_export_cli_tells_sdxl_from_sd_by_the_folder(sdxl_run, lora_run, tmp_path):
    """export_single_file.py on an SDXL output folder writes what the trainer wrote: the layout from the
    pipeline's model_index.json, or for a LoRA folder from its keys; an SD3 folder is one line."""
    from safetensors.numpy import load_file

    import export_single_file

    unet_file, _ = lora_files(lora_run)
    assert export_single_file.lora_layout(unet_file) is export_single_file.SDXL  # a UNet-only SDXL LoRA, too
    lora = tmp_path / "lora"
    lora.mkdir()
    for name in (export_single_file.LORA_WEIGHTS, export_single_file.TEXT_ENCODER_LORA):
        shutil.copy(lora_run / name, lora)
    for folder, trainer_file in ((sdxl_run / "out", sdxl_run / "out" / "out.safetensors"),
                                 (lora, lora_run / f"{lora_run.name}.safetensors")):
        out = tmp_path / f"{folder.name}-cli.safetensors"
        assert export_single_file.main([str(folder), "--out", str(out)]) == 0
        got, want = load_file(str(out)), load_file(str(trainer_file))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), folder
    sd3 = tmp_path / "sd3"
    shutil.copytree(sdxl_run / "out", sd3, ignore=shutil.ignore_patterns("*.safetensors", "checkpoint-*"))
    (sd3 / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(ValueError, match="is a StableDiffusion3Pipeline; a single file can be written for"):
        export_single_file.export_pipeline(str(sd3), str(tmp_path / "sd3.safetensors"))
    assert not (tmp_path / "sd3.safetensors").exists()
