"""Stable Diffusion 3 pieces the trainer needs on top of ppdiffusers 0.29.

Flow matching (the noise/target step, timestep density and loss weighting as diffusers names them),
SD3's prompt encoding (two CLIPs and T5), and three repairs made from outside ppdiffusers, never by
editing it: an attention function for builds without ppdiffusers' kernels (the CPU), gradient
checkpointing for SD3Transformer2DModel, and transformer LoRA that needs no environment variable.
"""
import logging
import math

import numpy as np

from common import parameter_count

logger = logging.getLogger("dreambooth")

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


# ----------------------------------------------------------------------------------------------
# Gradient checkpointing


def checkpoint_transformer_blocks(transformer):
    """Recompute each transformer block's activations in the backward pass instead of keeping them.

    ppdiffusers 0.29's own branch (enable_gradient_checkpointing) assigns the block's output pair to
    hidden_states and crashes, so the flag stays off there and each block's forward is wrapped here
    instead: parameter names, and so saved weights, stay as they are. Only while training with
    gradients on; sampling runs the blocks as they are. A block none of whose inputs needs a gradient
    (the first one, under LoRA) runs as it is too: Paddle's recompute warns at every step there."""
    import paddle
    from paddle.distributed.fleet.utils import recompute

    for block in transformer.transformer_blocks:
        def forward(hidden_states, encoder_hidden_states, temb, _forward=block.forward, _block=block):
            inputs_need_grad = not all(x.stop_gradient for x in (hidden_states, encoder_hidden_states, temb))
            if not (_block.training and paddle.is_grad_enabled() and inputs_need_grad):
                return _forward(hidden_states, encoder_hidden_states, temb)
            if _block.context_pre_only:  # the last block returns no context, and recompute returns tensors only
                return None, recompute(lambda h, e, t: _forward(h, e, t)[1], hidden_states, encoder_hidden_states,
                                       temb, use_reentrant=False)
            return recompute(_forward, hidden_states, encoder_hidden_states, temb, use_reentrant=False)
        block.forward = forward
    return transformer


# ----------------------------------------------------------------------------------------------
# LoRA on the transformer, through ppdiffusers' own PEFT layers

# The attention projections of the image and the text stream, as diffusers' SD3 LoRA script targets them.
# All have the transformer's inner width as output, which load_lora_weights relies on (see lora_state_for_loading).
TRANSFORMER_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
LORA_ADAPTER = "default"


def install_parameter_dict_compat():
    """ppdiffusers' PEFT layers call keys() on a paddle.nn.ParameterDict, which Paddle 3.3 lacks
    (ppdiffusers patches in its own ParameterDict only where Paddle has none). Add the dict views
    Paddle's class is missing, reading its own parameter table; a Paddle that has them keeps its own."""
    import paddle.nn as nn

    for name in ("keys", "items", "values"):
        if not hasattr(nn.ParameterDict, name):
            setattr(nn.ParameterDict, name, lambda self, _name=name: getattr(self._parameters, _name)())


def add_transformer_lora(transformer, rank, alpha):
    """Freeze the transformer and put ppdiffusers' PEFT LoRA layers (Gaussian down, zero up) on its
    attention projections; returns the number of trainable parameters. Needs no USE_PEFT_BACKEND:
    that variable gates ppdiffusers' loaders, not its layers."""
    from ppdiffusers.peft import LoraConfig, inject_adapter_in_model

    install_parameter_dict_compat()
    for p in transformer.parameters():
        p.stop_gradient = True
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TRANSFORMER_LORA_TARGETS)
    inject_adapter_in_model(config, transformer, adapter_name=LORA_ADAPTER)
    return parameter_count(p for p in transformer.parameters() if not p.stop_gradient)


def lora_state_for_loading(transformer, rank, alpha):
    """The transformer's LoRA weights keyed as StableDiffusion3Pipeline.load_lora_weights reads them
    (save_lora_weights adds the "transformer." prefix). Its loader knows no alpha: it takes the rank
    from axis 1 of each up weight, which in Paddle's [rank, out] layout is the output width, and sets
    alpha to the most common of those widths. Every target's output is the inner width, so its scale
    is 1, and alpha / rank is folded into the up weights here."""
    from ppdiffusers.peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=LORA_ADAPTER)
    widths = {tuple(v.shape[1:]) for k, v in state.items() if ".lora_B." in k}
    if len(widths) != 1:
        raise ValueError(f"LoRA targets of different output widths {sorted(widths)}: load_lora_weights would "
                         "scale them wrongly")
    return {k: v * (alpha / rank) if ".lora_B." in k else v for k, v in state.items()}


