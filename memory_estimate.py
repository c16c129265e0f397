"""A rough estimate of the GPU memory a DreamBooth run needs (train_dreambooth.py --print_memory_estimate).

Exact parts: weights, gradients and AdamW states are counted from the parameters of the models
actually loaded. Rough part: activations kept for the backward pass are estimated from the UNet's
config by counting the tensors each ResNet and attention block stores (elements per sample); the
CUDA context, allocator fragmentation and framework workspaces are not included. Treat the total
as a lower bound within a factor of about 1.5, not as a measurement (docs/memory.md).
"""
GIB = 2**30


def unet_activation_elements(config, height, width, tokens, checkpointing=False, efficient_attention=False):
    """Elements the UNet keeps per sample for its backward pass (a rough count, see docs/memory.md).

    ResNet block at C channels and N latent positions: ~10 C N (norms, SiLUs, convs, residual).
    Attention block: ~30 C N (norms, projections, GEGLU feed-forward) plus the self-attention scores
    and probabilities, 2 heads N^2 (none with memory-efficient attention), plus 2 heads N tokens for
    cross-attention. With gradient checkpointing each block keeps only its input, and the largest
    block's internals exist once, while it is recomputed."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    head_dim = config.get("attention_head_dim", 8)
    heads = head_dim if isinstance(head_dim, int) else head_dim[0]  # SD 1.x: "attention_head_dim" counts heads
    down = config.get("down_block_types", ())
    h, w = height, width  # of the latent grid
    blocks = []  # (elements kept without checkpointing, elements of the block's input)
    for i, c in enumerate(channels):
        n = h * w
        attention = i < len(down) and "CrossAttn" in down[i]
        # down: `layers` blocks; up (mirrored, same resolution): layers + 1 blocks with concatenated skips
        for count, in_scale in ((layers, 1.0), (layers + 1, 1.5)):
            for _ in range(count):
                blocks.append((10 * c * n * in_scale, c * n * in_scale))
                if attention:
                    scores = 0 if efficient_attention else 2 * heads * n * n
                    blocks.append((30 * c * n + scores + 2 * heads * n * tokens, c * n))
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
    n, c = h * w, channels[-1]  # the mid block: 2 ResNets around one attention block
    blocks += [(10 * c * n, c * n)] * 2 + [(30 * c * n + 2 * heads * n * (n + tokens), c * n)]
    if not checkpointing:
        return sum(kept for kept, _ in blocks)
    return sum(inp for _, inp in blocks) + max(kept for kept, _ in blocks)


def efficient_attention_in_use(unet):
    """Whether the UNet's attention runs a fused kernel. ppdiffusers picks its memory-efficient kernel by
    default wherever the build has one (USE_PPXFORMERS=0 in the environment turns that off), so this
    is read from the layers themselves, not from --enable_xformers_memory_efficient_attention."""
    from ppdiffusers.models.attention_processor import Attention, AttnProcessor

    return any(isinstance(layer, Attention) and type(layer.processor) is not AttnProcessor
               for layer in unet.sublayers())


def transformer_activation_elements(config, height, width, tokens, checkpointing=False, efficient_attention=False):
    """Elements an SD3 (MMDiT) transformer keeps per sample for its backward pass (a rough count, see
    docs/memory.md). Each joint block runs the image's patches and the prompt's tokens, S in all, at
    width D: ~22 D S kept (two adaptive norms, q/k/v, attention output and projection, the 4x GELU
    feed-forward, gates and residuals), plus the joint attention's scores and probabilities,
    2 heads S^2 (none with memory-efficient attention). With gradient checkpointing each block keeps
    only its two input streams, and one block's internals exist while it is recomputed."""
    patch = config["patch_size"]
    s = (height // patch) * (width // patch) + tokens
    d = config["num_attention_heads"] * config["attention_head_dim"]
    kept = 22 * d * s + (0 if efficient_attention else 2 * config["num_attention_heads"] * s * s)
    if not checkpointing:
        return config["num_layers"] * kept
    return config["num_layers"] * d * s + kept


def estimate(unet, text_encoders, vae, trained_params, text_trained_params, args, latent_hw, tokens):
    """Rows (label, bytes) and a closing note; `trained_params` counts the UNet's trained parameters
    (all of them, or the LoRA adapters), `text_trained_params` the text encoders' (0 when frozen)."""
    count = lambda model: sum(int(p.numel()) for p in model.parameters())  # noqa: E731
    n_unet, n_text, n_vae = count(unet), sum(map(count, text_encoders)), count(vae)
    half = args.mixed_precision in ("fp16", "bf16")
    trained = trained_params + text_trained_params
    frozen = n_vae + (n_text - text_trained_params)  # cast to half under mixed precision on a GPU
    unet_base = n_unet - trained_params  # LoRA's frozen UNet stays fp32 in this trainer
    act_bytes = 2 if half else 4
    config = dict(unet.config)
    if "patch_size" in config:  # a transformer (SD3); its attention is memory-efficient where a kernel exists
        import paddle.nn.functional as F

        import family_sd3

        kernel = getattr(F, "scaled_dot_product_attention_", None) not in (None, family_sd3.plain_attention)
        kind = "transformer"
        acts = transformer_activation_elements(config, latent_hw[0], latent_hw[1], tokens,
                                               args.gradient_checkpointing, kernel)
    else:
        kind = "UNet"
        acts = unet_activation_elements(config, latent_hw[0], latent_hw[1], tokens, args.gradient_checkpointing,
                                        efficient_attention_in_use(unet))
    batch = args.train_batch_size * (2 if args.with_prior_preservation else 1)
    what = (f"{kind} LoRA adapters" if args.use_lora else kind) + (" + text encoder" if text_trained_params else "")
    rows = [
        (f"trained weights, fp32 ({what}: {trained / 1e6:.4g} M parameters)", 4 * trained),
        (f"frozen weights, {'half' if half else 'fp32'} ({frozen / 1e6:.4g} M: VAE"
         f"{'' if text_trained_params else ' + text encoder'})", (2 if half else 4) * frozen),
        (f"frozen {kind} base under LoRA, fp32 ({unet_base / 1e6:.4g} M)", 4 * unet_base),
        ("gradients, fp32", 4 * trained),
        ("AdamW states, 2 x fp32", 8 * trained),
        (f"{kind} activations, batch {batch}{', checkpointed' if args.gradient_checkpointing else ''} (rough)",
         act_bytes * batch * acts),
    ]
    note = ("estimate: weights, gradients and optimizer states are exact counts; activations are a rough count "
            f"of the {kind}'s (text-encoder and VAE activations, CUDA context and allocator overhead are excluded)")
    return [(label, size) for label, size in rows if size or "LoRA" not in label], note


def human(size):
    return f"{size / GIB:8.2f} GiB" if size >= GIB else f"{size / 2**20:8.1f} MiB"


def log_estimate(log, rows, note):
    log("GPU memory estimate (%s):", note)
    for label, size in rows + [("total (estimate)", sum(size for _, size in rows))]:
        log("  %-80s %s", label, human(size))
