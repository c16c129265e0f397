"""Watch overfitting and language drift while DreamBooth trains (--diagnostics_steps).

Two small probe sets are fixed before the first update, on rank 0, from --seed:

- subject probes: the instance images, each with a fixed posterior sample, noise and timestep, and
  its instance prompt. subject_fit is the denoising MSE on them: the training loss without the
  training noise. It falls as the model learns the subject.
- class probes: latents the base model itself samples for the class prompt (unguided, as the
  prediction measured is the conditional one), with fixed noise and timesteps, and the base
  model's noise predictions on them. class_drift is the mean squared
  difference between the current predictions and those: how far the class word has moved.

The base predictions are computed once, so no copy of the base UNet is kept. Both sets are saved
to output_dir/diagnostics_probes.npz, so a resumed run measures against the same base.
Measuring uses its own NumPy generator and restores Paddle's RNG and the models' train/eval
modes, so a run trains exactly the same with or without diagnostics.
"""
import contextlib
import csv
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import paddle

import families
from families import Geometry

logger = logging.getLogger("dreambooth")

# Sized so that measuring every 100 updates, probe sets included, costs under 5% of a 400-update
# run at batch 1 (bench/DIAGNOSTICS_COST.md): a measurement is one forward pass of PROBES_PER_SET per set.
PROBES_PER_SET = 4
CLASS_SAMPLING_STEPS = 6  # at most: enough for DPM-Solver++ to leave pure noise behind, cheap to build
DIAGNOSTICS_STREAM = 4  # train_dreambooth.py's own random streams are 1-3
PROBE_FILE, CSV_FILE, PLOT_FILE = "diagnostics_probes.npz", "diagnostics.csv", "diagnostics.png"


@dataclass
class ProbeSet:
    prompts: np.ndarray  # [prompts] the set's distinct prompts
    prompt_of: np.ndarray  # [n] which prompt each probe uses
    noisy: np.ndarray  # [n, c, h, w] noised latents
    timesteps: np.ndarray  # [n]
    geometry: np.ndarray  # [n, 6] each probe's families.Geometry
    reference: np.ndarray  # [n, c, h, w] what a prediction is compared with


@contextlib.contextmanager
def measuring(*models):
    """Eval mode without gradients; the models' modes and Paddle's RNG state are put back after."""
    modes, rng = [m.training for m in models], paddle.get_rng_state()
    for model in models:
        model.eval()
    try:
        with paddle.no_grad():
            yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
        paddle.set_rng_state(rng)


def center_box(image, height, width):
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return left, top, left + width, top + height


