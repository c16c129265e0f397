"""Behaviours that had no test able to fail (issue 17): augmentation, the loss options, resume
under a decaying schedule, refused resumes, and what validation and diagnostics must leave alone.
Each is checked against an independent computation; tools/deliberate_bugs.py shows that each
test fails when its behaviour breaks."""
import contextlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import CLASS_PROMPT, PROMPT, load_weights, logged_scalars, make_images, run_train, train_args

FULL_PRECISION = (None, contextlib.nullcontext)  # (half dtype, autocast factory) of --mixed_precision no


# ----------------------------------------------------------------------------------------------
# The loss of an update, by hand, from the trainer's documented randomness: every draw comes from a
# NumPy generator keyed by (seed, stream, epoch, place of the sample in the epoch, instance/class).


class ByHand:
    """The base model's per-sample losses, computed with NumPy around the base models' forwards."""

    def __init__(self, model, folder, *, seed=0, size=64, use_mask=False):
        import paddle
        from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer

        self.paddle, self.seed, self.size = paddle, seed, size
        self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        self.alphas_cumprod = DDPMScheduler.from_pretrained(model, subfolder="scheduler").alphas_cumprod.numpy()
        self.alphas_cumprod = self.alphas_cumprod.astype(np.float64)
        self.paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".png")]
        self.use_mask = use_mask
        self.drawn = []  # (crop x, crop y, flipped, snr weight) of every sample computed

    def states(self, prompt, use_mask):
        tokens = self.tokenizer(prompt, padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length)
        mask = {"attention_mask": self.paddle.to_tensor([tokens["attention_mask"]])} if use_mask else {}
        return self.text_encoder(self.paddle.to_tensor([tokens["input_ids"]]), **mask)[0]

    def sample_loss(self, epoch, position, *, random_crop=False, flip=False, noise_offset=0.0, snr_gamma=None):
        from train_dreambooth import AUGMENT_STREAM, NOISE_STREAM, ORDER_STREAM

        n, size = len(self.paths), self.size
        order = np.random.default_rng([self.seed, ORDER_STREAM, epoch]).permutation(n)
        image = Image.open(self.paths[order[position % n]]).convert("RGB")
        assert image.height == size and image.width >= size, "pick images that need no resizing"
        aug = np.random.default_rng([self.seed, AUGMENT_STREAM, epoch, position, 0])
        dx = image.width - size
        x = int(aug.integers(0, dx + 1)) if random_crop and dx else dx // 2
        y = int(aug.integers(0, 1)) if random_crop and dx else 0
        flipped = bool(flip and aug.random() < 0.5)
        pixels = np.asarray(image, np.float32)[y:y + size, x:x + size].transpose(2, 0, 1) / 127.5 - 1
        if flipped:
            pixels = pixels[:, :, ::-1]
        rng = np.random.default_rng([self.seed, NOISE_STREAM, epoch, position, 0])
        latent_shape = (4, size // 8, size // 8)
        eps = rng.standard_normal(latent_shape, dtype=np.float32)
        noise = rng.standard_normal(latent_shape, dtype=np.float32)
        if noise_offset:  # one offset per latent channel
            noise = noise + noise_offset * rng.standard_normal((4, 1, 1), dtype=np.float32)
        t = int(rng.integers(0, 1000))
        paddle = self.paddle
        with paddle.no_grad():
            posterior = self.vae.encode(paddle.to_tensor(np.ascontiguousarray(pixels)[None])).latent_dist
            latent = (posterior.mean.numpy()[0] + posterior.std.numpy()[0] * eps) * self.vae.config.scaling_factor
            a, b = np.sqrt(self.alphas_cumprod[t]), np.sqrt(1 - self.alphas_cumprod[t])
            noisy = (a * latent + b * noise).astype(np.float32)
            pred = self.unet(paddle.to_tensor(noisy[None]), paddle.to_tensor([t]),
                             self.states(PROMPT, self.use_mask)).sample.numpy()[0]
        loss = float(((pred.astype(np.float64) - noise) ** 2).mean())
        weight = 1.0
        if snr_gamma is not None:  # Min-SNR for an epsilon model: min(snr, gamma) / snr
            snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
            weight = min(snr, snr_gamma) / snr
        self.drawn.append((x, y, flipped, weight))
        return loss * weight


# ----------------------------------------------------------------------------------------------
# Augmentation and loss options end to end


def test_uncached_random_crop_and_flip_with_noise_offset_match_a_loss_by_hand(tiny_model, instance_dir, tmp_path):
    """The default for real photos: a random crop per step, encoded by the VAE every step (images
    wider than the training size), --random_flip, and --noise_offset."""
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--train_batch_size", 4, "--max_train_steps", 1,
                          "--random_flip", "--noise_offset", 0.3))
    hand = ByHand(tiny_model, instance_dir)
    expected = np.mean([hand.sample_loss(0, p, random_crop=True, flip=True, noise_offset=0.3) for p in range(4)])
    crops, flips = {d[0] for d in hand.drawn}, {d[2] for d in hand.drawn}
    assert len(crops) > 1 and flips == {True, False}, hand.drawn  # else the test could not tell
    assert logged_scalars(out, "train/loss")[1] == pytest.approx(expected, rel=1e-4)


