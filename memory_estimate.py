"""A rough estimate of the GPU memory a DreamBooth run needs (train_dreambooth.py --print_memory_estimate,
and the tables tools/memory_table.py writes into docs/memory.md).

Exact parts: weights, gradients and AdamW states are counted from the parameters of the models
actually loaded, in the precision the trainer keeps them in, and where they are while training (frozen
parts whose outputs are cached are parked in host memory, see train_dreambooth.park). Rough part:
activations kept for the backward pass are estimated from the denoiser's config by counting the tensors
each block stores (elements per sample); the CUDA context, allocator fragmentation and framework
workspaces are not included. Treat the total as a lower bound within a factor of about 1.5, not as a
measurement (docs/memory.md).
"""
from typing import NamedTuple

from common import parameter_count

GIB = 2**30


class Part(NamedTuple):
    """One model of the run as the trainer holds it once training starts."""
    name: str  # "UNet", "text_encoder_2", "VAE", ...
    params: int  # all its parameters (LoRA adapters included)
    trained: int  # trained parameters: all, the LoRA adapters, or 0 when frozen
    frozen_bytes: int  # bytes per frozen parameter (4: fp32, 2: cast to half under mixed precision)
    parked: bool  # in host memory while training (train_dreambooth.park): outputs cached, or unused


def per_level(value, levels):
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def attention_elements(c, n, heads, tokens, depth, efficient_attention):
    """(kept without checkpointing, kept with it, largest recomputed internals) of a Transformer2DModel
    of `depth` BasicTransformerBlocks at C channels and N positions. Around the blocks: group norm,
    proj_in, proj_out and the residual, ~4 C N, never recomputed. Each block: ~26 C N (three norms,
    q/k/v, attention outputs and projections, the GEGLU feed-forward at 4x width, residuals), plus the
    self-attention scores and probabilities, 2 heads N^2 (none with memory-efficient attention), plus
    2 heads N tokens for cross-attention. ppdiffusers' checkpointing recomputes each block, so a block
    keeps only its input, C N."""
    block = 26 * c * n + (0 if efficient_attention else 2 * heads * n * n) + 2 * heads * n * tokens
    return 4 * c * n + depth * block, 4 * c * n + depth * c * n, block


def unet_activation_elements(config, height, width, tokens, checkpointing=False, efficient_attention=False):
    """Elements the UNet keeps per sample for its backward pass (a rough count, see docs/memory.md).

    Per level of block_out_channels: layers_per_block ResNets (+ attention where the down block has
    cross-attention) going down, layers_per_block + 1 coming up (with concatenated skips), then the mid
    block (2 ResNets around one attention block). ResNet block at C channels and N latent positions:
    ~10 C N (norms, SiLUs, convs, residual). Attention: see attention_elements; its depth is the
    level's transformer_layers_per_block (SDXL: 1, 2, 10), its heads the level's num_attention_heads,
    or attention_head_dim, which ppdiffusers reads as the head count when the former is unset. With
    gradient checkpointing each ResNet keeps only its input, and the largest recomputed internals
    exist once."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    layers = config["layers_per_block"]
    heads = per_level(config.get("num_attention_heads") or config.get("attention_head_dim", 8), levels)
    depths = per_level(config.get("transformer_layers_per_block", 1), levels)
    down = config.get("down_block_types", ())
    h, w = height, width  # of the latent grid
    blocks = []  # (elements kept without checkpointing, kept with it, internals while recomputing)
    for i, c in enumerate(channels):
        n = h * w
        has_attention = i < len(down) and "CrossAttn" in down[i]
        # down: `layers` blocks; up (mirrored, same resolution): layers + 1 blocks with concatenated skips
        for count, in_scale in ((layers, 1.0), (layers + 1, 1.5)):
            for _ in range(count):
                blocks.append((10 * c * n * in_scale, c * n * in_scale, 10 * c * n * in_scale))
                if has_attention:
                    blocks.append(attention_elements(c, n, heads[i], tokens, depths[i], efficient_attention))
        if i < levels - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
    n, c = h * w, channels[-1]  # the mid block: 2 ResNets around one attention block
    blocks += [(10 * c * n, c * n, 10 * c * n)] * 2
    blocks.append(attention_elements(c, n, heads[-1], tokens, depths[-1], efficient_attention))
    if not checkpointing:
        return sum(kept for kept, _, _ in blocks)
    return sum(kept for _, kept, _ in blocks) + max(internals for _, _, internals in blocks)


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


def activation_elements(config, latent_hw, tokens, checkpointing, efficient_attention):
    """The denoiser's activations per sample: a transformer (SD3, its config has a patch size) or a UNet."""
    count = transformer_activation_elements if "patch_size" in config else unet_activation_elements
    return count(config, latent_hw[0], latent_hw[1], tokens, checkpointing, efficient_attention)


