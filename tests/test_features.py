"""Validation, mixed precision, attention, multi-concept, captions, flips and latent caching."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import CLASS_PROMPT, load_weights, logged_scalars, make_images, run_train, train_args


def test_validation_grids_images_in_the_log_and_unchanged_weights(tiny_model, instance_dir, tmp_path):
    from visualdl import LogReader

    plain, validated = tmp_path / "plain", tmp_path / "validated"
    run_train(*train_args(tiny_model, instance_dir, plain, "--max_train_steps", 4))
    run_train(*train_args(tiny_model, instance_dir, validated, "--max_train_steps", 4,
                          "--validation_prompt", "a photo of sks dog", "--validation_prompt", "a photo of dog",
                          "--validation_steps", 2, "--num_validation_images", 2,
                          "--validation_num_inference_steps", 2))
    # updates 2 and 4; the final model (update 4) was just validated, so not again after the last save
    assert sorted(os.listdir(validated / "validation")) == ["step-000002.png", "step-000004.png"]
    grid = Image.open(validated / "validation" / "step-000002.png")
    assert grid.width >= 2 * 64 and grid.height >= 2 * 64  # two rows of two 64x64 images
    log = validated / "logs"
    reader = LogReader(file_path=str(log / os.listdir(log)[0]))
    assert {"validation/0", "validation/1"} <= set(reader.get_tags()["image"])
    assert [record.id for record in reader.get_data("image", "validation/0")] == [2, 4]
    a, b = load_weights(plain), load_weights(validated)
    assert all(np.array_equal(a[k], b[k]) for k in a), "validation changed the training"


def test_validation_images_are_comparable_across_steps(tiny_model, instance_dir, tmp_path):
    """Same seed per image index: a run with lr 0 draws identical grids at every step."""
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 2, "--learning_rate", 1e-12,
                          "--validation_prompt", "a photo of dog", "--validation_steps", 1,
                          "--num_validation_images", 1, "--validation_num_inference_steps", 2))
    first, second = (np.asarray(Image.open(out / "validation" / f"step-00000{i}.png")) for i in (1, 2))
    assert np.abs(first.astype(int) - second.astype(int)).max() <= 1


def test_memory_efficient_attention_without_support_is_a_clear_error(tiny_model, instance_dir, tmp_path):
    import train_dreambooth
    from ppdiffusers.utils import is_ppxformers_available

    argv = train_args(tiny_model, instance_dir, tmp_path / "out", "--enable_xformers_memory_efficient_attention")
    if is_ppxformers_available():
        pytest.skip("this Paddle build has memory-efficient attention")
    with pytest.raises(train_dreambooth.DreamBoothError, match="needs a GPU build"):
        run_train(*argv)


@pytest.fixture
def seen_prompts(monkeypatch):
    """Every (prompt, image size) a training step crops, recorded through TrainImage.pixels."""
    import train_dreambooth

    seen, real = [], train_dreambooth.TrainImage.pixels

    def recording(self, rng, args):
        seen.append((self.prompt, id(self)))
        return real(self, rng, args)

    monkeypatch.setattr(train_dreambooth.TrainImage, "pixels", recording)
    return seen


def test_multi_concept_generates_class_images_per_concept_and_sees_every_image(tiny_model, tmp_path,
                                                                                seen_prompts):
    concepts = [
        dict(instance_prompt="a photo of sks dog", instance_data_dir=make_images(tmp_path / "dog", n=3, seed=1),
             class_prompt="a photo of dog", class_data_dir=str(tmp_path / "dog_class"), num_class_images=2),
        dict(instance_prompt="a photo of sks cat", instance_data_dir=make_images(tmp_path / "cat", n=2, seed=2),
             class_prompt="a photo of cat", class_data_dir=str(tmp_path / "cat_class"), num_class_images=3),
    ]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    argv = train_args(tiny_model, None, tmp_path / "out", "--instance_data_dir", None, "--instance_prompt", None,
                      "--concepts_list", tmp_path / "concepts.json", "--with_prior_preservation",
                      "--class_inference_steps", 2, "--num_train_epochs", 1, "--max_train_steps", None,
                      "--no_cache_latents")
    run_train(*argv)
    assert len(os.listdir(tmp_path / "dog_class")) == 2 and len(os.listdir(tmp_path / "cat_class")) == 3
    prompts = {p for p, _ in seen_prompts}
    assert prompts == {"a photo of sks dog", "a photo of sks cat", "a photo of dog", "a photo of cat"}
    instance_images = {i for p, i in seen_prompts if "sks" in p}
    assert len(instance_images) == 5, "every concept's instance images within one epoch"


def test_captions_replace_the_instance_prompt(tiny_model, tmp_path, seen_prompts):
    folder = make_images(tmp_path / "inst", n=2)
    (tmp_path / "inst" / "img0.txt").write_text("a photo of sks dog on the beach\n")
    run_train(*train_args(tiny_model, folder, tmp_path / "out", "--use_image_captions", "--no_cache_latents",
                          "--train_batch_size", 2, "--max_train_steps", 1))
    assert sorted({p for p, _ in seen_prompts}) == ["a photo of sks dog", "a photo of sks dog on the beach"]


def test_random_flip_mirrors_the_crop(tmp_path):
    from train_dreambooth import TrainImage, parse_args

    args = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt",
                       "x", "--resolution", "64", "--random_flip", "--center_crop"])
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    item = TrainImage(image, "p", args)
    draws = [item.pixels(np.random.default_rng(seed), args) for seed in range(20)]
    flipped = [p for p, f in draws if f]
    kept = [p for p, f in draws if not f]
    assert flipped and kept
    np.testing.assert_array_equal(flipped[0], kept[0][:, :, ::-1])


def count_calls(monkeypatch, cls, method):
    calls = []
    real = getattr(cls, method)

    def counting(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(cls, method, counting)
    return calls


def test_with_caching_neither_vae_nor_text_encoder_runs_in_training_steps(tiny_model, instance_dir, tmp_path,
                                                                          monkeypatch):
    from ppdiffusers import AutoencoderKL
    from ppdiffusers.transformers import CLIPTextModel

    counts = {}
    for steps in (2, 6):
        encodes = count_calls(monkeypatch, AutoencoderKL, "encode")
        texts = count_calls(monkeypatch, CLIPTextModel, "forward")
        run_train(*train_args(tiny_model, instance_dir, tmp_path / f"s{steps}", "--max_train_steps", steps,
                              "--center_crop", "--cache_latents", "--diagnostics_steps", 0))
        counts[steps] = (len(encodes), len(texts))
        monkeypatch.undo()
    assert counts[2] == counts[6] == (4, 1), counts  # 4 images encoded once, 1 prompt embedded once


def test_cached_models_wait_off_the_device_except_when_validation_borrows_them(tiny_model, instance_dir, tmp_path,
                                                                                monkeypatch):
    """With cached latents and a frozen text encoder, both models are moved to host memory before
    the first update and come back to the device only around validation. A CPU has one device,
    so the test pretends the device is "gpu:0" and records the moves instead of making them."""
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel

    where, events = {}, []

    def move(self, device=None, dtype=None, blocking=None):
        if isinstance(self, (AutoencoderKL, CLIPTextModel)):
            where[type(self).__name__] = device
        return self

    def spy(cls, method, label):
        real = getattr(cls, method)

        def recorded(self, *a, **k):
            events.append((label, paddle.is_grad_enabled(), dict(where)))
            return real(self, *a, **k)
        monkeypatch.setattr(cls, method, recorded)

    monkeypatch.setattr(paddle.nn.Layer, "to", move)
    monkeypatch.setattr(paddle, "get_device", lambda: "gpu:0")
    spy(UNet2DConditionModel, "forward", "unet")
    spy(AutoencoderKL, "decode", "decode")
    spy(CLIPTextModel, "forward", "text")
    run_train(*train_args(tiny_model, instance_dir, tmp_path, "--max_train_steps", 2, "--center_crop",
                          "--cache_latents", "--diagnostics_steps", 0, "--validation_prompt", "a photo of dog",
                          "--validation_steps", 1, "--num_validation_images", 1, "--validation_num_inference_steps", 1))
    parked = {"AutoencoderKL": "cpu", "CLIPTextModel": "cpu"}
    training = [seen for label, grad, seen in events if label == "unet" and grad]
    assert len(training) == 2 and all(seen == parked for seen in training)
    validating = [seen for label, grad, seen in events if label in ("decode", "text") and seen]
    assert len(validating) >= 2 and all(set(seen.values()) == {"gpu:0"} for seen in validating)
    assert where == parked, "back in host memory at the end"


def test_cached_posterior_draws_match_the_vae_own_sampling(tiny_model):
    """Caching keeps the VAE's latent distribution (mean, std) and draws a fresh sample per step:
    many such draws have the mean and spread of the VAE's own latent_dist.sample()."""
    import paddle
    from ppdiffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    pixels = paddle.to_tensor(np.random.default_rng(0).uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32))
    with paddle.no_grad():
        posterior = vae.encode(pixels).latent_dist
        own = np.stack([posterior.sample().numpy()[0] for _ in range(1000)])
    mean, std = posterior.mean.numpy()[0], posterior.std.numpy()[0]
    eps = np.random.default_rng(1).standard_normal((1000, *mean.shape)).astype(np.float32)
    cached = mean + std * eps
    assert np.abs(cached.mean(0) - own.mean(0)).max() < 0.2 * std.max()
    np.testing.assert_allclose(cached.std(0), own.std(0), rtol=0.15)