def test_cached_flip_with_snr_gamma_matches_a_loss_by_hand(tiny_model, instance_dir, tmp_path):
    """Center crops are cached as VAE posteriors, flipped and unflipped; --snr_gamma weights the loss."""
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--train_batch_size", 4, "--max_train_steps", 1,
                          "--center_crop", "--random_flip", "--snr_gamma", 1.0, "--seed", 1))
    hand = ByHand(tiny_model, instance_dir, seed=1)  # seed 1 flips two of the four
    expected = np.mean([hand.sample_loss(0, p, flip=True, snr_gamma=1.0) for p in range(4)])
    assert {d[2] for d in hand.drawn} == {True, False}, hand.drawn
    assert min(d[3] for d in hand.drawn) < 0.9, "no sample's weight below 1: gamma would not matter"
    assert logged_scalars(out, "train/loss")[1] == pytest.approx(expected, rel=1e-4)


def test_a_text_encoder_that_asks_for_an_attention_mask_gets_one(tiny_model, instance_dir, tmp_path):
    """BERT-like encoders (Taiyi's) set use_attention_mask in their config, as the pipelines read it."""
    model = tmp_path / "masked_model"
    shutil.copytree(tiny_model, model)
    config_path = model / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, use_attention_mask=True)))
    out = tmp_path / "out"
    run_train(*train_args(model, instance_dir, out, "--max_train_steps", 1, "--center_crop"))
    hand = ByHand(str(model), instance_dir, use_mask=True)
    with_mask, without = (hand.states(PROMPT, m).numpy() for m in (True, False))
    assert np.abs(with_mask - without).max() > 1e-3, "the mask must change the states for the test to see it"
    assert logged_scalars(out, "train/loss")[1] == pytest.approx(hand.sample_loss(0, 0), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# An epoch's last, shorter accumulation group


@pytest.fixture
def recorded_gradients(monkeypatch):
    """The flattened gradient each optimizer update applies, in order."""
    import paddle

    gradients = []

    class Recording(paddle.optimizer.AdamW):
        def step(self):
            gradients.append(np.concatenate([np.zeros(p.size, np.float32) if p.grad is None else p.grad.numpy().ravel()
                                             for p in self._parameter_list]))
            return super().step()

    monkeypatch.setattr(paddle.optimizer, "AdamW", Recording)
    return gradients


def test_the_epoch_boundary_group_is_averaged_over_its_own_micro_batches(tiny_model, tmp_path, recorded_gradients):
    """3 images, accumulation 2, 2 epochs: updates are [0, 1], [2] | [0, 1], [2]. At a learning rate
    too small to move the weights, each update's loss must be its micro-batches' mean loss by hand,
    and its gradient the mean of the gradients one-micro-batch updates get for the same samples;
    the leftover batch of epoch 0 must not leak into epoch 1."""
    three = make_images(tmp_path / "three", n=3)
    still = ["--learning_rate", 1e-12, "--center_crop", "--num_train_epochs", 2, "--max_train_steps", None]
    run_train(*train_args(tiny_model, three, tmp_path / "acc2", *still, "--gradient_accumulation_steps", 2))
    accumulated, recorded_gradients[:] = list(recorded_gradients), []
    run_train(*train_args(tiny_model, three, tmp_path / "acc1", *still))
    single = list(recorded_gradients)
    assert len(accumulated) == 4 and len(single) == 6
    groups = [[0, 1], [2], [3, 4], [5]]  # the six samples of two epochs, by update
    for update, group in enumerate(groups):
        want = np.mean([single[i] for i in group], axis=0)
        worst = float(np.abs(accumulated[update] - want).max())
        assert worst <= 1e-4 * float(np.abs(want).max()), (update, worst)
    hand = ByHand(tiny_model, three)
    losses = [hand.sample_loss(epoch, p) for epoch in (0, 1) for p in range(3)]
    logged = logged_scalars(tmp_path / "acc2", "train/loss")
    for update, group in enumerate(groups):
        assert logged[update + 1] == pytest.approx(np.mean([losses[i] for i in group]), rel=1e-4), update


# ----------------------------------------------------------------------------------------------
# Resume


def same_weights(a, b):
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def test_resume_under_cosine_with_warmup_equals_the_uninterrupted_run(tiny_model, instance_dir, tmp_path):
    schedule = ["--lr_scheduler", "cosine", "--lr_warmup_steps", 1, "--learning_rate", 1e-2,
                "--max_train_steps", 5, "--save_steps", 2]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_train(*train_args(tiny_model, instance_dir, whole, *schedule))
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    run_train(*train_args(tiny_model, instance_dir, resumed, *schedule, "--resume_from_checkpoint", "latest"))
    lr_whole, lr_resumed = logged_scalars(whole, "train/lr"), logged_scalars(resumed, "train/lr")
    assert sorted(lr_resumed) == [3, 4, 5]
    assert [lr_resumed[s] for s in (3, 4, 5)] == pytest.approx([lr_whole[s] for s in (3, 4, 5)], rel=1e-6)
    assert lr_whole[3] > lr_whole[4] > lr_whole[5] > 0, "the schedule must decay for the test to mean anything"
    assert same_weights(whole, resumed) == 0


@pytest.fixture(scope="module")
def six_updates(tiny_model, instance_dir, tmp_path_factory):
    """An uninterrupted 6-update run with checkpoints every 2 updates."""
    out = tmp_path_factory.mktemp("six") / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 6, "--save_steps", 2))
    return out


