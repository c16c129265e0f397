"""Build a tiny, randomly initialised Stable Diffusion pipeline on disk.

    python tiny_sd.py OUT_DIR [--size tiny|small] [--prediction_type epsilon|v_prediction] [--family sd|sd2|sdxl]
    python tiny_sd.py OUT_DIR --family sd3 [--without_t5]

The result has the folder layout of a real SD 1.x model (unet, vae, text_encoder,
tokenizer, scheduler), so `train_dreambooth.py --pretrained_model_name_or_path OUT_DIR`
and `StableDiffusionPipeline.from_pretrained(OUT_DIR)` treat it exactly like
CompVis/stable-diffusion-v1-4, only thousands of times smaller; --family sd2 the same layout with
SD 2.x's text encoder, UNet and prediction type (see SD2); --family sdxl writes the
StableDiffusionXLPipeline layout (two text encoders, tokenizer_2, text_encoder_2) instead, --family sd3
the StableDiffusion3Pipeline one (a transformer, two CLIPs and T5). The tests, the demo
and the benchmark all build their models here, so the weights are fixed by the seed.
"""
import argparse
import json
import os

# The words of every prompt the tests and the demo use get their own BPE merges, so
# they tokenize like real CLIP words; anything else falls back to single characters.
WORDS = ["a", "photo", "of", "sks", "dog", "cat", "toy", "robot", "in", "the", "on", "bucket", "beach", "snow"]

SIZES = {
    # ~1.5 M parameters in all; trains at 64x64 in well under a second a step on one CPU thread.
    # Four VAE blocks, like SD's: images are downsampled by 8 into latents.
    "tiny": dict(unet_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 vae_channels=(16, 32, 32, 32), text_hidden=32, text_layers=2, text_heads=4),
    # The "small" SD-shaped model of the benchmark (35 M UNet parameters).
    "small": dict(unet_channels=(64, 128, 256, 256), layers_per_block=2, cross_attention_dim=256,
                  attention_head_dim=8, vae_channels=(32, 64, 128, 128), text_hidden=256, text_layers=4,
                  text_heads=4),
}


# What SD 2.x changes in the SD 1.x layout, in miniature. Its text encoder is OpenCLIP-H's: the exact GELU
# (CLIP-L's is quick_gelu) and 23 layers, OpenCLIP's 24 without the last, which SD 2.x never runs (it reads
# the penultimate layer); ppdiffusers' single-file reader treats a 23-layer SD 2 encoder specially. Its UNet
# projects into and out of attention with Linear layers and gives each block a head count for one head
# width (64 in SD 2.x); it predicts the velocity (the 768-v models).
SD2 = dict(text_act="gelu", text_layers=23, head_width=8, prediction_type="v_prediction")


def bytes_to_unicode():
    """CLIP's reversible byte -> printable character table (as in OpenAI's BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer_files(out_dir, words=WORDS):
    """A CLIP BPE vocabulary: every byte alone and word-final, plus merges spelling words."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: "p h", "ph o", ...
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if " ".join(pair) not in merges:
                merges.append(" ".join(pair))
            if merged not in vocab:
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_vae(channels, **family_config):
    """A small AutoencoderKL with 4 latent channels; family_config: the family's latent normalisation."""
    from ppdiffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), latent_channels=4,
                         norm_num_groups=min(32, channels[0]), sample_size=64, **family_config)


