"""Stable Diffusion 3: flow matching, prompt encoding, and the repairs family_sd3 makes to ppdiffusers 0.29,
on a tiny SD3 built by tiny_sd.py, and train_dreambooth.py training it."""
import os
import sys

import numpy as np
import pytest


def numpy_attention(q, k, v, scale, mask=None):
    """Attention by hand, float64, on [batch, tokens, heads, dim] arrays."""
    q, k, v = (x.astype(np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    if mask is not None:
        scores = scores + mask
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return (weights @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_plain_attention_equals_numpy(scale):
    import paddle

    from family_sd3 import plain_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, n, 3, 8)).astype(np.float32) for n in (5, 7, 7))
    mask = np.where(rng.random((2, 3, 5, 7)) < 0.3, -1e4, 0.0).astype(np.float32)
    for m in (None, mask):
        got = plain_attention(*map(paddle.to_tensor, (q, k, v)), attn_mask=None if m is None else paddle.to_tensor(m),
                              scale=scale).numpy()
        want = numpy_attention(q, k, v, 1 / np.sqrt(8) if scale is None else scale, m)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_attention_fallback_installed_only_when_missing(monkeypatch):
    import paddle.nn.functional as F

    import family_sd3

    monkeypatch.delattr(F, "scaled_dot_product_attention_", raising=False)
    assert family_sd3.install_attention_fallback()
    assert F.scaled_dot_product_attention_ is family_sd3.plain_attention
    kernel = object()  # a build with ppdiffusers' own kernel keeps it
    monkeypatch.setattr(F, "scaled_dot_product_attention_", kernel, raising=False)
    assert not family_sd3.install_attention_fallback()
    assert F.scaled_dot_product_attention_ is kernel


@pytest.fixture
def attention_fallback():
    """What the trainer does before running SD3 models, for the tests that run them without it (conftest's
    no_leaked_attention_fallback takes it away again after the test). Training tests go without: the
    trainer must install it itself."""
    import family_sd3

    family_sd3.install_attention_fallback()


def transformer_gradients(model_dir, checkpointing, lora=False):
    import paddle
    from ppdiffusers import SD3Transformer2DModel

    import family_sd3

    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.train()
    if lora:
        paddle.seed(0)  # the same random down weights in both runs
        family_sd3.add_transformer_lora(transformer, rank=2, alpha=2.0)
        for name, p in transformer.named_parameters():  # non-zero up weights: every LoRA weight gets a gradient
            if "lora_B" in name:
                p.set_value(paddle.full(p.shape, 0.1))
    if checkpointing:
        family_sd3.checkpoint_transformer_blocks(transformer)
    calls = []  # attention runs per block: twice with recomputation
    for block in transformer.transformer_blocks:
        block.attn.processor = counted(block.attn.processor, calls)
    rng = np.random.default_rng(0)
    inputs = dict(hidden_states=rng.standard_normal((2, 4, 8, 8)),
                  encoder_hidden_states=rng.standard_normal((2, 5, 96)),
                  pooled_projections=rng.standard_normal((2, 80)), timestep=np.array([100.0, 900.0]))
    out = transformer(**{k: paddle.to_tensor(v, dtype="float32") for k, v in inputs.items()}).sample
    (out ** 2).mean().backward()
    return {n: p.grad.numpy() for n, p in transformer.named_parameters() if not p.stop_gradient}, len(calls)


