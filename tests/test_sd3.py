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
