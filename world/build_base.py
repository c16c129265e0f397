"""Build models/drawn-world: a small Stable Diffusion pipeline trained on the drawn world.

    OMP_NUM_THREADS=2 nice -n 10 python world/build_base.py [--out models/drawn-world]

From random weights and a fixed seed, on the CPU:
1. the VAE learns to reconstruct drawn pictures (world/drawn_world.py, drawn afresh at every step),
   then its decoder alone learns on, from the encoder's posterior means (as SD's fine-tuned
   decoders were: the latents stay as they were); its scaling_factor is set so the training
   latents have unit variance, as SD's 0.18215 does;
2. the UNet and the CLIP text encoder learn together to denoise the latents of a fixed set of
   captioned pictures ("a photo of bucket on the beach", ...), one caption in ten left empty so
   that classifier-free guidance has an unconditional prediction to push away from; a
   third cycle (--objects_steps) weighs the latent pixels of the object more (a mask from the
   drawer), so the object words are learnt and not only the scene words;
   the VAE has three blocks (16x16 latents for 64x64 pictures, --latent_factor 4); --latent_factor 8
   builds SD's four (8x8 latents, cheaper, but its decodes blur a toy's parts into one patch);
3. the pipeline is saved with a DPM-Solver++ scheduler (good samples in 10 steps) and BUILD.md,
   which records the command, the seed, the settings and the time each stage took.

The tokenizer knows every word of the world and "sks" (never in a caption: a rare token, as in
real DreamBooth). The result is small enough to ship in the repository and to sample a 64x64
picture in about a second on one CPU core.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import drawn_world  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "models", "drawn-world")
MAX_LENGTH = 16  # tokens: the longest prompt, "a photo of sks toy on the beach", takes 9


@dataclass
class Settings:
    seed: int = 0
    vae_steps: int = 600
    vae_batch: int = 16
    vae_learning_rate: float = 2e-3
    kl_weight: float = 1e-6
    decoder_steps: int = 250
    images_per_pair: int = 150  # per (object, scene): 3000 pictures for the UNet
    unet_steps: int = 800
    unet_batch: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    empty_caption: float = 0.1
    # A second cosine cycle from the first one's weights, predicting velocity instead of noise: at the
    # noisiest timesteps a noise prediction's error is multiplied by 1/sqrt(alpha_bar) (about 15) in
    # the picture it implies, so the first sampling steps of a small, briefly trained model go astray;
    # velocity is the picture itself there. The first cycle's result is kept in the work folder.
    more_unet_steps: int = 700
    more_learning_rate: float = 5e-4
    # A third cycle, velocity again, that teaches the object words (--objects_steps 0 leaves it out).
    # An object covers a tenth of a picture and the scene the rest, so the plain loss is mostly about
    # the scene: after the first two cycles the text encoder's states for "toy", "dog" and "cup" are
    # nearly the same, and the UNet draws whatever object the noise suggests. Here the latent pixels
    # the object covers (a mask from the drawer) weigh object_weight times more, and the base draws the
    # prompted object far more often (docs/drawn_world.md).
    objects_steps: int = 1600
    objects_learning_rate: float = 5e-4
    objects_batch: int = 32
    object_weight: float = 10.0
    # Pixels per latent pixel along each side: 8 as SD's VAE (four blocks: a 64x64 picture becomes an
    # 8x8 latent), or 4 (three blocks, 16x16 latents). At 8 the VAE's decodes of the drawn world are
    # blurred beyond recognising a toy's parts, whatever the UNet learns; at 4 they keep them.
    latent_factor: int = 4


# Per latent factor: VAE block widths, UNet block widths, UNet down blocks (the up blocks mirror them).
# 8: four VAE blocks, as SD's (a 64x64 picture becomes an 8x8x4 latent). 4: three (16x16x4 latents);
# there the UNet attends to the text at 8x8 and 4x4 only.
SHAPES = {8: ((16, 32, 32, 32), (32, 64, 64), ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
          4: ((32, 32, 32), (32, 64, 96), ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))}


def build_models(seed, latent_factor=4):
    """Random tokenizer, text encoder, VAE and UNet of the base model's shape."""
    import tempfile

    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tiny_sd import write_tokenizer_files

    paddle.seed(seed)
    tmp = tempfile.mkdtemp()
    vocab_size = write_tokenizer_files(tmp, drawn_world.WORDS)
    tokenizer = CLIPTokenizer(vocab_file=os.path.join(tmp, "vocab.json"), merges_file=os.path.join(tmp, "merges.txt"),
                              model_max_length=MAX_LENGTH)
    width = 64
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=width))
    if latent_factor not in SHAPES:
        raise SystemExit(f"--latent_factor {latent_factor}: use 8 or 4")
    vae_channels, unet_channels, unet_down = SHAPES[latent_factor]
    up = {"DownBlock2D": "UpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D"}
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=vae_channels,
                        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
                        latent_channels=4, norm_num_groups=16, sample_size=64, layers_per_block=1)
    unet = UNet2DConditionModel(
        sample_size=64 // latent_factor, in_channels=4, out_channels=4, block_out_channels=unet_channels,
        layers_per_block=1, down_block_types=unet_down, up_block_types=tuple(up[b] for b in reversed(unet_down)),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32)
    return tokenizer, text_encoder, vae, unet


