"""Write the GPU memory tables of docs/memory.md and docs/memory_zh.md from memory_estimate.py.

Builds the published models at their real size under paddle.LazyGuard (shapes only: no memory is
allocated, no weights are read, no hub is asked): SD 1.5 at 512, SDXL base 1.0 at 1024 and SD3 medium
at 1024, from their configs written below. Each row of a table is one set of flags, prepared as
train_dreambooth.py prepares the models (which parameters train, LoRA through the families' own
functions, what is cast to half, what is parked in host memory) and counted by memory_estimate.plan,
which --print_memory_estimate uses too.

    python tools/memory_table.py          rewrite the tables between the marker comments
    python tools/memory_table.py --check  exit 1 if the documents' tables are stale
"""
import argparse
import functools
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DOCS = {"en": "docs/memory.md", "zh": "docs/memory_zh.md"}
LORA_RANK = 4  # --lora_rank's default

# Published configs (the fields that shape parameters and activations).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
VAE = dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
           norm_num_groups=32)
MODELS = {
    "sd1": dict(
        family="SD", resolution=512, tokens=77,
        denoiser=("UNet2DConditionModel", dict(
            sample_size=64, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)),
        text_encoders={"text_encoder": ("CLIPTextModel", CLIP_L)},
        vae=dict(VAE, sample_size=512)),
    "sdxl": dict(
        family="SDXL", resolution=1024, tokens=77,
        denoiser=("UNet2DConditionModel", dict(
            sample_size=128, block_out_channels=[320, 640, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20],
            transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)),
        text_encoders={"text_encoder": ("CLIPTextModel", CLIP_L),
                       "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G)},
        vae=dict(VAE, sample_size=1024, scaling_factor=0.13025)),
    "sd3": dict(
        family="SD3", resolution=1024, tokens=77 + 77,  # both CLIPs' 77 tokens, then T5's (--max_sequence_length)
        denoiser=("SD3Transformer2DModel", dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192)),
        text_encoders={"text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
                       "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
                       "text_encoder_3": ("T5EncoderModel", T5_XXL)},
        vae=dict(VAE, sample_size=1024, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=1.5305, shift_factor=0.0609)),
}
NAMES = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL encoder"}


class Run(dict):
    """One row: lora, checkpointing, train_text_encoder, drop_t5, efficient_attention."""
    def __getattr__(self, name):
        return self.get(name, name == "efficient_attention")


def runs(model):
    """The rows of a model's table: (English label, Chinese label, flags)."""
    ckpt, te = "`--gradient_checkpointing`", "`--train_text_encoder`"
    rows = [("full fine-tune", "全量微调", Run()),
            (f"full, {ckpt}", f"全量，{ckpt}", Run(checkpointing=True)),
            (f"full, {ckpt}, {te}", f"全量，{ckpt}，{te}", Run(checkpointing=True, train_text_encoder=True)),
            ("`--use_lora`", "`--use_lora`", Run(lora=True)),
            (f"`--use_lora`, {ckpt}", f"`--use_lora`，{ckpt}", Run(lora=True, checkpointing=True)),
            (f"`--use_lora`, {ckpt}, {te}", f"`--use_lora`，{ckpt}，{te}",
             Run(lora=True, checkpointing=True, train_text_encoder=True)),
            (f"`--use_lora`, {ckpt}, plain attention (no memory-efficient kernel)",
             f"`--use_lora`，{ckpt}，普通注意力（没有显存高效内核）",
             Run(lora=True, checkpointing=True, efficient_attention=False))]
    if model == "sd3":
        rows.insert(6, (f"`--use_lora`, {ckpt}, `--drop_t5`", f"`--use_lora`，{ckpt}，`--drop_t5`",
                        Run(lora=True, checkpointing=True, drop_t5=True)))
    return rows


def family_of(model):
    import families

    family_class = getattr(families, MODELS[model]["family"])
    return family_class.__new__(family_class)  # its methods used here read no model folder


def counts(module, trained):
    """(parameters, trained parameters) of a module; trained: whether any of it trains."""
    from common import parameter_count

    return (parameter_count(module.parameters()),
            parameter_count(p for p in module.parameters() if not p.stop_gradient) if trained else 0)