def test_class_sampling_unet_draws_the_plain_unets_images_with_less_work(tiny_model, monkeypatch):
    """The sampling UNet computes each cross-attention layer's keys and values once per pipeline call
    (recomputing them for the next call's prompts) and has the attention scale folded into its query
    weights; its images equal the plain UNet's up to float rounding."""
    import paddle

    import train_dreambooth

    args = train_dreambooth.parse_args(train_args(tiny_model, "unused", "unused", "--class_inference_steps", 3))
    reuse, fold = train_dreambooth.reuse_cross_attention_keys_values, train_dreambooth.fold_attention_scale_into_queries
    monkeypatch.setattr(train_dreambooth, "reuse_cross_attention_keys_values", lambda unet: None)
    monkeypatch.setattr(train_dreambooth, "fold_attention_scale_into_queries", lambda unet: None)
    plain, fast = train_dreambooth.load_sampling_pipeline(args, None), train_dreambooth.load_sampling_pipeline(args, None)
    calls = []
    for name, layer in fast.unet.named_sublayers():
        if name.endswith("attn2"):
            computed = layer.to_k.forward
            layer.to_k.forward = lambda x, *a, _f=computed, _n=name, **k: calls.append(_n) or _f(x, *a, **k)
    reuse(fast.unet)
    fold(fast.unet)
    layers = {n for n, _ in fast.unet.named_sublayers() if n.endswith("attn2")}
    assert layers
    for prompts in (["a photo of dog"] * 2, ["a photo of cat"]):
        images = [pipe(prompts, height=64, width=64, num_inference_steps=3, output_type="np",
                       generator=paddle.Generator().manual_seed(0)).images for pipe in (plain, fast)]
        np.testing.assert_allclose(images[1], images[0], rtol=0, atol=1e-5)
    assert sorted(calls) == sorted(list(layers) * 2)  # once per layer and call, not once per step
    assert fast.unet.get_sublayer(sorted(layers)[0]).scale == 1.0