def to_tensor(images):
    import paddle

    return paddle.to_tensor(np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images]))


def train_vae(vae, settings, log):
    """Reconstruction (L1 + MSE) of freshly drawn pictures through a posterior sample, plus a small KL.
    On random 32x32 crops: the VAE is convolutional, and a quarter of the pixels costs a quarter."""
    import paddle

    rng = np.random.default_rng([settings.seed, 1])
    # A random encoder's posterior is wider than the spread of its means: every sample would be
    # mostly noise, and the decoder would learn only blurred averages for hundreds of steps. Start
    # it narrow (std e^-3), as a plain autoencoder; the KL term may widen it where that costs nothing.
    log_variance = slice(vae.config.latent_channels, None)  # quant_conv outputs (mean, log-variance)
    with paddle.no_grad():
        vae.quant_conv.weight[log_variance] = 0.0
        vae.quant_conv.bias[log_variance] = -6.0
    optimizer = paddle.optimizer.AdamW(learning_rate=settings.vae_learning_rate, parameters=vae.parameters(),
                                       weight_decay=0.0)
    vae.train()
    for step in range(settings.vae_steps):
        pixels = random_crops(rng, settings.vae_batch)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        error = reconstruction - pixels
        kl = posterior.kl().mean() / np.prod(posterior.mean.shape[1:])
        loss = error.abs().mean() + (error ** 2).mean() + settings.kl_weight * kl
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        if step % 25 == 0 or step == settings.vae_steps - 1:
            log(f"vae step {step}: loss {float(loss):.4f} (L1 {float(error.abs().mean()):.4f}, kl {float(kl):.2f})")
    vae.eval()


def random_crops(rng, batch):
    """32x32 crops of freshly drawn pictures (any object, any scene): what the VAE stages learn from."""
    pairs = [(drawn_world.OBJECTS[rng.integers(5)], drawn_world.SCENES[rng.integers(4)]) for _ in range(batch)]
    corners = rng.integers(0, 33, (batch, 2))
    return to_tensor([drawn_world.draw(obj, kind, rng).crop((x, y, x + 32, y + 32))
                      for (obj, kind), (x, y) in zip(pairs, corners)])