def load_lora(pipe, folder):
    """Load a --use_lora result of an SD3 run into a StableDiffusion3Pipeline of its base model, with
    no environment variable: ppdiffusers' own load_lora_weights needs USE_PEFT_BACKEND=True set before
    ppdiffusers is imported, and the Paddle compatibility this module installs.

        from family_sd3 import load_lora
        load_lora(StableDiffusion3Pipeline.from_pretrained(base), output_dir)
    """
    install_parameter_dict_compat()
    state, _ = pipe.lora_state_dict(folder)
    pipe.load_lora_into_transformer(state, transformer=pipe.transformer)
    return pipe


# ----------------------------------------------------------------------------------------------
# Flow matching


def training_schedule(scheduler):
    """(timesteps, sigmas) of the scheduler's training schedule as float64 NumPy arrays, highest noise
    first: FlowMatchEulerDiscreteScheduler builds them at construction with its `shift`
    (sigma = shift s / (1 + (shift - 1) s) on an even grid s), before any set_timesteps."""
    timesteps = np.asarray(scheduler.timesteps.numpy(), dtype=np.float64)
    sigmas = np.asarray(scheduler.sigmas.numpy(), dtype=np.float64)[:len(timesteps)]
    return timesteps, sigmas


def draw_schedule_index(rng, scheme, num_train_timesteps, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    """Index into the training schedule for one sample, drawn from rng: the trainer passes the sample's
    own keyed stream, so batch size, accumulation, processes and resuming don't change it. The density
    of u in [0, 1] is the one diffusers names `scheme`: logit_normal (sigmoid of a normal), mode (the
    SD3 paper's mode sampling with scale mode_scale), otherwise uniform; index = floor(u x steps)."""
    if scheme == "logit_normal":
        u = 1.0 / (1.0 + math.exp(-rng.normal(logit_mean, logit_std)))
    elif scheme == "mode":
        u = rng.random()
        u = 1.0 - u - mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1.0 + u)
    else:
        u = rng.random()
    # u can reach 1 (mode at u = 0, a sigmoid that rounds up): the last index, not one past it.
    return min(max(int(u * num_train_timesteps), 0), num_train_timesteps - 1)


def loss_weighting(scheme, sigmas):
    """Per-sample loss weight for flow matching, as diffusers weights SD3: sigma_sqrt 1 / sigma^2,
    cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)), every other scheme 1 (its density does the weighting)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if scheme == "sigma_sqrt":
        return sigmas ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas ** 2))
    return np.ones_like(sigmas)


def flow_matching_inputs(latents, noise, sigmas):
    """(noisy, target) of rectified flow: the straight line from the data (sigma 0) to the noise
    (sigma 1), and its velocity. sigmas: one per sample, a Paddle tensor [batch]."""
    s = sigmas.reshape([-1, 1, 1, 1]).astype(latents.dtype)
    return (1.0 - s) * latents + s * noise, noise - latents


# ----------------------------------------------------------------------------------------------
# Prompt encoding


def tokenize(tokenizer, prompts, max_length):
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     return_attention_mask=False)["input_ids"]


def encode_clip(text_encoder, ids):
    """(penultimate hidden states, pooled projection) of a CLIPTextModelWithProjection, as SD3 uses them."""
    import paddle

    out = text_encoder(paddle.to_tensor(ids), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def encode_t5(text_encoder_3, ids, batch, max_sequence_length, joint_attention_dim, dtype="float32"):
    """T5's last hidden states; without T5 (not shipped, or --drop_t5) zeros of the same shape, as the
    pipeline conditions a model loaded without it."""
    import paddle

    if text_encoder_3 is None:
        return paddle.zeros([batch, max_sequence_length, joint_attention_dim], dtype=dtype)
    return text_encoder_3(paddle.to_tensor(ids))[0]


def join_embeddings(clip_states, pooled, t5_states):
    """SD3's conditioning from its encoders' outputs, laid out as StableDiffusion3Pipeline.encode_prompt
    lays it out: the two CLIPs' hidden states side by side, zero-padded to T5's width, then T5's tokens
    after CLIP's; the pooled projections side by side."""
    import paddle
    import paddle.nn.functional as F

    clip = paddle.concat(clip_states, axis=-1)
    clip = F.pad(clip, [0, t5_states.shape[-1] - clip.shape[-1]], data_format="NCL")
    return paddle.concat([clip, t5_states.astype(clip.dtype)], axis=-2), paddle.concat(pooled, axis=-1)