@functools.lru_cache(maxsize=None)
def denoiser_counts(model):
    """({lora: counts(denoiser)} without and with the adapters of --use_lora, the denoiser's config), from one
    denoiser under paddle.LazyGuard, counted before and after the adapters go in: building SD3's transformer
    computes its whole position-embedding table, the slowest step of this tool."""
    import paddle
    import ppdiffusers
    from paddlenlp.transformers.model_utils import no_init_weights

    with paddle.LazyGuard(), no_init_weights():  # initialisers would write into the shapes
        denoiser_class, denoiser_config = MODELS[model]["denoiser"]
        denoiser = getattr(ppdiffusers, denoiser_class)(**denoiser_config)
        found = {False: counts(denoiser, True)}
        family_of(model).add_denoiser_lora(denoiser, LORA_RANK, LORA_RANK)
        found[True] = counts(denoiser, True)
    return found, dict(denoiser.config)


@functools.lru_cache(maxsize=None)
def build(model, lora, train_text_encoder, drop_t5):
    """The model's parts under paddle.LazyGuard, prepared for these flags as train_dreambooth.train
    prepares them; returns (a function of `half` giving the memory_estimate.Part list with the denoiser
    first, the denoiser's config)."""
    import paddle
    import ppdiffusers
    import ppdiffusers.transformers as transformers
    from paddlenlp.transformers.model_utils import no_init_weights

    import memory_estimate
    from train_dreambooth import add_text_encoder_lora

    spec = MODELS[model]
    family = family_of(model)
    names = [n for n in spec["text_encoders"] if not (drop_t5 and n == "text_encoder_3")]
    trained_text = [n for n in family.trained_text_encoders if train_text_encoder and n in names]
    denoiser, denoiser_config = denoiser_counts(model)
    with paddle.LazyGuard(), no_init_weights():  # initialisers would write into the shapes
        text_encoders = {}
        for name in names:
            cls, config = spec["text_encoders"][name]
            config_class = getattr(transformers, "T5Config" if cls.startswith("T5") else "CLIPTextConfig")
            text_encoders[name] = getattr(transformers, cls)(config_class(**config))
        vae = ppdiffusers.AutoencoderKL(**spec["vae"])
        for name, text_encoder in text_encoders.items():
            unreachable = tuple(family.unreachable(name, text_encoder))
            for key, p in text_encoder.named_parameters():
                p.stop_gradient = name not in trained_text or key.startswith(unreachable)
        if lora:
            for name in trained_text:
                add_text_encoder_lora(text_encoders[name], LORA_RANK, LORA_RANK,
                                      skip=family.unreachable(name, text_encoders[name]))

    def part(name, counted, cast, parked):
        """counted: counts() of the part; cast(half): whether its frozen parameters are cast to half."""
        return lambda half: memory_estimate.Part(name, *counted, 2 if cast(half) else 4, parked)

    # Trained parts stay fp32; frozen ones are cast to half under mixed precision (fp16 here), except a
    # VAE that overflows in fp16 (SDXL's). With cached latents (the default) the VAE, and the frozen
    # text encoders, whose outputs are cached, wait in host memory while training.
    parts = [part("transformer" if model == "sd3" else "UNet", denoiser[lora], lambda half: False, False)]
    parts += [part(NAMES[name], counts(m, name in trained_text), lambda half, t=name in trained_text: half and not t,
                   name not in trained_text) for name, m in text_encoders.items()]
    parts.append(part("VAE", counts(vae, False), lambda half: half and not family.vae_overflows_in_fp16, True))
    return (lambda half: [p(half) for p in parts]), denoiser_config