def finetune_decoder(vae, settings, log):
    """The decoder alone, on the encoder's posterior means: sharper decodes of unchanged latents."""
    import paddle

    rng = np.random.default_rng([settings.seed, 3])
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = paddle.optimizer.AdamW(learning_rate=settings.vae_learning_rate, parameters=params, weight_decay=0.0)
    vae.decoder.train()
    for step in range(settings.decoder_steps):
        pixels = random_crops(rng, settings.vae_batch)
        with paddle.no_grad():
            latents = vae.encode(pixels).latent_dist.mean
        error = vae.decode(latents).sample - pixels
        loss = error.abs().mean() + (error ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        if step % 25 == 0 or step == settings.decoder_steps - 1:
            log(f"decoder step {step}: loss {float(loss):.4f} (L1 {float(error.abs().mean()):.4f})")
    vae.eval()


def object_weights(settings, n):
    """One weight map per cached latent (the n pictures, then their mirror images): 1 where the
    latent pixel sees only scene, 1 + object_weight where its pixels hold some of the object;
    each map scaled to mean 1, so a picture's share of the loss stays as it was."""
    world = drawn_world.samples(settings.images_per_pair, seed=settings.seed + 100, with_mask=True)
    masks = np.stack([mask for (_, mask), _, _ in world])
    assert len(masks) == n, "the masks must be drawn from the pictures that were encoded"
    f = settings.latent_factor
    cells = masks.reshape(n, 64 // f, f, 64 // f, f).max(axis=(2, 4)).astype(np.float32)
    cells = np.concatenate([cells, cells[:, :, ::-1]])  # encode_world's mirror images
    weights = 1 + settings.object_weight * cells
    return weights / weights.mean(axis=(1, 2), keepdims=True)


def cached_stage(folder, key, train, log):
    """Run train() and save the VAE it returns with its key and times, or reuse an earlier result
    with the same key: a rebuild that changes only later stages skips the VAE's."""
    from ppdiffusers import AutoencoderKL

    if read_json(os.path.join(folder, "settings.json")) == key:
        vae = AutoencoderKL.from_pretrained(folder)
        vae.eval()
        log(f"reused {folder}: an earlier build trained it with the same settings")
        return vae, tuple(read_json(os.path.join(folder, "times.json"))), True
    t0, c0 = time.time(), time.process_time()
    vae = train()
    times = (time.time() - t0, time.process_time() - c0)
    vae.save_pretrained(folder)
    write_json(os.path.join(folder, "times.json"), times)
    write_json(os.path.join(folder, "settings.json"), key)
    return vae, times, False


def encode_world(vae, images):
    """Posterior (mean, std) of every picture and of its mirror image, as float32 arrays."""
    import paddle

    means, stds = [], []
    with paddle.no_grad():
        for flip in (False, True):
            for start in range(0, len(images), 64):
                batch = images[start:start + 64]
                if flip:
                    batch = [im.transpose(0) for im in batch]  # PIL's FLIP_LEFT_RIGHT
                posterior = vae.encode(to_tensor(batch)).latent_dist
                means.append(posterior.mean.numpy())
                stds.append(posterior.std.numpy())
    return np.concatenate(means), np.concatenate(stds)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents_mean, latents_std, captions, settings, log,
               steps, learning_rate, prediction_type, stream, pixel_weights=None, batch=None):
    """Noise (epsilon) or velocity prediction on the cached latents, text encoder trained along, cosine
    learning rate. pixel_weights (one map per latent) weights each latent pixel's squared error."""
    import paddle
    from ppdiffusers.optimization import get_scheduler

    rng = np.random.default_rng([settings.seed, stream])
    ids = {c: tokenizer(c, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"]
           for c in set(captions) | {""}}
    lr = get_scheduler("cosine", learning_rate=learning_rate, num_warmup_steps=settings.warmup_steps,
                       num_training_steps=steps)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=params, weight_decay=0.01,
                                       grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    unet.train()
    text_encoder.train()
    alphas = scheduler.alphas_cumprod.numpy().astype(np.float32)
    n = len(captions)
    losses = []
    batch = batch or settings.unet_batch
    for step in range(steps):
        pick = rng.integers(0, len(latents_mean), batch)  # mirror images are the second half
        x0 = latents_mean[pick] + latents_std[pick] * rng.standard_normal(latents_mean[pick].shape, np.float32)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        t = rng.integers(0, len(alphas), batch)
        a = alphas[t][:, None, None, None]
        noisy = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
        prompts = ["" if rng.random() < settings.empty_caption else captions[i % n] for i in pick]
        states = text_encoder(paddle.to_tensor([ids[p] for p in prompts]))[0]
        pred = unet(paddle.to_tensor(noisy), paddle.to_tensor(t), states).sample
        target = noise if prediction_type == "epsilon" else np.sqrt(a) * noise - np.sqrt(1 - a) * x0
        error = (pred - paddle.to_tensor(target.astype(np.float32))) ** 2
        if pixel_weights is not None:
            error = error * paddle.to_tensor(pixel_weights[pick][:, None])
        loss = error.mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        lr.step()
        losses.append(float(loss))
        if step % 25 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {np.mean(losses[-25:]):.4f} (lr {lr.get_lr():.2e})")
    unet.eval()
    text_encoder.eval()
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--work", default=os.path.join(ROOT, "bench", "out", "drawn-world"),
                        help="keeps the trained VAE, so a rebuild with the same VAE settings skips that stage")
    for name, default in asdict(Settings()).items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args()
    settings = Settings(**{k: getattr(args, k) for k in asdict(Settings())})
    command = " ".join(["python", os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:7.1f} s] {message}", flush=True)

    from train_dreambooth import choose_mkl_code_path

    choose_mkl_code_path()  # before Paddle's first op: MKL's fast code on AMD processors too
    import paddle
    from ppdiffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    tokenizer, text_encoder, vae, unet = build_models(settings.seed, settings.latent_factor)
    count = {name: sum(int(p.numel()) for p in m.parameters())
             for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    log(f"parameters: {count}")
    times, reused = {}, []  # reused: stages taken from the work folder, made by an earlier build
    vae_key = dict(seed=settings.seed, steps=settings.vae_steps, batch=settings.vae_batch,
                   lr=settings.vae_learning_rate, kl=settings.kl_weight)
    if settings.latent_factor != 8:  # an 8x8 build's key stays as it was before the option existed
        vae_key["latent_factor"] = settings.latent_factor

    def vae_stage():
        train_vae(vae, settings, log)
        return vae

    vae, times["vae"], was_reused = cached_stage(os.path.join(args.work, "vae"), vae_key, vae_stage, log)
    reused += ["vae"] if was_reused else []

    def decoder_stage():
        finetune_decoder(vae, settings, log)
        return vae

    decoder_key = dict(vae_key, decoder=settings.decoder_steps)
    vae, times["decoder"], was_reused = cached_stage(os.path.join(args.work, "decoder"), decoder_key, decoder_stage, log)
    reused += ["decoder"] if was_reused else []

    t0, c0 = time.time(), time.process_time()
    world_key = dict(decoder_key, images_per_pair=settings.images_per_pair)
    encoded = os.path.join(args.work, "encoded.npz")
    if read_json(encoded + ".json") == world_key:
        saved = np.load(encoded)
        means, stds, captions = saved["means"], saved["stds"], list(saved["captions"])
        times["encode"] = tuple(read_json(encoded + ".times.json"))
        reused.append("encode")
        log(f"reused {encoded}: an earlier build encoded the same pictures with the same VAE")
    else:
        world = drawn_world.samples(settings.images_per_pair, seed=settings.seed + 100)
        images, captions = [im for im, _, _ in world], [drawn_world.caption(o, k) for _, o, k in world]
        means, stds = encode_world(vae, images)
        times["encode"] = (time.time() - t0, time.process_time() - c0)
        np.savez(encoded, means=means, stds=stds, captions=np.array(captions))
        write_json(encoded + ".json", world_key)
        write_json(encoded + ".times.json", times["encode"])
    # SD scales its latents by 0.18215 for unit variance; this VAE gets its own factor, measured.
    scale = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"latents: std {means.std():.3f} -> scaling_factor {scale:.4f}; posterior std {stds.mean():.4f}")

    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    losses = []
    unet_key = dict(world_key, unet_steps=settings.unet_steps, unet_batch=settings.unet_batch,
                    unet_lr=settings.learning_rate, warmup=settings.warmup_steps, empty_caption=settings.empty_caption,
                    prediction_type="epsilon")
    cycles = [("unet", unet_key, settings.unet_steps, settings.learning_rate, "epsilon", 2, {})]
    if settings.more_unet_steps:
        cycles.append(("unet_more", dict(unet_key, more_steps=settings.more_unet_steps,
                                         more_lr=settings.more_learning_rate, more_prediction_type="v_prediction"),
                       settings.more_unet_steps, settings.more_learning_rate, "v_prediction", 4, {}))
    if settings.objects_steps:
        cycles.append(("unet_objects", dict(cycles[-1][1], objects_steps=settings.objects_steps,
                                            objects_lr=settings.objects_learning_rate, objects_batch=settings.objects_batch,
                                            object_weight=settings.object_weight),
                       settings.objects_steps, settings.objects_learning_rate, "v_prediction", 6,
                       dict(pixel_weights="objects", batch=settings.objects_batch)))
    for stage, key, steps, learning_rate, prediction_type, stream, extra in cycles:
        folder = os.path.join(args.work, stage)
        if read_json(os.path.join(folder, "settings.json")) == key:
            unet = type(unet).from_pretrained(folder, subfolder="unet")
            text_encoder = type(text_encoder).from_pretrained(folder, subfolder="text_encoder")
            times[stage] = tuple(read_json(os.path.join(folder, "times.json")))
            losses = read_json(os.path.join(folder, "losses.json"))
            reused.append(stage)
            log(f"reused {folder}: an earlier build trained it with the same settings")
            continue
        t0, c0 = time.time(), time.process_time()
        if extra.get("pixel_weights") == "objects":
            extra = dict(extra, pixel_weights=object_weights(settings, len(means) // 2))
        losses = train_unet(unet, text_encoder, tokenizer, DDPMScheduler(**schedule), means * scale, stds * scale,
                            captions, settings, log, steps, learning_rate, prediction_type, stream, **extra)
        times[stage] = (time.time() - t0, time.process_time() - c0)
        unet.save_pretrained(os.path.join(folder, "unet"))
        text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
        write_json(os.path.join(folder, "times.json"), times[stage])
        write_json(os.path.join(folder, "losses.json"), losses)
        write_json(os.path.join(folder, "settings.json"), key)
    unet.eval()
    text_encoder.eval()

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler(**schedule, prediction_type=cycles[-1][4]), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(args.out)
    total = sum(wall for wall, _ in times.values())  # stages reused from the work folder count as they took
    with open(os.path.join(args.out, "BUILD.md"), "w") as f:
        f.write(build_notes(command, settings, count, times, total, losses, scale, reused))
    with open(os.path.join(args.out, "build.json"), "w") as f:
        json.dump(dict(command=command, settings=asdict(settings), parameters=count, scaling_factor=scale,
                       seconds={k: v[0] for k, v in times.items()}, cpu_seconds={k: v[1] for k, v in times.items()},
                       total_seconds=total, final_loss=float(np.mean(losses[-50:]))), f, indent=1)
    log(f"written to {args.out}")


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def build_notes(command, settings, count, times, total, losses, scale, reused):
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    rows = "\n".join(f"| {stage} | {wall / 60:.1f} min | {cpu / 60:.1f} min | "
                     f"{'reused: an earlier build' if stage in reused else 'this build'} |"
                     for stage, (wall, cpu) in times.items())
    cpu_total = sum(cpu for _, cpu in times.values())
    return f"""# models/drawn-world: how it was made

Written by `world/build_base.py` at the end of the build that produced the weights beside it.

```bash
OMP_NUM_THREADS={threads} nice -n 10 {command}
```

Seed {settings.seed}; settings: `{json.dumps(asdict(settings))}`.
Parameters: {", ".join(f"{k} {v:,}" for k, v in count.items())}. VAE scaling factor {scale:.4f}.
Final UNet loss (mean of the last 50 updates): {np.mean(losses[-50:]):.4f}.

| stage | wall clock | CPU time | made by |
|---|---|---|---|
{rows}
| total | {total / 60:.1f} min | {cpu_total / 60:.1f} min | |

The machine was shared with other jobs (2 cores, the build at nice 10), so the wall clock is an
upper bound; the CPU time is what the build itself used. A stage "reused" was loaded from the work
folder (`--work`), where an earlier run of this script with the same settings for it and every stage
before it had saved its result and its times; a run with an empty work folder makes every stage.
"""


if __name__ == "__main__":
    main()