def test_resume_from_an_older_checkpoint_with_a_longer_max_train_steps(tiny_model, instance_dir, tmp_path,
                                                                       six_updates, capsys):
    """A 4-update run, resumed from its checkpoint-2 (not the latest, checkpoint-4) and extended to 6
    updates, ends with the weights of the uninterrupted 6-update run."""
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 4, "--save_steps", 2))
    capsys.readouterr()
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 6, "--save_steps", 2,
                          "--resume_from_checkpoint", out / "checkpoint-2"))
    assert "checkpoint-2 at update 2" in capsys.readouterr().out
    assert same_weights(out, six_updates) == 0


def test_checkpoint_2_holds_exactly_the_weights_of_a_2_update_run(tiny_model, instance_dir, tmp_path, six_updates):
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "two", "--max_train_steps", 2))
    assert same_weights(six_updates / "checkpoint-2", tmp_path / "two") == 0
    assert same_weights(six_updates / "checkpoint-4", tmp_path / "two") > 0


# Each flag a resumed run must keep, and how to change it on the command line.
RESUME_INVARIANT = {
    "pretrained_model_name_or_path": ["--pretrained_model_name_or_path", "another/model"],
    "train_batch_size": ["--train_batch_size", 3],
    "gradient_accumulation_steps": ["--gradient_accumulation_steps", 2],
    "seed": ["--seed", 7], "height": ["--resolution", None, "--height", 128, "--width", 64],
    "width": ["--resolution", None, "--height", 64, "--width", 128],
    "with_prior_preservation": ["--with_prior_preservation", "--class_data_dir", "classes"],
    "train_text_encoder": ["--train_text_encoder"], "center_crop": ["--center_crop"], "random_flip": ["--random_flip"],
    "instance_prompt": ["--instance_prompt", "a photo of zwx cat"],
    "class_prompt": ["--class_prompt", "a photo of cat"],
    "num_class_images": ["--num_class_images", 5], "learning_rate": ["--learning_rate", 0.5],
    "lr_scheduler": ["--lr_scheduler", "cosine"], "use_lora": ["--use_lora"], "lora_rank": ["--lora_rank", 8],
    "lora_alpha": ["--lora_alpha", 16],
    "pretrained_vae_model_name_or_path": ["--pretrained_vae_model_name_or_path", "another/vae"],
    "world_size": [],  # written into the checkpoint below: as if 2 processes had trained it
}