def counted(fn, calls):
    def call(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return call


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd3, lora, attention_fallback):
    plain, plain_calls = transformer_gradients(tiny_sd3, checkpointing=False, lora=lora)
    checkpointed, checkpointed_calls = transformer_gradients(tiny_sd3, checkpointing=True, lora=lora)
    # Two blocks, recomputed in the backward pass; under LoRA the first block's inputs need no gradient,
    # and it runs once.
    assert (plain_calls, checkpointed_calls) == (2, 3 if lora else 4)
    assert plain.keys() == checkpointed.keys() and plain
    # The last block's context queries feed an output it drops: no gradient there.
    assert all(np.abs(g).sum() > 0 for n, g in plain.items() if "1.attn.add_q_proj" not in n)
    for name in plain:
        np.testing.assert_allclose(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_lora_round_trip_through_load_lora_weights(tiny_sd3, tmp_path, monkeypatch, attention_fallback):
    """Transformer LoRA saved as the trainer saves it loads into a fresh pipeline, with ppdiffusers'
    load_lora_weights (USE_PEFT_BACKEND on, as the variable sets it) and with family_sd3.load_lora
    (no variable), and both give the trained transformer's output exactly."""
    import paddle
    import ppdiffusers.loaders.lora
    from ppdiffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    import family_sd3

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    assert family_sd3.add_transformer_lora(transformer, rank=2, alpha=6.0) > 0
    paddle.seed(1)
    for name, p in transformer.named_parameters():  # as if trained: the up weights start at zero
        if "lora_B" in name:
            p.set_value(paddle.randn(p.shape) * 0.1)
    StableDiffusion3Pipeline.save_lora_weights(
        str(tmp_path), transformer_lora_layers=family_sd3.lora_state_for_loading(transformer, rank=2, alpha=6.0))
    rng = np.random.default_rng(0)
    x = [paddle.to_tensor(rng.standard_normal(s), dtype="float32") for s in ((1, 4, 8, 8), (1, 5, 96), (1, 80))]
    t = paddle.to_tensor([500.0])
    transformer.eval()
    want = transformer(*x, timestep=t).sample.numpy()

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    base = pipe.transformer(*x, timestep=t).sample.numpy()
    assert np.abs(base - want).max() > 1e-3  # the LoRA changes the output
    family_sd3.load_lora(pipe, str(tmp_path))
    np.testing.assert_allclose(pipe.transformer(*x, timestep=t).sample.numpy(), want, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(ppdiffusers.loaders.lora, "USE_PEFT_BACKEND", True)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(str(tmp_path))
    np.testing.assert_allclose(pipe.transformer(*x, timestep=t).sample.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def tiny_sd3_without_t5(tmp_path_factory, tiny_sd3):
    from tiny_sd import save_tiny_sd3_pipeline

    out = str(tmp_path_factory.mktemp("tiny_sd3_without_t5"))
    save_tiny_sd3_pipeline(out, with_t5=False)
    return out


@pytest.mark.parametrize("variant", ["t5", "drop_t5", "saved_without_t5"])
def test_prompt_encoding_equals_the_pipeline(tiny_sd3, tiny_sd3_without_t5, variant):
    """The trainer's SD3 conditioning (the family's tokenize and encode, frozen encoders as loaded for
    training) is StableDiffusion3Pipeline.encode_prompt's, with T5, with --drop_t5, and for a model
    saved without T5 (zeros in T5's place)."""
    from ppdiffusers import StableDiffusion3Pipeline

    import families
    import train_dreambooth

    model = tiny_sd3_without_t5 if variant == "saved_without_t5" else tiny_sd3
    without_t5 = {} if variant == "t5" else dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, **without_t5)
    # Prompts that fit: ppdiffusers 0.29's encode_prompt crashes on longer ones (its truncation warning
    # compares the truncated and the untruncated ids).
    prompts = ["a photo of sks dog", "a sks robot toy in the snow"]
    want, _, want_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)

    args = train_dreambooth.parse_args(["--pretrained_model_name_or_path", model, "--instance_data_dir", "x",
                                        "--instance_prompt", "x"] + (["--drop_t5"] if variant == "drop_t5" else []))
    family = families.for_model(model)
    family.check_args(args)
    parts = family.load(args)
    assert ("text_encoder_3" in parts.text_encoders) == (variant == "t5")  # a dropped T5 is not even loaded
    cond = family.encode(parts.text_encoders, [family.tokenize(parts.tokenizers, p) for p in prompts])
    got, got_pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
    assert got.shape == want.shape == [2, 32, 96] and got_pooled.shape == want_pooled.shape == [2, 80]
    # T5 runs per prompt here (its outputs are cached), in a batch of two in the pipeline: equal up to
    # float rounding, which differs with the batch under some CPU kernels.
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_pooled.numpy(), want_pooled.numpy(), rtol=1e-5, atol=1e-6)
    t5_part = got.numpy()[:, 16:]
    assert (np.abs(t5_part).sum() == 0) == (variant != "t5")


def test_training_schedule_is_the_shifted_one(tiny_sd3):
    from ppdiffusers import FlowMatchEulerDiscreteScheduler

    import family_sd3

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")
    timesteps, sigmas = family_sd3.training_schedule(scheduler)
    s = np.arange(1000, 0, -1) / 1000.0  # highest noise first
    want = 3.0 * s / (1 + 2.0 * s)  # the tiny model's shift is 3, as SD3 medium's
    np.testing.assert_allclose(sigmas, want, rtol=1e-6)
    np.testing.assert_allclose(timesteps, want * 1000, rtol=1e-6)


