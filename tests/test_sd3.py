"""Stable Diffusion 3: flow matching, prompt encoding, and the repairs family_sd3 makes to ppdiffusers 0.29,
on a tiny SD3 built by tiny_sd.py."""
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


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny random SD3 pipeline folder, built once per test session."""
    from tiny_sd import save_tiny_sd3_pipeline

    import family_sd3

    family_sd3.install_attention_fallback()
    out = str(tmp_path_factory.mktemp("tiny_sd3"))
    save_tiny_sd3_pipeline(out)
    return out


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
def test_gradient_checkpointing_gives_the_same_gradients(tiny_sd3, lora):
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


def test_lora_round_trip_through_load_lora_weights(tiny_sd3, tmp_path, monkeypatch):
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
    """encode_prompts gives StableDiffusion3Pipeline.encode_prompt's embeddings, with T5, with T5 dropped,
    and for a model saved without T5 (zeros in T5's place)."""
    from ppdiffusers import StableDiffusion3Pipeline

    import family_sd3

    if variant == "saved_without_t5":
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_without_t5, text_encoder_3=None, tokenizer_3=None)
    elif variant == "drop_t5":
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    # Prompts that fit: ppdiffusers 0.29's encode_prompt crashes on longer ones (its truncation warning
    # compares the truncated and the untruncated ids).
    prompts = ["a photo of sks dog", "a sks robot toy in the snow"]
    want, _, want_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    got, got_pooled = family_sd3.encode_prompts(
        prompts, [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
        [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3], max_sequence_length=16, joint_attention_dim=96)
    assert got.shape == want.shape == [2, 32, 96] and got_pooled.shape == want_pooled.shape == [2, 80]
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(got_pooled.numpy(), want_pooled.numpy())
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