def center_pixels(image, height, width):
    """The center crop of an already resized image, as the float32 CHW array in [-1, 1] the VAE takes."""
    crop = image.crop(center_box(image, height, width))
    return np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def subject_latents(instances, vae, args, rng):
    """PROBES_PER_SET posterior samples of instance images spread over the set (repeated when
    there are fewer images), their prompts and geometries."""
    picked = [instances[j * len(instances) // PROBES_PER_SET] for j in range(PROBES_PER_SET)]
    posteriors = {}
    for item in picked:  # one image at a time: a 512px VAE batch would be a memory spike
        if id(item) not in posteriors:
            pixels = paddle.to_tensor(center_pixels(item.image, args.height, args.width)[None], dtype=vae.dtype)
            dist = vae.encode(pixels).latent_dist
            posteriors[id(item)] = (dist.mean[0].astype("float32").numpy(), dist.std[0].astype("float32").numpy())
    latents = []
    for item in picked:
        mean, std = posteriors[id(item)]
        latents.append(families.vae_latents(mean + std * rng.standard_normal(mean.shape, dtype=np.float32), vae.config))
    geometry = [item.geometry(center_box(item.image, args.height, args.width), False) for item in picked]
    return np.stack(latents), [item.prompt for item in picked], geometry


def sampled_class_latents(class_prompts, family, parts, args, rng, autocast):
    """PROBES_PER_SET latents the base model samples for the class prompts (held out: not the class
    images it trains on), from starting noise of our own generator. No classifier-free guidance:
    drift is measured on the conditional prediction, so its probes come from it too."""
    pipe = family.pipeline(parts, family.sampling_scheduler(parts.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    prompts = [class_prompts[j % len(class_prompts)] for j in range(PROBES_PER_SET)]
    shape = (parts.denoiser.config.in_channels, args.height // pipe.vae_scale_factor,
             args.width // pipe.vae_scale_factor)
    start = paddle.to_tensor(rng.standard_normal((PROBES_PER_SET, *shape), dtype=np.float32))
    with autocast():
        latents = pipe(prompts, height=args.height, width=args.width, latents=start, output_type="latent",
                       guidance_scale=1.0, num_inference_steps=min(args.class_inference_steps,
                                                                   CLASS_SAMPLING_STEPS)).images
    # sampled at the trained size, uncropped
    geometry = [Geometry(args.height, args.width, 0, 0, args.height, args.width)] * PROBES_PER_SET
    return latents.astype("float32").numpy(), prompts, geometry


def noised_probes(latents, prompts, geometry, family, noise_scheduler, rng):
    """One probe per latent: the latent noised at a fixed time (the family's probe times); the reference
    is the training target."""
    noise = rng.standard_normal(latents.shape, dtype=np.float32)
    times = family.probe_times(rng, len(latents), noise_scheduler)
    noisy, timesteps, target, _ = family.noise_step(noise_scheduler, paddle.to_tensor(latents),
                                                    paddle.to_tensor(noise), times)
    distinct = sorted(set(prompts))
    return ProbeSet(prompts=np.array(distinct), prompt_of=np.array([distinct.index(p) for p in prompts]),
                    noisy=noisy.numpy(), timesteps=timesteps.numpy(), geometry=np.array(geometry, dtype=np.int64),
                    reference=target.numpy())


def predict(family, parts, probes, autocast):
    """The models' predictions on a probe set (call inside `measuring`)."""
    with autocast():
        cond = family.encode(parts.text_encoders, [family.tokenize(parts.tokenizers, str(p)) for p in probes.prompts])
        index = paddle.to_tensor(probes.prompt_of)
        pred = family.denoise(parts.denoiser, paddle.to_tensor(probes.noisy), paddle.to_tensor(probes.timesteps),
                              {k: paddle.gather(v, index) for k, v in cond.items()},
                              [Geometry(*g) for g in probes.geometry.tolist()])
    return pred.astype("float32").numpy()


def mean_squared_difference(a, b):
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def build_probes(args, family, concepts, instances, parts, autocast):
    """(subject probes, class probes or None) of the models as they are now: the base."""
    rng = np.random.default_rng([args.seed, DIAGNOSTICS_STREAM])
    with measuring(parts.denoiser, *parts.text_encoders.values()):
        latents, prompts, geometry = subject_latents(instances, parts.vae, args, rng)
        subject = noised_probes(latents, prompts, geometry, family, parts.noise_scheduler, rng)
        class_prompts = sorted({c["class_prompt"] for c in concepts if c.get("class_prompt")})
        if not class_prompts:
            logger.info("Diagnostics: no class prompt (--class_prompt), so class drift is not measured")
            return subject, None
        latents, prompts, geometry = sampled_class_latents(class_prompts, family, parts, args, rng, autocast)
        klass = noised_probes(latents, prompts, geometry, family, parts.noise_scheduler, rng)
        klass.reference = predict(family, parts, klass, autocast)
    return subject, klass


def save_probes(path, sets):
    arrays = {f"{name}.{field}": getattr(probes, field) for name, probes in sets.items() if probes is not None
              for field in ProbeSet.__dataclass_fields__}
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **arrays)
    os.replace(path + ".tmp", path)


def load_probes(path):
    with np.load(path) as saved:
        return [ProbeSet(**{f: saved[f"{name}.{f}"] for f in ProbeSet.__dataclass_fields__})
                if f"{name}.prompts" in saved else None for name in ("subject", "class")]


def read_rows(path, up_to_step):
    """The rows of an earlier diagnostics.csv up to a step: (step, subject_fit, class_drift or None)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = [(int(r["step"]), float(r["subject_fit"]), float(r["class_drift"]) if r["class_drift"] else None)
                for r in csv.DictReader(f)]
    return [r for r in rows if r[0] <= up_to_step]


def write_rows(path, rows):
    """All rows, written beside the file and renamed over it: a full disk never leaves a cut-off row."""
    with open(path + ".tmp", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["step", "subject_fit", "class_drift"])
        for step, fit, drift in rows:
            out.writerow([step, f"{fit:.8g}", "" if drift is None else f"{drift:.8g}"])
    os.replace(path + ".tmp", path)


def plot(path, runs):
    """runs: {label: rows}. Subject fit and class drift against step, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    fit_ax, drift_ax = fig.subplots(1, 2)
    for label, rows in runs.items():
        fit_ax.plot([r[0] for r in rows], [r[1] for r in rows], marker=".", label=label)
        measured = [(r[0], r[2]) for r in rows if r[2] is not None]
        if measured:
            drift_ax.plot(*zip(*measured), marker=".", label=label)
    fit_ax.set(title="subject fit (denoising MSE on the instance probes)", xlabel="update", ylabel="MSE")
    drift_ax.set(title="class drift (MSE from the base model's predictions)", xlabel="update", ylabel="MSE")
    for ax in (fit_ax, drift_ax):
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp", dpi=100, format="png")
    os.replace(path + ".tmp", path)


class Cost:
    """Seconds spent, wall and CPU (the CPU time is the fair figure on a busy machine)."""

    def __init__(self):
        self.seconds = self.cpu_seconds = 0.0

    @contextlib.contextmanager
    def counting(self):
        started, cpu_started = time.perf_counter(), time.process_time()
        yield
        self.seconds += time.perf_counter() - started
        self.cpu_seconds += time.process_time() - cpu_started


class Diagnostics:
    """Rank 0's measurements: scalars to the writer, rows to diagnostics.csv, the plot at the end."""

    def __init__(self, subject, klass, family, parts, autocast, writer, output_dir, rows, cost):
        self.subject, self.klass = subject, klass
        self.family, self.parts, self.autocast, self.writer = family, parts, autocast, writer
        self.output_dir, self.rows, self.cost = output_dir, rows, cost

    def measure(self, step):
        with self.cost.counting(), measuring(self.parts.denoiser, *self.parts.text_encoders.values()):
            fit = mean_squared_difference(predict(self.family, self.parts, self.subject, self.autocast),
                                          self.subject.reference)
            drift = None if self.klass is None else mean_squared_difference(
                predict(self.family, self.parts, self.klass, self.autocast), self.klass.reference)
        self.record(step, fit, drift)

    def record(self, step, fit, drift):
        self.writer.add_scalar("diag/subject_fit", fit, step)
        if drift is not None:
            self.writer.add_scalar("diag/class_drift", drift, step)
        self.rows.append((step, fit, drift))
        write_rows(os.path.join(self.output_dir, CSV_FILE), self.rows)

    def finish(self, step):
        """The last measurement (unless this update had one) and the plot."""
        if not self.rows or self.rows[-1][0] != step:
            self.measure(step)
        plot(os.path.join(self.output_dir, PLOT_FILE), {"": self.rows})
        first, last = self.rows[0], self.rows[-1]
        logger.info("Diagnostics: subject fit %.4g -> %.4g, class drift %s at update %d; they took %.1f s (%.1f CPU "
                    "s) in all (%s)", first[1], last[1], "-" if last[2] is None else f"{last[2]:.4g}", step,
                    self.cost.seconds, self.cost.cpu_seconds, os.path.join(self.output_dir, PLOT_FILE))


def start(args, family, concepts, instances, parts, autocast, writer, step):
    """Rank 0's Diagnostics before the first update of this run (update `step`), measuring the models
    of `parts` (unwrapped) as they train. A fresh run builds and saves the probe sets and measures the
    base model (a class drift other than 0 there would mean wrong probes); a resumed run reuses the
    saved probe sets."""
    probe_file, csv_file = os.path.join(args.output_dir, PROBE_FILE), os.path.join(args.output_dir, CSV_FILE)
    if step and os.path.isfile(probe_file):
        subject, klass = load_probes(probe_file)
        rows = read_rows(csv_file, step)
        write_rows(csv_file, rows)  # forget what an interrupted run measured after its checkpoint
        return Diagnostics(subject, klass, family, parts, autocast, writer, args.output_dir, rows, Cost())
    if step:
        logger.warning("Diagnostics: no %s from the start of this run, so class drift is measured from update %d",
                       probe_file, step)
    cost = Cost()
    with cost.counting():
        subject, klass = build_probes(args, family, concepts, instances, parts, autocast)
    save_probes(probe_file, {"subject": subject, "class": klass})
    write_rows(csv_file, [])
    diagnostics = Diagnostics(subject, klass, family, parts, autocast, writer, args.output_dir, [], cost)
    diagnostics.measure(step)
    return diagnostics