def save_tiny_pipeline(out_dir, size="tiny", seed=0, prediction_type=None, max_length=16, family="sd"):
    """A tiny random StableDiffusionPipeline in out_dir: SD 1.x-like, or SD 2.x-like with family="sd2";
    prediction_type: the scheduler's (default: the family's, epsilon for SD 1.x)."""
    import tempfile

    import paddle
    from ppdiffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    s = SIZES[size]
    sd2 = family == "sd2"
    prediction_type = prediction_type or (SD2["prediction_type"] if sd2 else "epsilon")
    paddle.seed(seed)
    n_blocks = len(s["unet_channels"])
    # SD 2.x: a head count per block (what ppdiffusers' attention_head_dim holds); SD 1.x: one count.
    heads = tuple(c // SD2["head_width"] for c in s["unet_channels"]) if sd2 else s["attention_head_dim"]
    unet = UNet2DConditionModel(
        sample_size=8 if size == "tiny" else 16,
        in_channels=4,
        out_channels=4,
        block_out_channels=s["unet_channels"],
        layers_per_block=s["layers_per_block"],
        down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
        cross_attention_dim=s["cross_attention_dim"],
        attention_head_dim=heads,
        use_linear_projection=sd2,
        norm_num_groups=min(32, s["unet_channels"][0]),
    )
    vae = tiny_vae(s["vae_channels"])
    # The tokenizer copies its files from where it was built when the pipeline is saved.
    tmp = tempfile.TemporaryDirectory()
    vocab_size = write_tokenizer_files(tmp.name)
    tokenizer = CLIPTokenizer(
        vocab_file=os.path.join(tmp.name, "vocab.json"),
        merges_file=os.path.join(tmp.name, "merges.txt"),
        model_max_length=max_length,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=s["text_hidden"],
            intermediate_size=4 * s["text_hidden"],
            num_hidden_layers=SD2["text_layers"] if sd2 else s["text_layers"],
            num_attention_heads=s["text_heads"],
            hidden_act=SD2["text_act"] if sd2 else "quick_gelu",
            max_position_embeddings=max_length,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=s["cross_attention_dim"],
        )
    )
    # The text encoder's width must match the UNet's cross-attention width.
    assert s["text_hidden"] == s["cross_attention_dim"]
    # Real SD 1.x ships PNDM for sampling; training uses the DDPM betas of the same config (SD 2.x's too).
    scheduler_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            num_train_timesteps=1000, prediction_type=prediction_type)
    scheduler = PNDMScheduler(skip_prk_steps=True, **scheduler_kwargs) if prediction_type == "epsilon" \
        else DDPMScheduler(**scheduler_kwargs)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    tmp.cleanup()


SDXL_SIZES = {
    # SDXL's shape in miniature: a first block without attention, two CLIP encoders whose widths add up
    # to the cross-attention width, and the "text_time" added embedding of the pooled prompt and the
    # six size/crop numbers.
    "tiny": dict(unet_channels=(32, 64), layers_per_block=1, transformer_layers=(1, 1), attention_head_dim=8,
                 vae_channels=(16, 32, 32, 32), text_hidden=(32, 32), text_layers=2, text_heads=4,
                 projection_dim=32, time_embed_dim=8),
    "small": dict(unet_channels=(64, 128, 256), layers_per_block=2, transformer_layers=(1, 1, 2),
                  attention_head_dim=8, vae_channels=(32, 64, 128, 128), text_hidden=(128, 256), text_layers=4,
                  text_heads=4, projection_dim=256, time_embed_dim=32),
}


def save_tiny_sdxl_pipeline(out_dir, size="tiny", seed=0, max_length=16):
    """A tiny random SDXL pipeline (StableDiffusionXLPipeline layout) in out_dir."""
    import tempfile

    import paddle
    from ppdiffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from ppdiffusers.transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                                          CLIPTokenizer)

    s = SDXL_SIZES[size]
    paddle.seed(seed)
    n_blocks = len(s["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=8 if size == "tiny" else 16,
        in_channels=4,
        out_channels=4,
        block_out_channels=s["unet_channels"],
        layers_per_block=s["layers_per_block"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_blocks - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_blocks - 1) + ("UpBlock2D",),
        transformer_layers_per_block=s["transformer_layers"],
        cross_attention_dim=sum(s["text_hidden"]),
        attention_head_dim=s["attention_head_dim"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=s["time_embed_dim"],
        projection_class_embeddings_input_dim=6 * s["time_embed_dim"] + s["projection_dim"],
        norm_num_groups=min(32, s["unet_channels"][0]),
    )
    vae = tiny_vae(s["vae_channels"], scaling_factor=0.13025, force_upcast=True)  # SDXL's scale
    tmp = tempfile.TemporaryDirectory()
    vocab_size = write_tokenizer_files(tmp.name)
    tokenizers = [CLIPTokenizer(vocab_file=os.path.join(tmp.name, "vocab.json"),
                                merges_file=os.path.join(tmp.name, "merges.txt"), model_max_length=max_length)
                  for _ in range(2)]

    def clip_config(hidden):
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                              max_position_embeddings=max_length, bos_token_id=vocab_size - 2,
                              eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                              projection_dim=s["projection_dim"])

    text_encoder = CLIPTextModel(clip_config(s["text_hidden"][0]))
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(s["text_hidden"][1]))
    # SDXL ships Euler for sampling; training reads the DDPM betas of the same config.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(out_dir)
    tmp.cleanup()


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 3: an MMDiT transformer, two CLIPs with projections, T5, flow matching.