@pytest.fixture(scope="module")
def first_checkpoint(tiny_model, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("invariant") / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--class_prompt", CLASS_PROMPT, "--max_train_steps", 1,
                          "--save_steps", 1, "--diagnostics_steps", 0))
    with open(out / "checkpoint-1" / "training_state.json") as f:
        return json.load(f)


@pytest.mark.parametrize("flag", sorted(RESUME_INVARIANT))
def test_resume_refuses_a_changed_invariant_flag(tiny_model, instance_dir, tmp_path, first_checkpoint, flag):
    """The trainer's own checkpoint, resumed with one flag changed on the command line (or, for the
    number of processes, as a 2-process run would have written it). The check comes before anything
    is loaded, so only training_state.json is needed."""
    import train_dreambooth

    state = json.loads(json.dumps(first_checkpoint))
    if flag == "world_size":
        state["world_size"] = 2
        state["args"].update({k: 2 for k in state["args"] if k == "world_size"})
    out = tmp_path / "out"
    os.makedirs(out / "checkpoint-1")
    (out / "checkpoint-1" / "training_state.json").write_text(json.dumps(state))
    shown = "number of processes" if flag == "world_size" else flag
    with pytest.raises(train_dreambooth.DreamBoothError, match=f"--{shown} is .* trained with"):
        run_train(*train_args(tiny_model, instance_dir, out, "--class_prompt", CLASS_PROMPT,
                              *RESUME_INVARIANT[flag], "--resume_from_checkpoint", "latest"))
    assert sorted(os.listdir(out)) == ["checkpoint-1"], "a refused resume writes nothing"


# ----------------------------------------------------------------------------------------------
# Validation and diagnostics


def dropout_model(tiny_model, folder):
    """The tiny model with attention dropout in its text encoder: training with --train_text_encoder
    then depends on the encoder's mode and on Paddle's RNG, which validation must leave alone."""
    shutil.copytree(tiny_model, folder)
    path = os.path.join(folder, "text_encoder", "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(dict(config, attention_dropout=0.3), f)
    return str(folder)


def test_training_is_bit_identical_with_validation_and_diagnostics_on_a_model_with_dropout(
        tiny_model, instance_dir, tmp_path):
    model = dropout_model(tiny_model, tmp_path / "model")
    common = ["--train_text_encoder", "--max_train_steps", 3, "--class_prompt", CLASS_PROMPT]
    run_train(*train_args(model, instance_dir, tmp_path / "plain", *common, "--diagnostics_steps", 0))
    run_train(*train_args(model, instance_dir, tmp_path / "watched", *common, "--diagnostics_steps", 1,
                          "--validation_prompt", PROMPT, "--validation_steps", 1, "--num_validation_images", 1,
                          "--validation_num_inference_steps", 1))
    assert len(os.listdir(tmp_path / "watched" / "validation")) == 3
    for component in ("unet", "text_encoder"):
        plain, watched = load_weights(tmp_path / "plain", component), load_weights(tmp_path / "watched", component)
        assert all(np.array_equal(plain[k], watched[k]) for k in plain), component


def test_validation_samples_the_trained_weights_with_the_prompt_file(tiny_model, instance_dir, tmp_path):
    """The last grid equals, image for image, what the saved pipeline samples with the same seeds;
    the base model samples something else. Its prompts come from --validation_prompt_file."""
    import paddle
    from ppdiffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    import train_dreambooth

    prompts = ["a photo of sks dog", "a photo of dog on the beach"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 2, "--learning_rate", 1e-2,
                          "--validation_prompt_file", tmp_path / "prompts.txt", "--validation_steps", 2,
                          "--num_validation_images", 2, "--validation_num_inference_steps", 2))
    got = np.asarray(Image.open(out / "validation" / "step-000002.png"), dtype=int)

    def grid(folder):
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler").config)
        pipe.set_progress_bar_config(disable=True)
        rows = [(p, pipe([p] * 2, height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                         generator=[paddle.Generator().manual_seed(i) for i in range(2)]).images) for p in prompts]
        return np.asarray(train_dreambooth.image_grid(rows), dtype=int)

    assert np.abs(got - grid(str(out))).max() <= 2
    assert np.abs(got - grid(tiny_model)).max() > 10