class Plan(NamedTuple):
    rows: list  # (label, bytes) on the GPU while training
    training: int  # their sum
    start_up: int  # every part on the GPU at once, before parking (frozen ones arrive already cast)
    borrowed: int  # parked parts brought back for validation and diagnostics


def plan(parts, denoiser_config, batch, half, checkpointing, efficient_attention, latent_hw, tokens, lora):
    """The GPU memory of a run, from its parts (parts[0] is the denoiser). batch counts the samples of
    one forward pass (prior preservation doubles it); half: activations under fp16/bf16 autocast."""
    denoiser = parts[0]
    kind = "transformer" if "patch_size" in denoiser_config else "UNet"
    trained = sum(p.trained for p in parts)
    text_trained = sum(p.trained for p in parts[1:])
    what = (f"{kind} LoRA adapters" if lora else kind) + (" + text encoder" if text_trained else "")
    rows = [(f"trained weights, fp32 ({what}: {trained / 1e6:.4g} M parameters)", 4 * trained)]
    for part in parts:  # frozen weights that stay on the GPU while training
        frozen = part.params - part.trained
        if frozen and not part.parked:
            base = f"frozen {part.name} base under LoRA" if part.trained else f"frozen {part.name}"
            rows.append((f"{base}, {'fp32' if part.frozen_bytes == 4 else 'half'} ({frozen / 1e6:.4g} M)",
                         part.frozen_bytes * frozen))
    acts = activation_elements(denoiser_config, latent_hw, tokens, checkpointing, efficient_attention)
    rows += [
        ("gradients, fp32", 4 * trained),
        ("AdamW states, 2 x fp32", 8 * trained),
        (f"{kind} activations, batch {batch}{', checkpointed' if checkpointing else ''} (rough)",
         (2 if half else 4) * batch * acts),
    ]
    weights = [4 * p.trained + p.frozen_bytes * (p.params - p.trained) for p in parts]
    # Start-up: frozen parts are loaded on the host and reach the GPU already cast (train_dreambooth.
    # frozen_on_host), so the peak is every weight in its run dtype, while the prompts and images are
    # encoded once, before the parts whose outputs are cached are parked.
    return Plan(rows, sum(size for _, size in rows), sum(weights),
                sum(p.frozen_bytes * (p.params - p.trained) for p in parts if p.parked))


def frozen_bytes(model):
    """Bytes per parameter of the model's frozen parameters as they are now (after the trainer's casts)."""
    frozen = [p for p in model.parameters() if p.stop_gradient] or [None]
    return 2 if frozen[0] is not None and str(frozen[0].dtype).endswith("float16") else 4


def estimate(denoiser, text_encoders, vae, parked, args, latent_hw, tokens):
    """Rows (label, bytes) and a closing note for the models the trainer holds, after LoRA and the
    casts of mixed precision; `text_encoders` maps component names to models, `parked` lists the
    models that go to host memory while training."""
    import family_sd3

    def part(name, model):
        return Part(name, parameter_count(model.parameters()),
                    parameter_count(p for p in model.parameters() if not p.stop_gradient), frozen_bytes(model),
                    any(model is other for other in parked))

    config = dict(denoiser.config)
    if "patch_size" in config:  # SD3: its attention is memory-efficient where Paddle has a kernel
        import paddle.nn.functional as F

        kernel = getattr(F, "scaled_dot_product_attention_", None) not in (None, family_sd3.plain_attention)
    else:
        kernel = efficient_attention_in_use(denoiser)
    kind = "transformer" if "patch_size" in config else "UNet"
    parts = [part(kind, denoiser), *(part(name, m) for name, m in text_encoders.items()), part("VAE", vae)]
    batch = args.train_batch_size * (2 if args.with_prior_preservation else 1)
    result = plan(parts, config, batch, args.mixed_precision in ("fp16", "bf16"), args.gradient_checkpointing,
                  kernel, latent_hw, tokens, args.use_lora)
    rows = result.rows + [("total while training (estimate)", result.training),
                          ("start-up: every part on the GPU, frozen ones as cast, before parking", result.start_up),
                          ("validation and diagnostics bring the parked parts back: +", result.borrowed)]
    note = ("estimate: weights, gradients and optimizer states are exact counts; activations are a rough count "
            f"of the {kind}'s (text-encoder and VAE activations, CUDA context and allocator overhead are excluded)")
    return rows, note


def human(size):
    return f"{size / GIB:8.2f} GiB" if size >= GIB else f"{size / 2**20:8.1f} MiB"


def log_estimate(log, rows, note):
    log("GPU memory estimate (%s):", note)
    for label, size in rows:
        log("  %-80s %s", label, human(size))