SD3_SIZES = {
    # Two CLIPs of different widths, so that mixing them up changes shapes; T5's width must hold
    # both CLIPs' hidden states side by side (the pipeline pads them to it).
    "tiny": dict(layers=2, heads=2, head_dim=8, clip_hidden=(32, 48), clip_layers=2, clip_heads=4,
                 t5_width=96, t5_layers=2, t5_heads=4, vae_channels=(16, 32, 32, 32)),
}


def write_t5_sentencepiece(path):
    """A SentencePiece unigram model whose pieces are WORDS (and their letters): T5's tokenizer format."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(WORDS)] + WORDS), model_writer=model, model_type="unigram",
        vocab_size=64, hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1)  # T5's ids: <pad> 0, </s> 1, <unk> 2
    with open(path, "wb") as f:
        f.write(model.getvalue())


def save_tiny_sd3_pipeline(out_dir, size="tiny", seed=0, max_length=16, with_t5=True):
    """A tiny StableDiffusion3Pipeline folder; with_t5=False saves it without T5 (text_encoder_3 and
    tokenizer_3 null), as SD3 is also distributed."""
    import tempfile

    import paddle
    from ppdiffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from ppdiffusers.transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                                          T5EncoderModel, T5Tokenizer)

    s = SD3_SIZES[size]
    paddle.seed(seed)
    tmp = tempfile.TemporaryDirectory()
    vocab_size = write_tokenizer_files(tmp.name)
    clip_tokenizer = CLIPTokenizer(vocab_file=os.path.join(tmp.name, "vocab.json"),
                                   merges_file=os.path.join(tmp.name, "merges.txt"), model_max_length=max_length)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=s["clip_layers"],
        num_attention_heads=s["clip_heads"], max_position_embeddings=max_length, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=hidden))
        for hidden in s["clip_hidden"]]
    inner = s["heads"] * s["head_dim"]
    assert sum(s["clip_hidden"]) <= s["t5_width"]
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=s["layers"],
        attention_head_dim=s["head_dim"], num_attention_heads=s["heads"], joint_attention_dim=s["t5_width"],
        caption_projection_dim=inner, pooled_projection_dim=sum(s["clip_hidden"]), pos_embed_max_size=32)
    vae = tiny_vae(s["vae_channels"], scaling_factor=1.5305, shift_factor=0.0609)  # SD3's latent normalisation
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3 medium's shift
    # T5 last: with and without it, every other weight is the same.
    t5, t5_tokenizer = None, None
    if with_t5:
        write_t5_sentencepiece(os.path.join(tmp.name, "spiece.model"))
        t5_tokenizer = T5Tokenizer(sentencepiece_model_file=os.path.join(tmp.name, "spiece.model"), extra_ids=0,
                                   model_max_length=max_length)
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=s["t5_width"], d_kv=s["t5_width"] // s["t5_heads"],
            d_ff=2 * s["t5_width"], num_layers=s["t5_layers"], num_heads=s["t5_heads"], dropout_rate=0.0,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clips[0], tokenizer=clip_tokenizer,
        text_encoder_2=clips[1], tokenizer_2=clip_tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(out_dir)
    tmp.cleanup()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None,
                        help="sd, sd2 only (default: epsilon for sd, v_prediction for sd2)")
    parser.add_argument("--family", choices=["sd", "sd2", "sdxl", "sd3"], default="sd",
                        help="sd: the SD 1.x layout; sd2: the same with SD 2.x's text encoder and UNet; "
                             "sdxl: StableDiffusionXLPipeline's (two text encoders); "
                             "sd3: StableDiffusion3Pipeline's (transformer, two CLIPs, T5)")
    parser.add_argument("--without_t5", action="store_true", help="sd3: save the pipeline without T5")
    args = parser.parse_args()
    if args.family == "sd3":
        save_tiny_sd3_pipeline(args.out_dir, seed=args.seed, with_t5=not args.without_t5)
        print(f"tiny Stable Diffusion 3 pipeline written to {args.out_dir}")
        return
    if args.family == "sdxl":
        save_tiny_sdxl_pipeline(args.out_dir, args.size, args.seed)
    else:
        save_tiny_pipeline(args.out_dir, args.size, args.seed, args.prediction_type, family=args.family)
    label = {"sd": "Stable Diffusion", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}[args.family]
    print(f"tiny {label} pipeline ({args.size}) written to "
          f"{args.out_dir}")


if __name__ == "__main__":
    main()