@functools.lru_cache(maxsize=None)
def figures(model):
    """Per row: (labels, flags, trained parameters, plan in fp32, plan under fp16)."""
    import memory_estimate

    spec = MODELS[model]
    latent = spec["resolution"] // 8
    out = []
    for en, zh, run in runs(model):
        parts, config = build(model, bool(run.lora), bool(run.train_text_encoder), bool(run.drop_t5))
        plans = [memory_estimate.plan(parts(half), config, 1, half, run.checkpointing, run.efficient_attention,
                                      (latent, latent), spec["tokens"], run.lora) for half in (False, True)]
        out.append(((en, zh), run, sum(p.trained for p in parts(False)),
                    {p.name: p.params for p in parts(False)}, plans))
    return out


def gib(size):
    return f"{size / 2**30:.1f} GiB" if size >= 2**29 else f"{size / 2**20:.0f} MiB"


def activations(plan):
    return next(size for label, size in plan.rows if "activations" in label)


HEADERS = {
    "en": ["flags (cached latents)", "trained parameters", "weights on the GPU, gradients, AdamW", "activations",
           "**total while training**", "start-up (every part on the GPU)", "validation brings back"],
    "zh": ["参数（缓存潜变量）", "训练的参数", "GPU 上的权重、梯度、AdamW", "激活值", "**训练时合计**",
           "启动时（所有部分都在 GPU 上）", "验证时取回"],
}


def render(model, language):
    """The generated block of one model, in one language."""
    rows = figures(model)
    lang = 0 if language == "en" else 1
    params = rows[0][3]  # the full fine-tune's parts (T5 included for SD3)
    listing = [f"{name} {count / 1e6:.1f} M" for name, count in params.items()]
    spec, latent = MODELS[model], MODELS[model]["resolution"] // 8
    size = f"{spec['resolution']}x{spec['resolution']}"
    if "patch_size" in spec["denoiser"][1]:
        patches = (latent // spec["denoiser"][1]["patch_size"]) ** 2
        shape = (f"{patches} patches + {spec['tokens']} tokens", f"{patches} 个图块 + {spec['tokens']} 个 token")
    else:
        shape = (f"latents {latent}x{latent}, {spec['tokens']} tokens", f"潜变量 {latent}x{latent}，{spec['tokens']} 个 token")
    lines = [f"{size} ({shape[0]}), batch 1." if language == "en" else f"{size}（{shape[1]}），批量 1。", ""]
    lines += ["Parameters (counted from the published configs): " + ", ".join(listing) + "." if language == "en"
             else "参数量（由公开发布的配置计算）：" + "、".join(listing) + "。", ""]
    head = HEADERS[language]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for labels, run, trained, _, (fp32, fp16) in rows:
        def pair(a, b):
            return a if a == b else f"{a} / {b}"
        state = [fp32.training - activations(fp32), fp16.training - activations(fp16)]
        cells = [labels[lang], f"{trained / 1e6:.4g} M", pair(gib(state[0]), gib(state[1])),
                 f"{gib(activations(fp32))} / {gib(activations(fp16))}",
                 f"**{gib(fp32.training)} / {gib(fp16.training)}**", pair(gib(fp32.start_up), gib(fp16.start_up)),
                 f"{gib(fp32.borrowed)} / {gib(fp16.borrowed)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def marker(model, end=False):
    return f"<!-- generated by tools/memory_table.py: {model} {'end' if end else 'begin'} -->"


def update(text, language):
    """The document with every model's block regenerated between its markers."""
    for model in MODELS:
        begin, end = marker(model), marker(model, end=True)
        pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOCS[language]}: no '{begin}' ... '{end}' block; add the two markers where "
                             f"the {model} table goes")
        block = f"{begin}\n{render(model, language)}\n{end}"
        text = pattern.sub(lambda _: block, text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the documents' tables are stale")
    parser.add_argument("--docs_root", default=ROOT, help="the folder holding docs/ (default: the repository)")
    args = parser.parse_args(argv)
    stale = []
    for language, name in DOCS.items():
        path = os.path.join(args.docs_root, name)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new = update(text, language)
        if new != text:
            stale.append(name)
            if not args.check:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    if args.check and stale:
        print(f"{', '.join(stale)}: the memory tables are stale: run python tools/memory_table.py")
        return 1
    print(("stale: " if args.check else "written: ") + (", ".join(stale) or "nothing") if stale else "up to date")
    return 0


if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    sys.exit(main())
