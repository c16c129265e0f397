"""Stable Diffusion 3 pieces the trainer needs on top of ppdiffusers 0.29.

Flow matching (the noise/target step, timestep density and loss weighting as diffusers names them),
SD3's prompt encoding (two CLIPs and T5), and three repairs made from outside ppdiffusers, never by
editing it: an attention function for builds without ppdiffusers' kernels (the CPU), gradient
checkpointing for SD3Transformer2DModel, and transformer LoRA that needs no environment variable.
"""
import logging
import math

import numpy as np

logger = logging.getLogger("dreambooth")

# Independent random stream of the per-sample flow-matching timestep (see draw_timestep_index).
TIMESTEP_STREAM = 4
WEIGHTING_SCHEMES = ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"]


# ----------------------------------------------------------------------------------------------
# Attention on builds without ppdiffusers' kernels


def plain_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, training=True,
                    attention_op=None):
    """softmax(q k^T * scale + mask) v in ppdiffusers' layout: [batch, tokens, heads, head_dim] in and out.

    The signature is that of ppdiffusers' F.scaled_dot_product_attention_ (attention_op is accepted and
    ignored: there is only one way here)."""
    import paddle
    import paddle.nn.functional as F

    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    q, k, v = (paddle.transpose(x, [0, 2, 1, 3]) for x in (query, key, value))  # [batch, heads, tokens, dim]
    scores = paddle.matmul(q * scale, k, transpose_y=True)
    if is_causal:
        n, m = scores.shape[-2:]
        future = paddle.triu(paddle.ones([n, m], dtype="bool"), diagonal=1 + m - n)
        scores = paddle.where(future, paddle.full_like(scores, float("-inf")), scores)
    elif attn_mask is not None:
        scores = scores + attn_mask.astype(scores.dtype)
    weights = F.softmax(scores.astype("float32"), axis=-1).astype(scores.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p, training=training)
    return paddle.transpose(paddle.matmul(weights, v), [0, 2, 1, 3])


def install_attention_fallback():
    """ppdiffusers 0.29's SD3 attention calls paddle.nn.functional.scaled_dot_product_attention_, which
    ppdiffusers defines only where its memory-efficient GPU kernel or an NPU exists. Where it is
    missing (a CPU build), provide plain_attention under that name. Returns True if installed.
    Must run after `import ppdiffusers` (which defines the kernel version where it can)."""
    import paddle.nn.functional as F

    import ppdiffusers  # noqa: F401  (defines the kernel version where there is one)

    if hasattr(F, "scaled_dot_product_attention_"):
        return False
    F.scaled_dot_product_attention_ = plain_attention
    logger.info("No fused attention kernel in this Paddle build: SD3 uses the plain attention of family_sd3")
    return True