def test_class_drift_at_step_0_is_measured_not_assumed(tiny_model, instance_dir, tmp_path, monkeypatch):
    """The step-0 row is a measurement: a reference moved by 0.1 everywhere gives a drift of 0.01
    there (an assumed 0 would hide a wrong reference); the true reference gives 0."""
    import diagnostics

    real = diagnostics.build_probes

    def shifted_reference(*a, **k):
        subject, klass = real(*a, **k)
        klass.reference = klass.reference + np.float32(0.1)
        return subject, klass

    common = ["--class_prompt", CLASS_PROMPT, "--diagnostics_steps", 10, "--max_train_steps", 1]
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "right", *common))
    monkeypatch.setattr(diagnostics, "build_probes", shifted_reference)
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "shifted", *common))
    drift = {name: [float(line.split(",")[2]) for line in open(tmp_path / name / "diagnostics.csv").readlines()[1:]]
             for name in ("right", "shifted")}
    assert drift["right"][0] == 0
    assert drift["shifted"][0] == pytest.approx(0.01, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Flags that had no test


def test_dataloader_workers_train_the_same_and_logging_steps_thins_the_log(tiny_model, instance_dir, tmp_path):
    """Random crops and flips prepared in a worker thread, 2 batches ahead of the 4 of the epoch, give
    the weights of the in-line run bit for bit; --logging_steps 2 logs updates 2 and 4 only."""
    common = ["--max_train_steps", 4, "--random_flip"]
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "inline", *common))
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "workers", *common, "--dataloader_num_workers", 1,
                          "--logging_steps", 2))
    assert same_weights(tmp_path / "inline", tmp_path / "workers") == 0
    assert sorted(logged_scalars(tmp_path / "workers", "train/loss")) == [2, 4]
    assert sorted(logged_scalars(tmp_path / "inline", "train/loss")) == [1, 2, 3, 4]


def test_export_half_through_the_trainer_is_the_saved_pipeline_in_float16(tiny_model, instance_dir, tmp_path):
    from safetensors.numpy import load_file

    import export_single_file

    out = tmp_path / "half-run"
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 1, "--export_single_file",
                          "--export_half"))
    got = load_file(str(out / "half-run.safetensors"))
    full = load_file(export_single_file.export_pipeline(str(out), str(tmp_path / "full.safetensors"))["path"])
    assert got.keys() == full.keys()
    floats = [k for k, v in full.items() if v.dtype == np.float32]
    assert len(floats) > len(full) // 2 and all(got[k].dtype == np.float16 for k in floats)
    for key, value in full.items():  # integer tensors (position ids) keep their type
        assert np.array_equal(got[key], value.astype(np.float16) if key in floats else value), key