def mode_cdf_inverse(p, scale):
    """The u with f(u) = p for the mode density's decreasing map f, by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        f = 1 - mid - scale * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid)
        lo, hi = (mid, hi) if f > p else (lo, mid)
    return lo


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_timestep_density(scheme):
    """The share of samples in the low half of the index range is the density's: uniform 1/2,
    logit-normal Phi(-mean / std), mode 1 - f^-1(1/2); and a sample's index depends only on its stream."""
    from statistics import NormalDist

    import family_sd3

    kwargs = dict(logit_mean=0.5, logit_std=1.3, mode_scale=1.29)
    draw = lambda i: family_sd3.draw_schedule_index(np.random.default_rng([7, i]), scheme, 1000, **kwargs)  # noqa: E731
    indices = np.array([draw(i) for i in range(4000)])
    assert indices.min() >= 0 and indices.max() <= 999
    low = (indices < 500).mean()
    want = {"none": 0.5, "logit_normal": NormalDist().cdf(-0.5 / 1.3), "mode": 1 - mode_cdf_inverse(0.5, 1.29)}[scheme]
    assert abs(low - want) < 0.025, (low, want)
    assert draw(3) == indices[3]
    assert len(set(indices[:50])) > 40


# ----------------------------------------------------------------------------------------------
# Training SD3 with train_dreambooth.py: the same guarantees as SD 1.x


def component_weights(folder, component):
    from conftest import load_weights

    return load_weights(str(folder), component)


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.fixture(scope="session")
def sd3_class_dir(tmp_path_factory):
    from conftest import make_images

    return make_images(tmp_path_factory.mktemp("sd3_class"), n=3, size=(64, 64), seed=5)


@pytest.fixture(scope="session")
def sd3_run(tiny_sd3, instance_dir, tmp_path_factory):
    """run(*flags) trains the tiny SD3 (the shrunk seed command plus flags) once per session and
    returns its output folder."""
    from conftest import run_train, train_args

    done = {}

    def run(*extra):
        key = tuple(str(e) for e in extra)
        if key not in done:
            out = tmp_path_factory.mktemp("sd3_run") / "out"
            run_train(*train_args(tiny_sd3, instance_dir, out, *extra))
            done[key] = out
        return done[key]
    return run


def test_full_run_loads_generates_and_changes_only_what_it_trains(tiny_sd3, instance_dir, tmp_path_factory, capsys):
    """Transformer and both CLIPs trained, with prior preservation (class images generated by the SD3
    pipeline, once), validation, diagnostics and the memory estimate: the folder loads with
    StableDiffusion3Pipeline and generates; VAE and T5 are bit-identical to the base."""
    import paddle
    from ppdiffusers import StableDiffusion3Pipeline

    from conftest import CLASS_PROMPT, run_train, train_args

    tmp = tmp_path_factory.mktemp("sd3_full")
    flags = ["--train_text_encoder", "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
             "--class_data_dir", tmp / "class", "--num_class_images", 2, "--class_inference_steps", 2,
             "--validation_prompt", "a photo of sks dog", "--num_validation_images", 1,
             "--validation_num_inference_steps", 2, "--diagnostics_steps", 2]
    run_train(*train_args(tiny_sd3, instance_dir, tmp / "out", *flags, "--print_memory_estimate"))
    log = capsys.readouterr().out
    assert "trained weights, fp32 (transformer + text encoder:" in log and "transformer activations" in log
    out = tmp / "out"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", height=64, width=64, num_inference_steps=2,
                 generator=paddle.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0
    for component in ("transformer", "text_encoder", "text_encoder_2"):
        assert largest_difference(component_weights(out, component), component_weights(tiny_sd3, component)) > 0
    for component in ("vae", "text_encoder_3"):
        assert largest_difference(component_weights(out, component), component_weights(tiny_sd3, component)) == 0
    assert os.listdir(out / "validation") and os.path.isfile(out / "diagnostics.csv")

    images = sorted(os.listdir(tmp / "class"))
    assert len(images) == 2
    stamps = {n: os.stat(tmp / "class" / n).st_mtime_ns for n in images}
    run_train(*train_args(tiny_sd3, instance_dir, tmp / "again", *flags, "--max_train_steps", 1))
    assert {n: os.stat(tmp / "class" / n).st_mtime_ns for n in os.listdir(tmp / "class")} == stamps