def test_attention_scale_stays_where_a_fused_kernel_applies_it(tiny_model):
    """GPU processors scale inside their kernels (flash attention ignores attn.scale): folding the
    scale into the query weights there would apply it twice."""
    from ppdiffusers import UNet2DConditionModel
    from ppdiffusers.models.attention_processor import XFormersAttnProcessor

    import train_dreambooth

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    names = sorted(n for n, _ in unet.named_sublayers() if n.endswith(("attn1", "attn2")))
    fused, plain = (unet.get_sublayer(n) for n in names[:2])
    fused.set_processor(XFormersAttnProcessor())  # set only; never run on this CPU
    before = {id(layer): (layer.scale, layer.to_q.weight.numpy().copy()) for layer in (fused, plain)}
    train_dreambooth.fold_attention_scale_into_queries(unet)
    scale, weight = before[id(fused)]
    assert fused.scale == scale and np.array_equal(fused.to_q.weight.numpy(), weight)
    scale, weight = before[id(plain)]
    assert plain.scale == 1.0 and np.allclose(plain.to_q.weight.numpy(), weight * scale)


AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nvendor_id\t: Auth"


@pytest.mark.parametrize("cpuinfo, environ, chosen", [
    (AMD_AVX2, {}, "5"),  # a later processor's block cut off mid-line does not matter
    (AMD_AVX2.replace(" avx2", ""), {}, None),  # no AVX2 code for MKL to run
    (AMD_AVX2.replace("AuthenticAMD", "GenuineIntel"), {}, None),  # MKL already picks Intel's best code
    (AMD_AVX2, {"MKL_DEBUG_CPU_TYPE": ""}, None),  # the user's choice, even empty, stands
    (AMD_AVX2, {"MKL_DEBUG_CPU_TYPE": "4"}, None),
    (None, {}, None),  # no /proc/cpuinfo: not Linux
])
def test_mkl_is_told_to_run_its_avx2_code_on_amd_processors_only(tmp_path, cpuinfo, environ, chosen):
    from train_dreambooth import choose_mkl_code_path

    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    before = dict(environ)
    assert choose_mkl_code_path(environ, str(path)) == chosen
    assert environ == (dict(before, MKL_DEBUG_CPU_TYPE=chosen) if chosen else before)