def test_each_class_sampler_draws_what_its_scheduler_draws(tiny_model, tmp_path):
    """Class image i is the base pipeline's sample with the named scheduler (DDIM without clipping, unless the
    model's scheduler config asks for it), --class_guidance_scale and a generator seeded seed + i; the four samplers draw four different images, so a sampler that is ignored
    shows, and so does an ignored guidance scale."""
    import paddle
    import ppdiffusers
    from ppdiffusers import StableDiffusionPipeline

    import train_dreambooth

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    images = {}
    for sampler, scheduler in {"dpm_solver": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
                               "euler_a": "EulerAncestralDiscreteScheduler", "model": type(own).__name__}.items():
        folder = tmp_path / sampler
        args = train_dreambooth.parse_args(train_args(
            tiny_model, "x", tmp_path / "out", "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
            "--class_data_dir", folder, "--num_class_images", 1, "--class_inference_steps", 3,
            "--class_sampler", sampler))
        train_dreambooth.generate_class_images(train_dreambooth.read_concepts(args)[0], args, 1, 0, FULL_PRECISION)
        (name,) = os.listdir(folder)
        images[sampler] = np.asarray(Image.open(folder / name), dtype=int)
        assert "clip_sample" not in own.config  # so DDIM is told not to clip the latents
        pipe.scheduler = getattr(ppdiffusers, scheduler).from_config(own.config, clip_sample=False)
        want = pipe([CLASS_PROMPT], height=64, width=64, num_inference_steps=3,
                    generator=[paddle.Generator().manual_seed(0)]).images[0]
        assert np.abs(images[sampler] - np.asarray(want, dtype=int)).max() <= 2, sampler
    # DDIM's own default would clip the latents to [-1, 1] and draw another image
    pipe.scheduler = ppdiffusers.DDIMScheduler.from_config(own.config)
    clipped = pipe([CLASS_PROMPT], height=64, width=64, num_inference_steps=3,
                   generator=[paddle.Generator().manual_seed(0)]).images[0]
    assert np.abs(images["ddim"] - np.asarray(clipped, dtype=int)).max() > 10
    different = [(a, b) for a in images for b in images if a < b and np.abs(images[a] - images[b]).max() > 10]
    assert len(different) == 6, different
    # --class_guidance_scale is the guidance the pipeline samples with (the default 7.5 above)
    args = train_dreambooth.parse_args(train_args(
        tiny_model, "x", tmp_path / "out", "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
        "--class_data_dir", tmp_path / "guided", "--num_class_images", 1, "--class_inference_steps", 3,
        "--class_sampler", "model", "--class_guidance_scale", 2.0))
    train_dreambooth.generate_class_images(train_dreambooth.read_concepts(args)[0], args, 1, 0, FULL_PRECISION)
    (name,) = os.listdir(tmp_path / "guided")
    guided = np.asarray(Image.open(tmp_path / "guided" / name), dtype=int)
    pipe.scheduler = own
    want = pipe([CLASS_PROMPT], height=64, width=64, num_inference_steps=3, guidance_scale=2.0,
                generator=[paddle.Generator().manual_seed(0)]).images[0]
    assert np.abs(guided - np.asarray(want, dtype=int)).max() <= 2
    assert np.abs(guided - images["model"]).max() > 10


# ----------------------------------------------------------------------------------------------
# The environment of the caller


@pytest.mark.parametrize("outcome", ["finishes", "fails"])
def test_the_mkl_variable_is_set_for_the_run_only(tmp_path, monkeypatch, outcome):
    """On an AMD processor main() sets MKL_DEBUG_CPU_TYPE for its run; the caller's environment (a
    notebook, the test process, every subprocess they start later) gets it back unchanged."""
    import train_dreambooth

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx avx2\n")
    real_choose = train_dreambooth.choose_mkl_code_path
    monkeypatch.setattr(train_dreambooth, "choose_mkl_code_path", lambda: real_choose(os.environ, str(cpuinfo)))
    monkeypatch.delenv("MKL_DEBUG_CPU_TYPE", raising=False)
    during = []

    def train(args, mkl_code_path):
        during.append(os.environ.get("MKL_DEBUG_CPU_TYPE"))
        if outcome == "fails":
            raise train_dreambooth.DreamBoothError("stop")

    monkeypatch.setattr(train_dreambooth, "train", train)
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
    if outcome == "fails":
        with pytest.raises(train_dreambooth.DreamBoothError):
            run_train(*argv)
    else:
        run_train(*argv)
    assert during == ["5"]
    assert "MKL_DEBUG_CPU_TYPE" not in os.environ
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "")  # the user's own value, even empty, stays as it was
    with pytest.raises(train_dreambooth.DreamBoothError) if outcome == "fails" else contextlib.nullcontext():
        run_train(*argv)
    assert during == ["5", ""] and os.environ["MKL_DEBUG_CPU_TYPE"] == ""