def first_update_loss_by_hand(model, instance_dir, class_dir, prior_weight, scheme, logit_mean=0.0, logit_std=1.0,
                              mode_scale=1.29):
    """Rebuild update 1's batch from the trainer's documented randomness (streams keyed by seed, epoch
    and sample; the noise level drawn after the noise from the same stream) and recompute its
    flow-matching loss with NumPy, the base models and the pipeline's own prompt encoding."""
    import paddle
    from PIL import Image
    from ppdiffusers import StableDiffusion3Pipeline

    import train_dreambooth as tdb

    pipe = StableDiffusion3Pipeline.from_pretrained(model)
    vae, transformer = pipe.vae, pipe.transformer
    shift = pipe.scheduler.config.shift

    def image_array(path):  # 64x64 center crop in [-1, 1]
        im = Image.open(path).convert("RGB")
        scale = max(64 / im.height, 64 / im.width)
        im = im.resize((max(64, round(im.width * scale)), max(64, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - 64) // 2, (im.height - 64) // 2
        return np.asarray(im.crop((left, top, left + 64, top + 64)), np.float32).transpose(2, 0, 1) / 127.5 - 1

    inst, cls = sorted(os.listdir(instance_dir)), sorted(os.listdir(class_dir))
    item = np.random.default_rng([0, tdb.ORDER_STREAM, 0]).permutation(max(len(inst), len(cls)))[0]
    samples = [(os.path.join(instance_dir, inst[item % len(inst)]), "a photo of sks dog", 0),
               (os.path.join(class_dir, cls[item % len(cls)]), "a photo of dog", 1)]
    losses = []
    with paddle.no_grad():
        for path, prompt, kind in samples:
            rng = np.random.default_rng([0, tdb.NOISE_STREAM, 0, 0, kind])
            eps = rng.standard_normal((4, 8, 8), dtype=np.float32)
            noise = rng.standard_normal((4, 8, 8), dtype=np.float32).astype(np.float64)
            if scheme == "logit_normal":
                u = 1 / (1 + np.exp(-rng.normal(logit_mean, logit_std)))
            elif scheme == "mode":
                u = rng.random()
                u = 1 - u - mode_scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)
            else:
                u = rng.random()
            s = (1000 - int(u * 1000)) / 1000  # the schedule runs from sigma 1 down
            sigma = shift * s / (1 + (shift - 1) * s)
            posterior = vae.encode(paddle.to_tensor(image_array(path)[None])).latent_dist
            sample = posterior.mean.numpy()[0] + posterior.std.numpy()[0] * eps
            latent = (sample.astype(np.float64) - vae.config.shift_factor) * vae.config.scaling_factor
            noisy = (1 - sigma) * latent + sigma * noise
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)
            pred = transformer(paddle.to_tensor(noisy[None], dtype="float32"), embeds, pooled,
                               timestep=paddle.to_tensor([sigma * 1000], dtype="float32")).sample
            mse = ((pred.numpy()[0].astype(np.float64) - (noise - latent)) ** 2).mean()
            weight = {"cosmap": 2 / (np.pi * (1 - 2 * sigma + 2 * sigma ** 2)), "sigma_sqrt": sigma ** -2.0}
            losses.append(weight.get(scheme, 1.0) * mse)
    return losses[0] + prior_weight * losses[1]


@pytest.mark.parametrize("scheme, density", [
    ("none", {}), ("logit_normal", {}), ("logit_normal", dict(logit_mean=0.4, logit_std=1.3)), ("mode", {}),
    ("mode", dict(mode_scale=0.8)), ("cosmap", {}), ("sigma_sqrt", {})])
def test_logged_loss_of_first_update_matches_an_independent_flow_matching_computation(
        tiny_sd3, instance_dir, sd3_class_dir, tmp_path, scheme, density):
    """Each --weighting_scheme, with its density's defaults and with --logit_mean/--logit_std/--mode_scale given."""
    from conftest import CLASS_PROMPT, logged_scalars, run_train, train_args

    out = tmp_path / "out"
    run_train(*train_args(tiny_sd3, instance_dir, out, "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
                          "--class_data_dir", sd3_class_dir, "--num_class_images", 3, "--prior_loss_weight", 0.7,
                          "--max_train_steps", 1, "--center_crop", "--weighting_scheme", scheme,
                          "--diagnostics_steps", 0, *[x for k, v in density.items() for x in (f"--{k}", v)]))
    logged = logged_scalars(out, "train/loss")[1]
    assert logged == pytest.approx(first_update_loss_by_hand(tiny_sd3, instance_dir, sd3_class_dir, 0.7, scheme,
                                                             **density), rel=1e-4)


def test_accumulation_equals_the_larger_batch_and_checkpointing_changes_nothing(sd3_run):
    from conftest import GRADIENT_LIKE

    common = ["--max_train_steps", 1, *GRADIENT_LIKE, "--diagnostics_steps", 0]
    big = component_weights(sd3_run("--train_batch_size", 2, *common), "transformer")
    accumulated = component_weights(sd3_run("--gradient_accumulation_steps", 2, *common), "transformer")
    checkpointed = component_weights(sd3_run("--gradient_accumulation_steps", 2, "--gradient_checkpointing", *common),
                                     "transformer")
    one = component_weights(sd3_run(*common), "transformer")
    assert largest_difference(big, accumulated) <= 1e-5
    assert largest_difference(accumulated, checkpointed) <= 1e-6
    assert largest_difference(big, one) > 1e-4  # the comparison can fail: one micro-batch is another update


def test_two_processes_equal_one_process(tiny_sd3, instance_dir, sd3_run, tmp_path):
    from conftest import GRADIENT_LIKE, run_cli, train_args

    common = ["--max_train_steps", 2, *GRADIENT_LIKE, "--diagnostics_steps", 0]
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), "train_dreambooth.py", *train_args(tiny_sd3, instance_dir, tmp_path / "two", *common)]
    result = run_cli(cmd)
    logs = "".join(open(tmp_path / "log" / f).read() for f in os.listdir(tmp_path / "log") if "workerlog" in f)
    assert result.returncode == 0, logs[-3000:]
    assert "Weights identical on all 2 ranks" in logs
    one = sd3_run("--train_batch_size", 2, *common)
    assert largest_difference(component_weights(tmp_path / "two", "transformer"),
                              component_weights(one, "transformer")) <= 1e-5


def lora_reference(model_dir, state_file, rank, alpha):
    """The base transformer and CLIPs with the trained LoRA values of a checkpoint put back into the
    trainer's own layers: what the run had in memory."""
    import paddle
    from ppdiffusers import SD3Transformer2DModel
    from ppdiffusers.transformers import CLIPTextModelWithProjection

    import family_sd3
    from train_dreambooth import add_text_encoder_lora

    saved = paddle.load(str(state_file))
    models = {"transformer": SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")}
    family_sd3.add_transformer_lora(models["transformer"], rank, alpha)
    for name in ("text_encoder", "text_encoder_2"):
        models[name] = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder=name)
        add_text_encoder_lora(models[name], rank, alpha)
    for label, model in models.items():
        for name, p in model.named_parameters():
            if not p.stop_gradient:
                p.set_value(saved[f"{label}.{name}"])
        model.eval()
    return models


def transformer_probe(transformer):
    import paddle

    rng = np.random.default_rng(3)
    x = [paddle.to_tensor(rng.standard_normal(s), dtype="float32") for s in ((1, 4, 8, 8), (1, 32, 96), (1, 80))]
    return transformer(*x, timestep=paddle.to_tensor([300.0])).sample.numpy()


def test_lora_result_loads_as_the_run_trained_it(tiny_sd3, sd3_run, tmp_path, attention_fallback):
    """--use_lora --train_text_encoder: transformer LoRA in the file load_lora_weights reads, CLIP LoRA in
    its own file. train_dreambooth.load_lora (no environment variable) and ppdiffusers' load_lora_weights
    (USE_PEFT_BACKEND=True, as docs/sd3.md tells users) both give the transformer and CLIPs the run had."""
    import paddle
    from ppdiffusers import StableDiffusion3Pipeline
    from safetensors.numpy import load_file

    from conftest import run_cli
    from train_dreambooth import load_lora

    out = sd3_run("--use_lora", "--lora_rank", 2, "--lora_alpha", 4, "--train_text_encoder", "--save_steps", 2,
                  "--learning_rate", 1e-2, "--diagnostics_steps", 0)
    assert not os.path.exists(out / "transformer")
    text_keys = load_file(str(out / "text_encoder_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in text_keys} == {"text_encoder", "text_encoder_2"}
    assert all(k.startswith("transformer.") for k in load_file(str(out / "paddle_lora_weights.safetensors")))
    reference = lora_reference(tiny_sd3, out / "checkpoint-2" / "lora_training_state.pdparams", 2, 4.0)
    want = transformer_probe(reference["transformer"])

    pipe = load_lora(StableDiffusion3Pipeline.from_pretrained(tiny_sd3), str(out))
    base = transformer_probe(StableDiffusion3Pipeline.from_pretrained(tiny_sd3).transformer)
    assert np.abs(base - want).max() > 1e-4  # the run changed something
    np.testing.assert_allclose(transformer_probe(pipe.transformer), want, rtol=1e-5, atol=1e-6)
    ids = paddle.to_tensor([pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=16)["input_ids"]])
    for name in ("text_encoder", "text_encoder_2"):
        np.testing.assert_allclose(getattr(pipe, name)(ids)[0].numpy(), reference[name](ids)[0].numpy(),
                                   rtol=1e-5, atol=1e-6)

    script = ("import sys, numpy as np, family_sd3; family_sd3.install_attention_fallback(); "
              "family_sd3.install_parameter_dict_compat(); "
              "from ppdiffusers import StableDiffusion3Pipeline; "
              "pipe = StableDiffusion3Pipeline.from_pretrained(sys.argv[1]); pipe.load_lora_weights(sys.argv[2]); "
              "sys.path.insert(0, 'tests'); from test_sd3 import transformer_probe; "
              "np.save(sys.argv[3], transformer_probe(pipe.transformer))")
    result = run_cli([sys.executable, "-c", script, tiny_sd3, str(out), str(tmp_path / "probe.npy")],
                     env={"USE_PEFT_BACKEND": "True"})
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "probe.npy"), want, rtol=1e-5, atol=1e-6)


def test_drop_t5_trains_as_the_model_saved_without_t5(tiny_sd3, tiny_sd3_without_t5, instance_dir, tmp_path):
    """--drop_t5 conditions on zeros in T5's place, exactly as a model saved without T5 (the tiny
    builder makes every other weight the same), class images included, and saves the result without T5."""
    from ppdiffusers import StableDiffusion3Pipeline

    from conftest import CLASS_PROMPT, run_train, train_args

    common = ["--diagnostics_steps", 0, "--max_train_steps", 2]
    prior = ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--num_class_images", 1,
             "--class_inference_steps", 2]
    run_train(*train_args(tiny_sd3, instance_dir, tmp_path / "dropped", "--drop_t5", *common, *prior,
                          "--class_data_dir", tmp_path / "class_dropped"))
    run_train(*train_args(tiny_sd3_without_t5, instance_dir, tmp_path / "without", *common, *prior,
                          "--class_data_dir", tmp_path / "class_without"))
    dropped = tmp_path / "dropped"
    image, = os.listdir(tmp_path / "class_dropped")
    with open(tmp_path / "class_dropped" / image, "rb") as a, open(tmp_path / "class_without" / image, "rb") as b:
        assert a.read() == b.read()
    a, b = component_weights(dropped, "transformer"), component_weights(tmp_path / "without", "transformer")
    assert largest_difference(a, b) == 0
    assert not os.path.exists(dropped / "text_encoder_3")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(dropped), text_encoder_3=None, tokenizer_3=None)
    assert pipe("a photo of sks dog", height=64, width=64, num_inference_steps=1).images[0].size == (64, 64)


@pytest.mark.parametrize("flags,message", [
    (["--export_single_file"], "--export_single_file is not supported for SD3"),
    (["--snr_gamma", 5], "--snr_gamma weighs noise-prediction losses"),
    (["--class_sampler", "ddim"], "--class_sampler ddim: SD3 samples class images with its own"),
    (["--tokenizer_name", "x"], "--tokenizer_name is not supported for SD3"),
])
def test_what_sd3_does_not_support_is_a_one_line_error(tiny_sd3, instance_dir, tmp_path, flags, message):
    from conftest import run_train, train_args
    from common import DreamBoothError

    with pytest.raises(DreamBoothError, match=message) as error:
        run_train(*train_args(tiny_sd3, instance_dir, tmp_path / "out", *flags))
    assert "\n" not in str(error.value) and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flags", [["--weighting_scheme", "logit_normal"], ["--drop_t5"], ["--mode_scale", 1.0]])
def test_sd3_flags_on_another_family_are_a_one_line_error(tiny_model, instance_dir, tmp_path, flags):
    from conftest import run_train, train_args
    from common import DreamBoothError

    with pytest.raises(DreamBoothError, match=f"{flags[0]} applies to Stable Diffusion 3 only"):
        run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", *flags))
