#!/usr/bin/env python
"""DreamBooth fine-tuning of Stable Diffusion with PaddlePaddle and ppdiffusers.

    python -u train_dreambooth.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
        --instance_data_dir ./dream_image --instance_prompt "a photo of sks dog" --output_dir ./dream_outputs

Multi-GPU: python -u -m paddle.distributed.launch --gpus "0,1,2,3" train_dreambooth.py ...
The output folder loads with ppdiffusers.StableDiffusionPipeline.from_pretrained(output_dir).

Read top to bottom: arguments, data, models, the training loop, saving.
"""
import os
import signal
import sys


def signal_name(signum):
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def stopped_while_starting(signum, frame):
    """Until main() puts its own handlers in place nothing has been written: SIGTERM or Ctrl-C during
    the imports ends the program at once, in one line (not silently, nor with a traceback)."""
    os.write(2, f"train_dreambooth.py: stopped by {signal_name(signum)} while starting; nothing was written\n".encode())
    os._exit(130)  # INTERRUPTED_EXIT_CODE, which is defined after the imports this guards


if __name__ == "__main__":  # first thing, before the imports that take most of the start-up
    for _signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, stopped_while_starting)

import argparse
import collections
import contextlib
import gc
import hashlib
import importlib.util
import json
import logging
import math
import pickle
import random
import re
import shutil
import socket
import time
import warnings

import numpy as np
from PIL import Image, ImageOps

import families
from common import (FINISHED_MARKERS, LORA_TRAINING_STATE, OPTIMIZER_STATE, PIPELINE_ENTRIES, RNG_STATE,
                    TEXT_ENCODER_LORA, TRAINING_STATE, DreamBoothError, first_line, give_usual_file_modes,
                    parameter_count)

logger = logging.getLogger("dreambooth")

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif"}
# Schedulers for generating class images; few steps suffice for DPM-Solver.
CLASS_SAMPLERS = {"dpm_solver": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler",
                  "euler_a": "EulerAncestralDiscreteScheduler", "model": None}
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
# Updates skipped in a row (non-finite loss, fp16 overflow) before a run counts as diverged. fp16's
# loss scale starts high and halves on every other overflow, so a healthy run skips a few at most.
MAX_CONSECUTIVE_SKIPS = 25
# Independent random streams, so that e.g. changing augmentation never changes the noise.
ORDER_STREAM, AUGMENT_STREAM, NOISE_STREAM, CAPTION_STREAM = 1, 2, 3, 4
# Flags that must match between a run and its resumption: they change which batch, noise or
# model a step sees. Everything else may change on resume; a new --max_train_steps extends or
# shortens the run (and stretches a decaying lr schedule to the new length).
RESUME_INVARIANT_ARGS = [
    "pretrained_model_name_or_path", "train_batch_size", "gradient_accumulation_steps", "seed", "height", "width",
    "with_prior_preservation", "train_text_encoder", "center_crop", "random_flip", "world_size",
    "instance_prompt", "class_prompt", "num_class_images", "learning_rate", "lr_scheduler", "use_lora", "lora_rank",
    "lora_alpha", "pretrained_vae_model_name_or_path", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
    "max_sequence_length", "drop_t5",
]


class Interrupted(KeyboardInterrupt):
    """SIGTERM or Ctrl-C, reported as one line saying what was kept; exit code 130. A BaseException,
    as KeyboardInterrupt is, so that no library's `except Exception` swallows it."""


INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report Ctrl-C; also for SIGTERM


# ----------------------------------------------------------------------------------------------
# Arguments


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    """The command line; tools/flag_reference.py renders it into docs/flags.md."""
    p = OneLineErrorParser(description="DreamBooth training for Stable Diffusion (PaddlePaddle / ppdiffusers).",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="A ppdiffusers model id (e.g. CompVis/stable-diffusion-v1-4) or a local pipeline folder.")
    g.add_argument("--tokenizer_name", default=None, help="Tokenizer id or folder, if not the model's own.")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="A VAE folder or id to use instead of the model's own (e.g. an fp16-safe SDXL VAE); it is "
                        "also saved with the result.")
    g.add_argument("--instance_data_dir", default=None, help="Folder with the photos of your subject.")
    g.add_argument("--instance_prompt", default=None, help='Prompt naming the subject, e.g. "a photo of sks dog".')
    g.add_argument("--class_data_dir", default=None, help="Folder of class images for prior preservation.")
    g.add_argument("--class_prompt", default=None, help='Prompt of the subject\'s class, e.g. "a photo of dog".')
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="Also train on class images with the class prompt, to keep the class word's meaning.")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="Class images wanted; missing ones are generated with the base model.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size for generating class images.")
    g.add_argument("--class_sampler", default=None, choices=sorted(CLASS_SAMPLERS),
                   help="Scheduler that generates class images (the model's own: 'model'; default: dpm_solver, "
                        "for SD3 its own).")
    g.add_argument("--class_inference_steps", type=int, default=25, help="Sampling steps per class image.")
    g.add_argument("--class_guidance_scale", type=float, default=7.5,
                   help="Classifier-free guidance of the class images (a small or undertrained base model draws "
                        "oversaturated images at high guidance: try 3-5).")
    g.add_argument("--concepts_list", default=None,
                   help="JSON list of {instance_prompt, instance_data_dir, class_prompt, class_data_dir} to train "
                        "several subjects at once (replaces the four flags).")
    g.add_argument("--use_image_captions", action="store_true",
                   help="An image's caption file (photo.txt beside photo.png) replaces its instance prompt.")
    g.add_argument("--masked_loss", action="store_true",
                   help="Train the subject photos only where they are opaque: an instance image's alpha channel "
                        "(a PNG with transparency) weights its loss; images without one count everywhere.")
    g.add_argument("--caption_dropout_rate", type=float, default=0.0,
                   help="Share of training samples (instance and class) whose prompt is replaced by the empty "
                        "prompt, so the unconditional prediction that classifier-free guidance subtracts keeps "
                        "learning too.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Threads preparing upcoming batches (crops, noise) while the model trains.")
    g.add_argument("--height", type=int, default=None, help="Training image height (default 512).")
    g.add_argument("--width", type=int, default=None, help="Training image width (default 512).")
    g.add_argument("--resolution", type=int, default=None, help="Sets both --height and --width.")
    g.add_argument("--center_crop", action="store_true",
                   help="Center-crop images after resizing (default: random crop).")
    g.add_argument("--random_flip", action="store_true", help="Randomly flip training images horizontally.")
    g.add_argument("--cache_latents", dest="cache_latents", action="store_true", default=None,
                   help="Encode every image once (default: on when no random crop would be lost).")
    g.add_argument("--no_cache_latents", dest="cache_latents", action="store_false", help="Encode every step.")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="dreambooth-model", help="Where the trained pipeline is written.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Allow writing over a finished pipeline in --output_dir.")
    g.add_argument("--seed", type=int, default=None, help="Random seed (default: drawn and logged).")
    g.add_argument("--train_text_encoder", action="store_true", help="Also train the text encoder.")
    g.add_argument("--use_lora", action="store_true",
                   help="Train LoRA adapters on the UNet attention projections (and the text encoder's with "
                        "--train_text_encoder) instead of the whole models.")
    g.add_argument("--lora_rank", type=int, default=4, help="Rank of the LoRA adapters.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank (default: rank).")
    g.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Optimizer updates to run; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches accumulated per optimizer update.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for activation memory.")
    g.add_argument("--learning_rate", type=float, default=5e-6)
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by accumulation x batch size x number of processes.")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup length in optimizer updates.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.02)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=None, help="Clip the global gradient norm (None: off).")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (0 = off).")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (None = off).")
    g.add_argument("--skip_nonfinite_steps", action="store_true",
                   help="Skip an update whose loss is NaN or infinite instead of stopping.")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="Paddle AMP for the forward pass; trained weights stay fp32, frozen models are cast.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Memory-efficient attention (needs a GPU build of Paddle that supports it).")

    g = p.add_argument_group("Stable Diffusion 3 (flow matching)")
    g.add_argument("--weighting_scheme", default="none",
                   choices=["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"],
                   help="Timestep density (logit_normal, mode) or loss weighting (cosmap, sigma_sqrt); none: uniform.")
    g.add_argument("--logit_mean", type=float, default=0.0, help="Mean of --weighting_scheme logit_normal.")
    g.add_argument("--logit_std", type=float, default=1.0,
                   help="Standard deviation of --weighting_scheme logit_normal.")
    g.add_argument("--mode_scale", type=float, default=1.29, help="Scale of --weighting_scheme mode.")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5 prompt tokens (default: the CLIP tokenizer's length, 77, which ppdiffusers' pipeline "
                        "gives T5).")
    g.add_argument("--drop_t5", action="store_true",
                   help="Train without T5: zero embeddings in its place, as the pipeline without T5; T5 is not "
                        "loaded, and a full fine-tune is saved without it.")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", action="append", default=None,
                   help="Prompt sampled during training; repeat the flag for several.")
    g.add_argument("--validation_prompt_file", default=None, help="File with one validation prompt per line.")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    g.add_argument("--validation_steps", type=int, default=100, help="Validate every this many updates.")
    g.add_argument("--validation_guidance_scale", type=float, default=7.5)
    g.add_argument("--validation_num_inference_steps", type=int, default=25)

    g = p.add_argument_group("saving and logging")
    g.add_argument("--save_steps", "--checkpointing_steps", dest="save_steps", type=int, default=500,
                   help="Save output_dir/checkpoint-<step> every this many optimizer updates.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder to resume from.')
    g.add_argument("--export_single_file", action="store_true",
                   help="After the final save, also write output_dir/<name of output_dir>.safetensors for Stable "
                        "Diffusion WebUI / ComfyUI: a full SD 1.x or SDXL checkpoint, or with --use_lora a "
                        "kohya-layout LoRA (see docs/lora_and_export.md; not for SD3).")
    g.add_argument("--export_half", action="store_true",
                   help="With --export_single_file: store that file in float16 (half the size).")
    g.add_argument("--logging_dir", default="logs", help="Log folder, under output_dir.")
    g.add_argument("--writer_type", "--report_to", dest="writer_type", default="visualdl",
                   choices=["visualdl", "tensorboard"], help="Where scalars are logged.")
    g.add_argument("--logging_steps", type=int, default=1, help="Log scalars every this many updates.")
    g.add_argument("--print_memory_estimate", action="store_true",
                   help="Log an estimate of the GPU memory this run needs (weights, gradients, AdamW states, "
                        "rough UNet activations) for the loaded model; see docs/memory.md.")
    g.add_argument("--diagnostics_steps", type=int, default=100,
                   help="Every this many updates, measure subject fit and class drift on fixed probes "
                        "(output_dir/diagnostics.csv and .png; see docs/diagnostics.md). 0: off.")

    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    if args.resolution is not None:
        for flag in ("height", "width"):
            if getattr(args, flag) not in (None, args.resolution):
                raise DreamBoothError(f"--resolution {args.resolution} contradicts --{flag} {getattr(args, flag)}; "
                                      "give one of them")
            setattr(args, flag, args.resolution)
    args.height = args.height or 512
    args.width = args.width or 512
    for flag in ("height", "width"):
        if getattr(args, flag) <= 0 or getattr(args, flag) % 8:
            raise DreamBoothError(f"--{flag} {getattr(args, flag)} must be a positive multiple of 8 "
                                  "(the VAE downsamples by 8)")
    if args.concepts_list:
        given = [f for f in ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt")
                 if getattr(args, f)]
        if given:
            raise DreamBoothError(f"--concepts_list replaces --{', --'.join(given)}; put them in the JSON file")
    else:
        for flag in ("instance_data_dir", "instance_prompt"):
            if not getattr(args, flag):
                raise DreamBoothError(f"--{flag} is required (or give --concepts_list)")
    if args.validation_prompt_file:
        if not os.path.isfile(args.validation_prompt_file):
            raise DreamBoothError(f"--validation_prompt_file {args.validation_prompt_file}: no such file")
        with open(args.validation_prompt_file, encoding="utf-8") as f:
            args.validation_prompt = (args.validation_prompt or []) + [ln.strip() for ln in f if ln.strip()]
    positive = ["lora_rank", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "sample_batch_size",
                "save_steps", "logging_steps", "class_inference_steps", "num_validation_images",
                "validation_steps", "validation_num_inference_steps"]
    positive += [f for f in ("max_train_steps", "checkpoints_total_limit") if getattr(args, f) is not None]
    for flag in positive:
        if getattr(args, flag) <= 0:
            raise DreamBoothError(f"--{flag} must be a positive number, got {getattr(args, flag)}")
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.export_half and not args.export_single_file:
        raise DreamBoothError("--export_half only applies to --export_single_file; add that flag or drop this one")
    if args.learning_rate <= 0:
        raise DreamBoothError(f"--learning_rate must be positive, got {args.learning_rate}")
    for flag in ("adam_beta1", "adam_beta2", "caption_dropout_rate"):
        if not 0 <= getattr(args, flag) < 1:
            raise DreamBoothError(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if args.adam_epsilon <= 0:
        raise DreamBoothError(f"--adam_epsilon must be positive, got {args.adam_epsilon}")
    if args.max_grad_norm is not None and args.max_grad_norm <= 0:
        raise DreamBoothError(f"--max_grad_norm must be positive (omit it to disable clipping), got {args.max_grad_norm}")
    for flag in ("lr_warmup_steps", "num_class_images", "prior_loss_weight", "noise_offset", "adam_weight_decay", "diagnostics_steps",
                 "dataloader_num_workers", "class_guidance_scale"):
        if getattr(args, flag) < 0:
            raise DreamBoothError(f"--{flag} must not be negative, got {getattr(args, flag)}")
    model = args.pretrained_model_name_or_path
    if os.path.exists(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise DreamBoothError(f"--pretrained_model_name_or_path {model}: not a Stable Diffusion pipeline folder "
                              "(no model_index.json); give a model id or a folder saved by save_pretrained")
    if args.writer_type == "tensorboard" and importlib.util.find_spec("tensorboardX") is None:
        raise DreamBoothError("--writer_type tensorboard needs tensorboardX: pip install tensorboardX")
    if args.with_prior_preservation and not args.concepts_list:
        if not args.class_prompt:
            raise DreamBoothError("--with_prior_preservation needs --class_prompt (e.g. \"a photo of dog\")")
        if not args.class_data_dir:
            raise DreamBoothError("--with_prior_preservation needs --class_data_dir (a folder; missing class "
                                  "images are generated there)")


# ----------------------------------------------------------------------------------------------
# Images


def list_images(folder, flag, must_exist=True):
    """Image files of a folder, sorted; other files are skipped with one warning."""
    if not os.path.isdir(folder):
        if not must_exist:
            return []
        raise DreamBoothError(f"{flag} {folder}: no such folder; point {flag} at a folder of images")
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    images = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    skipped = [n for n in names if n not in images and not n.endswith(".txt")]
    if skipped:
        logger.warning("%s %s: skipping %d non-image files: %s", flag, folder, len(skipped), ", ".join(skipped))
    return [os.path.join(folder, n) for n in images]


def open_rgb(path, with_alpha=False):
    """Decode any image mode to 8-bit RGB, upright as the camera meant (EXIF orientation). Transparent
    parts are seen over white, unless with_alpha: then (the colours as stored, the alpha channel as an
    "L" image or None when there is none), for --masked_loss, to which alpha is a weight."""
    with warnings.catch_warnings():  # PIL warns above half its limit; said in words below instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(path)
    if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        logger.warning("%s has %dx%d = %s pixels: decoding it takes much memory; downscale it", path,
                       image.width, image.height, f"{image.width * image.height:,}")
    with image:
        image.load()
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: 65535 is white, as 255 is in 8 bits
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":  # float grey has no fixed white: scale its own range
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((values * (255.0 / (values.max() or 1.0))).clip(0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if with_alpha:
        return image.convert("RGB"), image.convert("RGBA").getchannel("A") if has_alpha else None
    if has_alpha:
        rgba = image.convert("RGBA")  # transparent parts become white, not black
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_images(paths, flag, with_alpha=False):
    """Decode every file; all unreadable files are named in one error. with_alpha: (image, alpha) pairs."""
    images, bad, huge = [], [], []
    for path in paths:
        try:
            images.append(open_rgb(path, with_alpha))
        except Image.DecompressionBombError:
            width, height = image_size(path)
            huge.append(f"{path} has {width}x{height} = {width * height:,} pixels")
        except Image.UnidentifiedImageError:
            bad.append(f"{path} (not an image format PIL can read)")
        except Exception as e:  # PIL raises many types for corrupt files
            bad.append(f"{path} ({first_line(e)})")
    if huge:
        raise DreamBoothError(f"{flag}: {len(huge)} image(s) too large to decode safely: {'; '.join(huge)}; the limit "
                              f"is {2 * Image.MAX_IMAGE_PIXELS:,} pixels: downscale them (training uses only "
                              "a few hundred pixels a side)")
    if bad:
        raise DreamBoothError(f"{flag}: cannot read {len(bad)} image file(s): {'; '.join(bad)}; "
                              "remove or re-save them")
    return images


def image_size(path):
    """(width, height) from the file's header, even above PIL's decompression-bomb limit (nothing is decoded)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def resize_to_cover(image, height, width):
    """Scale so the image just covers height x width, keeping its aspect ratio (no squashing)."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image.resize(size, Image.BICUBIC) if size != image.size else image


def crop_box(image, height, width, center, rng):
    dx, dy = image.width - width, image.height - height
    x, y = (dx // 2, dy // 2) if center else (int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1)))
    return x, y, x + width, y + height


def to_pixels(image, flip):
    """PIL RGB -> float32 CHW array in [-1, 1], as the VAE expects."""
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


class TrainImage:
    """One training image, decoded and resized once; crops and flips are drawn per step."""

    def __init__(self, image, prompt, args, mask=None):
        self.original_size = (image.height, image.width)
        self.image = resize_to_cover(image, args.height, args.width)
        self.mask = mask if mask is None else mask.resize(self.image.size, Image.BICUBIC)
        self.prompt = prompt
        self.random_crop = not args.center_crop and self.image.size != (args.width, args.height)

    def augmentation(self, rng, args):
        """(crop box, flip) drawn from rng."""
        box = crop_box(self.image, args.height, args.width, not self.random_crop, rng)
        return box, args.random_flip and rng.random() < 0.5

    def pixels(self, rng, args):
        box, flip = self.augmentation(rng, args)
        return to_pixels(self.image.crop(box), flip), flip

    def loss_mask(self, box, flip, latent_hw):
        """The crop's loss weight per latent pixel (the mean opacity of the pixels it covers), or None."""
        if self.mask is None:
            return None
        mask = self.mask.crop(box)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT) if flip else mask
        opacity = np.asarray(mask, dtype=np.float32) / 255.0
        (h, w), (fh, fw) = latent_hw, (mask.height // latent_hw[0], mask.width // latent_hw[1])
        return opacity[:h * fh, :w * fw].reshape(h, fh, w, fw).mean(axis=(1, 3))

    def geometry(self, box, flip):
        """The sample's families.Geometry. A flipped crop is the crop of the mirrored image at the
        mirrored place, so its left edge is measured from the right."""
        left, top, right, bottom = box
        return families.Geometry(*self.original_size, top, self.image.width - right if flip else left,
                                 bottom - top, right - left)


# ----------------------------------------------------------------------------------------------
# The machine: CPU kernels, processes


def choose_mkl_code_path(environ=os.environ, cpuinfo="/proc/cpuinfo"):
    """On AMD processors with AVX2, tell MKL to use its AVX2 code; returns the value set, or None.

    The MKL in Paddle's CPU wheels picks its code by the processor's vendor, not its instruction set,
    and gives AMD processors its slowest code: on the benchmark's AMD EPYC every conv and matmul ran
    ~2.5x slower, a whole update 1.5-1.9x (bench/RESULTS.md). MKL reads MKL_DEBUG_CPU_TYPE at its
    first call, so this runs before any Paddle op. Intel processors are left to MKL, and so is a value
    the user set (an empty one keeps MKL's own choice)."""
    if "MKL_DEBUG_CPU_TYPE" in environ:
        return None
    try:
        with open(cpuinfo) as f:
            first_processor = f.read(1 << 16).split("\n\n")[0]
    except OSError:  # not Linux: leave MKL alone
        return None
    fields = {key.strip(): value.strip() for key, value in
              (line.split(":", 1) for line in first_processor.splitlines() if ":" in line)}
    if fields.get("vendor_id") == "AuthenticAMD" and "avx2" in fields.get("flags", "").split():
        environ["MKL_DEBUG_CPU_TYPE"] = "5"
        return "5"
    return None


def world():
    import paddle.distributed as dist

    return dist.get_world_size(), dist.get_rank()


def on_every_rank(holds):
    """Whether `holds` is true on every rank: one all-reduce, so all ranks take the same decision."""
    import paddle
    import paddle.distributed as dist

    if dist.get_world_size() == 1:
        return bool(holds)
    failures = paddle.to_tensor([0.0 if holds else 1.0])
    dist.all_reduce(failures)
    return failures.item() == 0


def check_shared_output_dir(output_dir, world_size, rank):
    """Rank 0 alone writes checkpoints and the result, and every rank reads a checkpoint to resume
    (its weights, the optimizer and its own RNG state): with several machines, --output_dir must be
    one folder they share. Checked at the start, not at the first checkpoint or at resume time."""
    import paddle
    import paddle.distributed as dist

    token = paddle.to_tensor([random.SystemRandom().randrange(2**31)], dtype="int64")
    if dist.get_world_size() > 1:
        dist.broadcast(token, src=0)
    probe = os.path.join(output_dir, f".shared-check-{token.item()}")  # this run's own name: no stale file counts
    if rank == 0:
        with saving(output_dir, "choose a folder you can write to"), open(probe, "w"):
            pass
    barrier()
    shared = on_every_rank(os.path.isfile(probe))
    barrier()
    if rank == 0:
        os.remove(probe)
    if not shared:
        raise DreamBoothError(f"--output_dir {output_dir}: the {world_size} processes do not all see rank 0's "
                              "files; on several machines it must be a folder they share (NFS or the like), or "
                              "checkpoints cannot resume (see docs/multi_node.md)")


def barrier():
    import paddle.distributed as dist

    if dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Models


# Compute capability each half dtype needs for Paddle's AMP on NVIDIA GPUs (below it, Paddle only
# warns and trains in fp32, after the frozen models were already cast: the first step would fail).
AMP_MIN_CAPABILITY = {"float16": (7, 0), "bfloat16": (8, 0)}


def amp_dtype(mixed_precision):
    """The half dtype of --mixed_precision (None for "no"), after checking that this device runs it:
    one line before anything is loaded or cast, instead of Paddle's warning and a failed first step."""
    import paddle

    if mixed_precision == "no":
        return None
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[mixed_precision]
    device = paddle.device.get_device()
    if device.startswith("cpu"):
        raise DreamBoothError(f"--mixed_precision {mixed_precision}: Paddle's mixed precision runs on a GPU only "
                              "(on a CPU it would silently train in fp32); drop the flag")
    if device.startswith("gpu") and not paddle.is_compiled_with_rocm():
        capability = tuple(paddle.device.cuda.get_device_capability())
        needed = AMP_MIN_CAPABILITY[dtype]
        if capability < needed:
            fallback = "fp16" if dtype == "bfloat16" and capability >= AMP_MIN_CAPABILITY["float16"] else "no"
            raise DreamBoothError(
                f"--mixed_precision {mixed_precision}: this GPU ({paddle.device.cuda.get_device_name()}, compute "
                f"capability {capability[0]}.{capability[1]}) has no {dtype} support (it needs {needed[0]}.{needed[1]} "
                f"or newer); use --mixed_precision {fallback}")
    return dtype


def autocast_factory(dtype):
    """The precision context of every forward pass, training and sampling alike. Trained weights stay
    fp32 (AMP O1); only the frozen models are held in the half dtype."""
    import paddle

    if dtype is None:
        return contextlib.nullcontext
    return lambda: paddle.amp.auto_cast(dtype=dtype, level="O1")


def grad_scaler(dtype):
    """fp16 needs loss scaling; bf16 has fp32's range and does not."""
    import paddle

    return paddle.amp.GradScaler(init_loss_scaling=2.0**15) if dtype == "float16" else None


def optimizer_step(optimizer, scaler):
    """One optimizer step; False when the GradScaler skipped it because fp16 gradients overflowed."""
    if scaler is None:
        optimizer.step()
        return True
    scaler.step(optimizer)
    # Paddle records the overflow check of this step here (a bool or a bool tensor); no public accessor.
    overflowed = bool(getattr(scaler, "_cache_found_inf", False))
    scaler.update()
    return not overflowed


def enable_memory_efficient_attention(unet):
    from ppdiffusers.utils import is_ppxformers_available

    if not is_ppxformers_available():
        raise DreamBoothError("--enable_xformers_memory_efficient_attention: this Paddle build has no memory-"
                              "efficient attention (it needs a GPU build); drop the flag")
    unet.enable_xformers_memory_efficient_attention()


def add_lora_adapters(unet, args, projections=families.SD.lora_projections):
    """Freeze the UNet and give the named projections of every attention layer a ppdiffusers
    LoRALinearLayer; returns the number of trainable parameters."""
    return families.add_attention_lora(unet, projections, args.lora_rank, args.lora_alpha)


def add_text_encoder_lora(text_encoder, rank, alpha, skip=()):
    """Freeze the text encoder and wrap each self-attention projection in ppdiffusers'
    PatchedLoraProjection (alpha None: scale 1), except under the parameter prefixes `skip`; returns
    the number of trainable parameters."""
    from ppdiffusers.models.lora import PatchedLoraProjection, text_encoder_attn_modules

    for p in text_encoder.parameters():
        p.stop_gradient = True
    try:
        attentions = text_encoder_attn_modules(text_encoder)
    except ValueError as e:
        raise DreamBoothError(f"--use_lora --train_text_encoder: {first_line(e)}; LoRA covers CLIP text encoders "
                              "only, drop --train_text_encoder") from e
    for path, attention in attentions:
        if f"{path}.".startswith(tuple(skip)):
            continue
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(attention, name, PatchedLoraProjection(getattr(attention, name), network_alpha=alpha, rank=rank))
    return parameter_count(p for p in text_encoder.parameters() if not p.stop_gradient)


def lora_state_for_loading(family, denoiser, text_encoders, args):
    """(denoiser, text-encoder) LoRA weights as the loaders read them: their loaders know no alpha, so
    the scale alpha / rank is folded into the up projections. The text encoders' ("<component>.<key>")
    is empty unless trained."""
    scale = args.lora_alpha / args.lora_rank
    text_state = {f"{name}.{k}": v * scale if ".up." in k else v for name, encoder in text_encoders.items()
                  for k, v in encoder.state_dict().items() if ".lora_linear_layer." in k}
    return family.denoiser_lora_state(denoiser, args.lora_rank, args.lora_alpha), text_state


def lora_training_state(models):
    """The LoRA parameters of every model, unscaled, keyed "<model>.<parameter>", for resuming."""
    return {f"{label}.{name}": p for label, model in models.items() for name, p in model.named_parameters()
            if not p.stop_gradient}


def load_lora(pipe, folder):
    """Load a --use_lora result into a pipeline of its base model: the denoiser's LoRA as its family
    loads it (ppdiffusers' load_lora_weights; for SD3 without the environment variable that needs), the
    text encoders' LoRA (if trained) into ppdiffusers' PatchedLoraProjection layers.

        from train_dreambooth import load_lora
        load_lora(StableDiffusionPipeline.from_pretrained(base), output_dir)
    """
    import paddle
    from safetensors.numpy import load_file

    families.FAMILIES[type(pipe).__name__].load_denoiser_lora(pipe, folder)
    path = os.path.join(folder, TEXT_ENCODER_LORA)
    if not os.path.isfile(path):
        return pipe
    by_encoder = {}
    for key, value in load_file(path).items():
        name, _, rest = key.partition(".")
        by_encoder.setdefault(name, {})[rest] = value
    for name, state in by_encoder.items():
        encoder = getattr(pipe, name, None)
        if encoder is None:
            raise ValueError(f"{path}: LoRA weights for {name}, which this pipeline does not have")
        rank = next(v.shape[1] for k, v in state.items() if k.endswith(".down.weight"))  # down is [in, rank]
        add_text_encoder_lora(encoder, rank, alpha=None)
        own = encoder.state_dict()
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} weights match no layer of {name}, e.g. {unknown[0]}")
        for key, value in state.items():
            own[key].set_value(paddle.to_tensor(value, dtype=own[key].dtype))
        encoder.eval()
    return pipe


def frozen_on_host(frozen):
    """family.load's place(): a frozen model (`frozen`: its component name -> the dtype it runs in, None
    for fp32) is loaded in host memory and moved to the device in that dtype (cast tensor by tensor on
    the way), so the device never holds it in fp32 next to the rest; the trained ones load on the
    device as they are. On a CPU the move is a no-op and nothing is cast."""
    import paddle

    def place(name, loader):
        if name not in frozen:
            return loader()
        with on_host():
            model = loader()
        return model.to(device=paddle.get_device(), dtype=frozen[name])
    return place


def park(models):
    """Move frozen models whose per-step work is cached (the VAE with cached latents, a frozen text
    encoder) to host memory: on a GPU their memory goes to training. `borrowed` brings them back
    for validation and diagnostics. On a CPU both are no-ops, so the same code runs everywhere."""
    import paddle

    for model in models:
        model.to(device="cpu")
    if paddle.device.is_compiled_with_cuda():
        paddle.device.cuda.empty_cache()
    return models


@contextlib.contextmanager
def borrowed(parked):
    import paddle

    for model in parked:
        model.to(device=paddle.get_device())
    try:
        yield
    finally:
        park(parked)


def identifier_words(concepts):
    """The words of an instance prompt that its class prompt lacks ("sks" in "a photo of sks dog" against
    "a photo of dog"): the rare tokens subjects are learned under. Concepts without a class prompt add none."""
    return {w for c in concepts if c.get("class_prompt")
            for w in c["instance_prompt"].split() if w not in c["class_prompt"].split()}


def check_prompts(tokenizer, concepts, instances, validation_prompts):
    """The tokenizer keeps model_max_length tokens of a prompt: warn when it cuts one, saying how much,
    and refuse when the cut drops an identifier from an instance prompt or caption."""
    identifiers = identifier_words(concepts)
    for prompt in sorted({it.prompt for it in instances}):
        check_prompt_length(tokenizer, prompt, [w for w in prompt.split() if w in identifiers])
    for prompt in validation_prompts or []:
        check_prompt_length(tokenizer, prompt)


def check_prompt_length(tokenizer, prompt, identifier=None):
    limit = tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=False, return_attention_mask=False)["input_ids"]
    if len(ids) <= limit:
        return
    dropped = len(ids) - limit
    kept = list(tokenize(tokenizer, prompt)[0])  # the ids, without the attention mask
    for word in identifier or []:
        word_ids = list(tokenizer(word, add_special_tokens=False, return_attention_mask=False)["input_ids"])
        inside = any(kept[i:i + len(word_ids)] == word_ids for i in range(len(kept) - len(word_ids) + 1))
        if word_ids and not inside:
            raise DreamBoothError(f"the prompt {prompt!r} is {len(ids)} tokens, the tokenizer keeps {limit}, and the "
                                  f"{dropped} it drops hold the identifier {word!r}; shorten the prompt or put "
                                  f"{word!r} nearer its start")
    logger.warning("The prompt %r is %d tokens; the tokenizer keeps %d, so its last %d are dropped", prompt,
                   len(ids), limit, dropped)


def tokenize(tokenizer, prompt):
    """(input ids, attention mask), padded to the tokenizer's length."""
    tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                       return_attention_mask=True)
    return tokens["input_ids"], tokens["attention_mask"]


# ----------------------------------------------------------------------------------------------
# Prior preservation: class images


def read_concepts(args):
    """The subjects to train: the flags' one, or each entry of --concepts_list."""
    if not args.concepts_list:
        return [dict(instance_prompt=args.instance_prompt, instance_data_dir=args.instance_data_dir,
                     class_prompt=args.class_prompt, class_data_dir=args.class_data_dir)]
    try:
        with open(args.concepts_list, encoding="utf-8") as f:
            concepts = json.load(f)
    except (OSError, ValueError) as e:
        raise DreamBoothError(f"--concepts_list {args.concepts_list}: cannot read it as JSON ({e})")
    needed = ["instance_prompt", "instance_data_dir"] + (["class_prompt", "class_data_dir"]
                                                         if args.with_prior_preservation else [])
    if not isinstance(concepts, list) or not concepts:
        raise DreamBoothError(f"--concepts_list {args.concepts_list}: expected a non-empty JSON list of objects")
    for i, concept in enumerate(concepts):
        missing = [k for k in needed if not (isinstance(concept, dict) and concept.get(k))]
        if missing:
            raise DreamBoothError(f"--concepts_list {args.concepts_list}: entry {i} lacks {', '.join(missing)}")
    return concepts


def caption_of(path, default, args):
    """photo.txt beside photo.png replaces the instance prompt, with --use_image_captions."""
    caption_file = os.path.splitext(path)[0] + ".txt"
    if args.use_image_captions and os.path.isfile(caption_file):
        with open(caption_file, encoding="utf-8") as f:
            return f.read().strip() or default
    return default


def class_image_name(prompt, index):
    return f"{hashlib.sha1(prompt.encode()).hexdigest()[:10]}-{index:05d}.png"


def check_class_dir_prompt(concept):
    """Class images generated here for another prompt would teach the wrong class: warn."""
    own = hashlib.sha1(concept["class_prompt"].encode()).hexdigest()[:10]
    names = os.listdir(concept["class_data_dir"]) if os.path.isdir(concept["class_data_dir"]) else []
    others = {n.split("-")[0] for n in names if len(n.split("-")[0]) == 10 and n.endswith(".png")} - {own}
    if others:
        logger.warning("--class_data_dir %s holds images generated for another class prompt; use one folder "
                       "per class prompt", concept["class_data_dir"])


def load_sampling_pipeline(args, dtype):
    """The base model for class images: no safety checker, the fast sampler, the half dtype of
    --mixed_precision (if any), and a UNet that skips work repeated at every sampler step."""
    import paddle
    import ppdiffusers

    family = families.for_model(args.pretrained_model_name_or_path)
    family.check_args(args)  # the run's choices: the sampler, SD3 without T5
    vae = frozen_on_host({"vae": dtype})("vae", lambda: families.load_vae(
        args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path)) \
        if args.pretrained_vae_model_name_or_path else None
    try:
        pipe = family.from_pretrained(vae=vae, **({"paddle_dtype": getattr(paddle, dtype)} if dtype else {}))
    except Exception as e:
        raise DreamBoothError(f"cannot load {args.pretrained_model_name_or_path} to generate class images "
                              f"({first_line(e)}); check --pretrained_model_name_or_path") from e
    if CLASS_SAMPLERS[args.class_sampler]:
        sampler = getattr(ppdiffusers, CLASS_SAMPLERS[args.class_sampler])
        # DDIM's default clips its estimate of the clean latents to [-1, 1], which suits pixel-space models
        # only; a model's config written for another scheduler often does not say, so it must not decide.
        unclipped = {} if "clip_sample" in pipe.scheduler.config else {"clip_sample": False}
        pipe.scheduler = sampler.from_config(pipe.scheduler.config, **unclipped)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, family.denoiser_name)
    reuse_cross_attention_keys_values(denoiser)
    fold_attention_scale_into_queries(denoiser)
    return pipe


def reuse_cross_attention_keys_values(unet):
    """Within one pipeline call every sampler step hands the UNet the same prompt-embedding tensor, so
    each cross-attention layer's keys and values are the same at every step: compute them at the first
    step only. Keyed by the input tensor itself, so a new call (new prompts) computes them afresh and
    the images are bit-identical to the plain UNet's."""
    for name, layer in unet.named_sublayers():
        if name.endswith("attn2"):  # SD's transformer blocks: attn1 attends to the image, attn2 to the prompt
            for projection in (layer.to_k, layer.to_v):
                projection.forward = remember_last_output(projection.forward)


def fold_attention_scale_into_queries(unet):
    """softmax(q k^T * scale) = softmax((q * scale) k^T): with the scale multiplied into the query
    projection's weights once, no sampler step multiplies the score matrices (tokens x tokens per
    head, the largest tensors of the UNet). Equal up to float rounding. Only for the frozen
    sampling UNet: a trained UNet keeps its own weights. Only where the plain processor runs: the
    fused GPU kernels scale inside (flash attention even ignores `attn.scale`)."""
    import paddle
    from ppdiffusers.models.attention_processor import Attention, AttnProcessor

    with paddle.no_grad():
        for layer in unet.sublayers():
            if isinstance(layer, Attention) and type(layer.processor) is AttnProcessor and layer.scale != 1.0:
                for p in (layer.to_q.weight, layer.to_q.bias):
                    if p is not None:
                        p.set_value(p * layer.scale)
                layer.scale = 1.0


def remember_last_output(forward):
    last = {}

    def forward_once(x, *args, **kwargs):
        if last.get("input") is not x or last.get("args") != (args, kwargs):
            last.update(input=x, args=(args, kwargs), output=forward(x, *args, **kwargs))
        return last["output"]
    return forward_once


def generate_class_images(concept, args, world_size, rank, precision, pipe=None):
    """Fill the concept's class_data_dir up to --num_class_images with base-model images of its
    class prompt. Returns the sampling pipeline, loaded on first need, for the next concept."""
    import paddle
    from tqdm.auto import tqdm

    folder, prompt = concept["class_data_dir"], concept["class_prompt"]
    wanted = int(concept.get("num_class_images", args.num_class_images))
    check_class_dir_prompt(concept)
    if os.path.isdir(folder):
        for name in os.listdir(folder):  # images a killed run left half-written
            if name.endswith(".png.tmp"):
                with contextlib.suppress(FileNotFoundError):  # another rank sharing the folder was first
                    os.remove(os.path.join(folder, name))
    missing = wanted - len(list_images(folder, "--class_data_dir", must_exist=False))
    taken = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    # Every rank lists the folder before any rank writes to it, so all agree on which indices are
    # missing and each generates its share of the same list.
    barrier()
    if missing <= 0:
        return pipe
    dtype, autocast = precision
    pipe = pipe or load_sampling_pipeline(args, dtype)  # a broken model fails here, before anything is written
    with saving(folder, "choose a --class_data_dir you can write to"):
        os.makedirs(folder, exist_ok=True)
    indices = [i for i in range(wanted + len(taken)) if class_image_name(prompt, i) not in taken][:missing]
    mine = indices[rank::world_size]
    logger.info("Generating %d class images for %r in %s (%s, %d steps)", missing, prompt, folder,
                args.class_sampler, args.class_inference_steps)
    started, cpu_started = time.time(), time.process_time()
    with tqdm(total=len(mine), desc="class images", disable=rank != 0) as bar:
        for start in range(0, len(mine), args.sample_batch_size):
            batch = mine[start:start + args.sample_batch_size]
            # One generator per image: an image depends on the seed and its index, not on rank or batching.
            generators = [paddle.Generator().manual_seed(args.seed + i) for i in batch]
            with autocast():
                images = pipe([prompt] * len(batch), height=args.height, width=args.width, generator=generators,
                              num_inference_steps=args.class_inference_steps,
                              guidance_scale=args.class_guidance_scale).images
            for i, image in zip(batch, images):
                path = os.path.join(folder, class_image_name(prompt, i))
                with saving(path, "the class images already written are kept: free disk space (or fix the folder) "
                            "and rerun the same command to generate the rest", staging=path + ".tmp"):
                    image.save(path + ".tmp", format="PNG")  # not *.png until complete
                    os.replace(path + ".tmp", path)
            bar.update(len(batch))
    seconds, cpu_seconds = time.time() - started, time.process_time() - cpu_started
    logger.info("Class images: %.4f images/s on rank %d (%d in %.1f s, %.1f CPU s)", len(mine) / seconds, rank,
                len(mine), seconds, cpu_seconds)
    return pipe


def load_instances(concepts, args):
    """The subject photos of every concept as TrainImages; every file is checked."""
    instances = []
    for concept in concepts:
        paths = list_images(concept["instance_data_dir"], "--instance_data_dir")
        if not paths:
            raise DreamBoothError(f"--instance_data_dir {concept['instance_data_dir']} holds no images "
                                  f"({', '.join(sorted(IMAGE_EXTENSIONS))}); put 3-5 photos of your subject there")
        loaded = load_images(paths, "--instance_data_dir", with_alpha=args.masked_loss)
        images, alphas = zip(*loaded) if args.masked_loss else (loaded, [None] * len(loaded))
        small = [os.path.basename(p) for p, im in zip(paths, images) if im.width < args.width or im.height < args.height]
        if small:  # upscaling blurs: worth knowing, not worth refusing
            logger.warning("%d image(s) smaller than %dx%d are upscaled (blurrier training data): %s", len(small),
                           args.width, args.height, ", ".join(small))
        if args.masked_loss:
            check_loss_masks(paths, alphas, concept["instance_data_dir"])
        instances += [TrainImage(im, caption_of(path, concept["instance_prompt"], args), args, alpha)
                      for path, im, alpha in zip(paths, images, alphas)]
    return instances


def check_loss_masks(paths, alphas, folder):
    """--masked_loss needs transparency to read: a folder without any, or a photo with nothing
    opaque (it would train on nothing), is a mistake worth stopping for."""
    if all(alpha is None for alpha in alphas):
        raise DreamBoothError(f"--masked_loss: no image in --instance_data_dir {folder} has an alpha channel; save "
                              "the photos as PNG with the background transparent, or drop --masked_loss")
    empty = [os.path.basename(p) for p, alpha in zip(paths, alphas) if alpha is not None and not alpha.getbbox()]
    if empty:
        raise DreamBoothError(f"--masked_loss: {', '.join(empty)} in {folder}: fully transparent, nothing to train "
                              "on; make the subject opaque or remove the file")


def load_classes(concepts, args, world_size, rank, precision):
    """The class images of every concept as TrainImages, generating the missing ones first
    (precision: the half dtype or None, and the autocast factory of training)."""
    pipe, classes = None, []
    for concept in concepts:
        pipe = generate_class_images(concept, args, world_size, rank, precision, pipe)
    del pipe
    gc.collect()  # its layers hold reference cycles (remember_last_output): free them before training loads
    barrier()  # every rank waits until all class images are on disk
    for concept in concepts:
        wanted = int(concept.get("num_class_images", args.num_class_images))
        paths = list_images(concept["class_data_dir"], "--class_data_dir")[:wanted]
        if world_size > 1 and not on_every_rank(len(paths) == wanted):  # each rank generated its share
            raise DreamBoothError(f"--class_data_dir {concept['class_data_dir']}: a process sees fewer than "
                                  f"the {wanted} class images all processes generated; on several machines it "
                                  "must be a folder they share, or hold a full copy on each (docs/multi_node.md)")
        if not paths:
            raise DreamBoothError(f"--class_data_dir {concept['class_data_dir']} holds no images; "
                                  "set --num_class_images > 0 to generate them")
        classes += [TrainImage(im, concept["class_prompt"], args) for im in load_images(paths, "--class_data_dir")]
    return classes


# ----------------------------------------------------------------------------------------------
# Per-step randomness. Every draw is keyed by (seed, epoch, sample's place in the epoch), so a
# sample gets the same crop, noise and timestep whatever the number of processes, batch size or
# accumulation, and a resumed run continues exactly where the interrupted one was.


def epoch_batches(num_items, epoch, seed, global_batch):
    """Shuffled item indices of one epoch, wrapped to whole global batches: shape [batches, global_batch]."""
    order = np.random.default_rng([seed, ORDER_STREAM, epoch]).permutation(num_items)
    num_batches = math.ceil(num_items / global_batch)
    return np.resize(order, num_batches * global_batch).reshape(num_batches, global_batch)


def draw_noise(seed, key, latent_shape, noise_offset, draw_time):
    """Posterior sample noise, diffusion noise and time of one training sample; draw_time(rng) is the
    family's draw of the time."""
    rng = np.random.default_rng([seed, NOISE_STREAM, *key])
    posterior_eps = rng.standard_normal(latent_shape, dtype=np.float32)
    noise = rng.standard_normal(latent_shape, dtype=np.float32)
    if noise_offset:
        noise += noise_offset * rng.standard_normal((latent_shape[0], 1, 1), dtype=np.float32)
    return posterior_eps, noise, draw_time(rng)


# ----------------------------------------------------------------------------------------------
# The loss


def compute_loss(model_pred, target, num_instance, args, snr=None, weight=None, mask=None):
    """Per-sample MSE, optionally weighted (Min-SNR from `snr`, or the family's per-sample `weight`);
    instance mean + prior_loss_weight x class mean.

    The first num_instance samples of the batch are instance images, the rest class images.
    """
    squared = (model_pred.astype("float32") - target.astype("float32")) ** 2
    if mask is None:
        per_sample = squared.mean(axis=[1, 2, 3])
    else:  # the mean over the weighted pixels: a small subject trains as strongly as one filling the picture
        import paddle

        mask = paddle.to_tensor(mask)[:, None]
        per_sample = (squared * mask).mean(axis=[1, 2, 3]) / mask.mean(axis=[1, 2, 3]).clip(min=1e-6)
    if snr is not None:
        weight = families.min_snr_weight(snr, args.snr_gamma, args.prediction_type)
    if weight is not None:
        per_sample = per_sample * weight
    loss = per_sample[:num_instance].mean()
    if num_instance < per_sample.shape[0]:
        loss = loss + args.prior_loss_weight * per_sample[num_instance:].mean()
    return loss


# ----------------------------------------------------------------------------------------------
# Saving


def atomic_dir(final, run_id=""):
    """A fresh staging folder beside `final`, named for this run; commit_dir renames it into place."""
    tmp = staging_name(final, "tmp", run_id)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def staging_name(final, kind, run_id=""):
    """final.tmp-<run id> (being written) or final.old-<run id> (being replaced): the run id keeps two
    runs that share a folder by mistake from writing into one staging folder."""
    return f"{final}.{kind}" + (f"-{run_id}" if run_id else "")


STAGING_PATTERN = re.compile(r"(?P<final>.+)\.(?P<kind>tmp|old)(-[0-9a-f]+)?")


def commit_dir(tmp, final, run_id=""):
    """Replace `final` by `tmp`. A crash leaves either the old or the new folder under the final
    name, or the old one under final.old-<run id>, which recover_interrupted_saves puts back.
    Signals wait until both renames are done."""
    old = staging_name(final, "old", run_id)
    with signals_deferred():
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_saves(folder):
    """Undo what a crash in the middle of a save left behind (see commit_dir). Only names this
    trainer stages are touched: checkpoint-N, final and the pipeline's own files."""
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        path, staged = os.path.join(folder, name), STAGING_PATTERN.fullmatch(name)
        if not staged or not (checkpoint_step(staged["final"]) is not None or staged["final"] == "final"
                              or staged["final"] in PIPELINE_ENTRIES):
            continue
        final = os.path.join(folder, staged["final"])
        if staged["kind"] == "old" and not os.path.exists(final):
            os.replace(path, final)
            logger.warning("Restored %s, whose replacement was interrupted", final)
        else:
            shutil.rmtree(path, ignore_errors=True)


def write_failures():
    """What writers raise when a write fails: OSError from Python's files (json, pickle, PNG, CSV,
    paddle.save, the log writers), SafetensorError from safetensors, RuntimeError from Paddle."""
    from safetensors import SafetensorError

    return OSError, SafetensorError, RuntimeError


def failure_reason(error):
    """A failed write in words: the system's reason (safetensors puts it after "I/O error: ")."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = first_line(error)
    wrapped = re.search(r"I/O error: (.+?)(?: \(os error \d+\))?$", text)
    return wrapped.group(1) if wrapped else text


@contextlib.contextmanager
def saving(what, fix, staging=None):
    """Run writes under one guard: a failed write (a full disk, a lost mount, no permission) becomes
    one line naming `what` and the `fix`. Whatever stops the writes, a failure or an interrupt, the
    `staging` folder or file goes: what was complete before stays, and nothing half-written is left."""
    try:
        yield
    except BaseException as e:
        if staging:
            shutil.rmtree(staging, ignore_errors=True) if os.path.isdir(staging) else remove_if_exists(staging)
        if isinstance(e, write_failures()):
            where = what if staging else getattr(e, "filename", None) or what
            raise DreamBoothError(f"could not write {where} ({failure_reason(e)}); {fix}") from e
        raise


def remove_if_exists(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def resume_fix(output_dir):
    """What to do after a failed write in output_dir: the newest complete checkpoint survives it."""
    kept = list_checkpoints(output_dir)
    kept = f"the previous checkpoint {kept[-1]} is intact" if kept else "no checkpoint was written yet"
    return (f"{kept}: free disk space (or fix the folder), then rerun the same command with "
            "--resume_from_checkpoint latest")


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)


# ----------------------------------------------------------------------------------------------
# Checkpoints verify themselves: a manifest of the sizes and SHA-256 of their files, written last.

MANIFEST = "manifest.json"


def file_sha256(path):
    """Read in 1 MiB blocks: memory stays flat for multi-GB weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def write_manifest(folder):
    files = {name: dict(size=os.path.getsize(os.path.join(folder, name)),
                        sha256=file_sha256(os.path.join(folder, name))) for name in checkpoint_files(folder)}
    write_json(os.path.join(folder, MANIFEST), dict(files=files))


def checkpoint_problem(folder):
    """Why a checkpoint cannot be trusted, naming the file, or None if it verifies. A checkpoint of
    an earlier version has no manifest: it passes unverified (resume says so)."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):  # its files are named when one fails to load (reading_checkpoint)
        state = os.path.join(folder, "training_state.json")
        return None if os.path.isfile(state) else f"{state} is missing"
    try:
        with open(manifest, encoding="utf-8") as f:
            files = {name: dict(size=int(entry["size"]), sha256=str(entry["sha256"]))
                     for name, entry in json.load(f)["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{manifest} is damaged ({first_line(e)})"
    for name, entry in files.items():  # sizes first: cheap, and they catch truncation
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != entry["size"]:
            return (f"{path} has {os.path.getsize(path)} bytes where {entry['size']} were written (truncated or "
                    "replaced)")
    for name, entry in files.items():
        if file_sha256(os.path.join(folder, name)) != entry["sha256"]:
            return f"{os.path.join(folder, name)} differs from what was written (its SHA-256 does not match)"
    return None


def newest_good_checkpoint(output_dir, skip=()):
    """(newest checkpoint of output_dir that verifies or None, [(checkpoint, problem)] of newer ones)."""
    bad = []
    for folder in reversed(list_checkpoints(output_dir)):
        if os.path.abspath(folder) in {os.path.abspath(s) for s in skip}:
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, bad
        bad.append((folder, problem))
    return None, bad


def good_checkpoint_advice(folder):
    """Where to resume from instead of a damaged checkpoint `folder`."""
    good, _ = newest_good_checkpoint(os.path.dirname(os.path.abspath(folder)) or ".", skip=[folder])
    if good:
        return f"the newest good checkpoint is {good}: resume from it (or delete the damaged one and use latest)"
    return "no other checkpoint beside it verifies: start again in a new --output_dir"


@contextlib.contextmanager
def reading_checkpoint(folder, name):
    """A checkpoint file that fails to load is named as a checkpoint file, never blamed on the base model."""
    try:
        yield
    except DreamBoothError:
        raise
    except Exception as e:
        raise DreamBoothError(f"checkpoint file {os.path.join(folder, name)} cannot be read ({first_line(e)}); "
                              f"{good_checkpoint_advice(folder)}") from e


# ----------------------------------------------------------------------------------------------
# One run per output folder: a lock file made with O_CREAT | O_EXCL, which is atomic on local and
# network filesystems alike (flock is not honoured across NFS clients).

LOCK_FILE = "train_dreambooth.lock"


def process_start_time(pid):
    """When a process started, or None if none runs with that id on this host."""
    import psutil

    if pid <= 0:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # it runs, as someone else
        return -1.0


def lock_holder(path):
    """The lock file's content, or None if it vanished; {} if it is empty or damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def is_stale(holder, path):
    """A lock is stale when its process is gone: checked on this host only, where a process id (and
    its start time, against reuse of the id) means something. An empty file is a run that died
    while creating it, once it is older than a few seconds."""
    if not holder:
        with contextlib.suppress(OSError):
            return time.time() - os.path.getmtime(path) > 10
        return False
    if holder.get("host") != socket.gethostname():
        return False
    try:
        started = process_start_time(int(holder.get("pid", -1)))
    except (TypeError, ValueError):  # not a process id: not a lock this trainer wrote
        return False
    return started is None or (started >= 0 and abs(started - (holder.get("pid_started") or started)) > 1)


def take_output_dir_lock(output_dir):
    """Create output_dir (remembering which folders were new) and its lock file; returns what
    release_output_dir_lock needs. A second run refuses at once, naming the holder."""
    path = os.path.join(output_dir, LOCK_FILE)
    me = dict(pid=os.getpid(), host=socket.gethostname(), pid_started=process_start_time(os.getpid()),
              started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join(sys.argv))
    created, parent = [], os.path.abspath(output_dir)
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(output_dir, exist_ok=True)
        for attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                holder = lock_holder(path)
                if holder is not None and not (attempt == 0 and is_stale(holder, path)):
                    release_output_dir_lock((None, created))
                    who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                           if holder else "a run whose lock file is empty")
                    raise DreamBoothError(f"--output_dir {output_dir} is in use by another training run ({who}); "
                                          "wait for it to end or choose another --output_dir (if that run is "
                                          f"gone, delete {path})")
                if holder is not None:
                    logger.warning("Taking over the lock of --output_dir %s from process %s on %s (started %s), "
                                   "which no longer runs", output_dir, holder.get("pid"), holder.get("host"),
                                   holder.get("started"))
                    with contextlib.suppress(FileNotFoundError):
                        os.replace(path, f"{path}.stale-{os.getpid()}")
                        os.remove(f"{path}.stale-{os.getpid()}")
        else:
            raise DreamBoothError(f"--output_dir {output_dir}: another run took the lock {path} at the same moment; "
                                  "choose another --output_dir")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
    except OSError as e:
        release_output_dir_lock((None, created))
        raise DreamBoothError(f"--output_dir {output_dir} is not writable ({failure_reason(e)}); choose a folder "
                              "you can write to") from e
    return path, created


def release_output_dir_lock(lock):
    """Remove our lock file, and the folders the lock created if the run left them empty, so that a
    run stopped by bad input leaves no trace."""
    path, created = lock
    if path and (lock_holder(path) or {}).get("pid") == os.getpid():
        remove_if_exists(path)
    for folder in created:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def output_dir_lock(output_dir, take):
    lock = take_output_dir_lock(output_dir) if take else (None, [])
    try:
        yield
    finally:
        release_output_dir_lock(lock)


def shared_run_id():
    """A random name for this run's staging folders, the same on every rank (rank 0's)."""
    import paddle
    import paddle.distributed as dist

    run_id = paddle.to_tensor([random.SystemRandom().randrange(2**40)], dtype="int64")
    if dist.get_world_size() > 1:
        dist.broadcast(run_id, src=0)
    return f"{int(run_id.item()):010x}"


@contextlib.contextmanager
def on_host():
    """Create tensors in host memory for a while (e.g. base components loaded only to be saved), so
    that a save never takes device memory from training."""
    import paddle

    device = paddle.device.get_device()
    paddle.device.set_device("cpu")
    try:
        yield
    finally:
        paddle.device.set_device(device)


def save_pipeline(args, family, models, tokenizers, folder):
    """Write what the run produces: a full ppdiffusers pipeline (the trained models, the rest from the
    base), or with --use_lora a LoRA weights file that load_lora_weights reads. `models`: the denoiser
    and text encoders by pipeline component name.

    Only trained models are saved from memory. A frozen model in memory may be held in a half dtype
    (--mixed_precision), and a pipeline saved from it would load in half and fail next to the fp32
    UNet; so every other component is the base's own (or --pretrained_vae_model_name_or_path's VAE),
    loaded on the host: exactly its fp32 weights."""
    from ppdiffusers.training_utils import unwrap_model

    models = {name: unwrap_model(model) for name, model in models.items()}
    text_encoders = {name: models[name] for name in family.text_encoder_names if name in models}
    if args.use_lora:
        from safetensors.numpy import save_file

        unet_state, text_state = lora_state_for_loading(family, models[family.denoiser_name], text_encoders, args)
        family.save_lora_weights(folder, unet_state)
        if text_state:  # Paddle orientation, as ppdiffusers marks its own files
            save_file({k: v.numpy() for k, v in text_state.items()}, os.path.join(folder, TEXT_ENCODER_LORA),
                      metadata={"format": "pd"})
        return
    trained = [family.denoiser_name] + [n for n in family.trained_text_encoders if args.train_text_encoder]
    vae_path = args.pretrained_vae_model_name_or_path  # the VAE it trained with goes with it
    with on_host():
        vae = {"vae": families.load_vae(args.pretrained_model_name_or_path, vae_path)} if vae_path else {}
        pipe = family.pipeline_class.from_pretrained(args.pretrained_model_name_or_path, **tokenizers, **vae,
                                                     **family.absent_components(),
                                                     **{name: models[name] for name in trained})
    pipe.save_pretrained(folder)


def structured_names(models):
    """Paddle names parameters by creation order (linear_12.w_0); checkpoints use stable names."""
    return {p.name: f"{label}.{name}" for label, model in models.items() for name, p in model.named_parameters()}


def rename_state(state, mapping):
    """Rename optimizer-state keys that start with a parameter name (moments, master weights)."""
    renamed = {}
    for key, value in state.items():
        if isinstance(value, dict):
            value = rename_state(value, mapping)
        head = key  # the longest "_"-delimited prefix that is a parameter name
        while head and head not in mapping:
            head = head.rpartition("_")[0]
        renamed[mapping[head] + key[len(head):] if head else key] = value
    return renamed


def paddle_generators():
    """{kind: generator} of the Paddle generators this process draws from: the host's, and its own
    GPU's. paddle.get_rng_state() would return one state per visible GPU, which a resume with a
    different number of visible GPUs could not set back."""
    import paddle
    from paddle.base import core

    generators = {"cpu": core.default_cpu_generator()}
    device = paddle.device.get_device()
    if device.startswith("gpu"):
        generators["gpu"] = core.default_cuda_generator(int(device.partition(":")[2] or 0))
    return generators


def save_rng_state(path):
    with open(path, "wb") as f:
        pickle.dump(dict(python=random.getstate(), numpy=np.random.get_state(),
                         paddle={kind: g.get_state() for kind, g in paddle_generators().items()}), f)


def load_rng_state(path):
    import paddle

    with open(path, "rb") as f:
        state = pickle.load(f)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if isinstance(state["paddle"], list):  # written by an earlier version: every generator of the device
        paddle.set_rng_state(state["paddle"])
        return
    generators = paddle_generators()
    for kind, saved in state["paddle"].items():
        if kind in generators:
            generators[kind].set_state(saved)
        else:  # a GPU run resumed on a CPU: dropout draws differ, everything keyed by the seed does not
            logger.warning("%s: no %s here to restore the random state of; resuming with a fresh one", path, kind)


def save_checkpoint(args, family, models, tokenizers, optimizer, lr_scheduler, scaler, position):
    """output_dir/checkpoint-<step>: a loadable pipeline plus everything needed to resume exactly.

    Called on every rank: each writes its own RNG state; rank 0 writes the rest, and last the
    manifest that lets a resume verify the checkpoint."""
    import paddle

    world_size, rank = world()
    final = os.path.join(args.output_dir, f"checkpoint-{position['global_step']}")
    tmp = staging_name(final, "tmp", args.run_id)
    with saving(final, resume_fix(args.output_dir), staging=tmp if rank == 0 else None):
        if rank == 0:
            atomic_dir(final, args.run_id)
        barrier()
        save_rng_state(os.path.join(tmp, f"rng_state_{rank}.pkl"))
        if rank == 0:
            save_pipeline(args, family, models, tokenizers, tmp)
            names = structured_names(models)
            paddle.save(rename_state(optimizer.state_dict(), names), os.path.join(tmp, OPTIMIZER_STATE))
            if args.use_lora:  # the exact trained values, unscaled, for resuming
                paddle.save(lora_training_state(models), os.path.join(tmp, LORA_TRAINING_STATE))
            state = dict(position, lr_scheduler=lr_scheduler.state_dict(), world_size=world_size,
                         grad_scaler=scaler_state(scaler), args={k: getattr(args, k) for k in RESUME_INVARIANT_ARGS})
            write_json(os.path.join(tmp, "training_state.json"), state)
        barrier()
        if rank == 0:
            give_usual_file_modes(tmp)
            write_manifest(tmp)
            commit_dir(tmp, final, args.run_id)
    if rank == 0:
        if args.checkpoints_total_limit:  # only now that the new one is complete
            for old in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info("Saved checkpoint %s", final)


def scaler_state(scaler):
    """The GradScaler's loss scale and counters as JSON (None without fp16): without them a resumed
    fp16 run would start again from the initial scale and skip updates the uninterrupted run did not."""
    if scaler is None:
        return None
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in scaler.state_dict().items()}


def restore_scaler(scaler, state):
    if scaler is not None and state:
        scaler.load_state_dict(dict(state, scale=np.asarray(state["scale"], dtype=np.float32)))


def checkpoint_step(name):
    prefix, _, step = name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() else None


def list_checkpoints(output_dir):
    """Complete checkpoints of output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(s for s in map(checkpoint_step, os.listdir(output_dir)) if s is not None)
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in steps]


def save_final(args, family, models, tokenizers):
    """The finished pipeline goes to output_dir itself, beside logs and checkpoints.

    It is staged in a temporary folder. The old marker (model_index.json, or the LoRA weights: what
    makes the folder a finished result) goes first and the new one comes last, so a crash never
    leaves a folder that claims to be finished while holding a mix of two. Signals wait while the
    staged files move in."""
    tmp = staging_name(os.path.join(args.output_dir, "final"), "tmp", args.run_id)
    with saving(args.output_dir, resume_fix(args.output_dir), staging=tmp):
        atomic_dir(os.path.join(args.output_dir, "final"), args.run_id)
        save_pipeline(args, family, models, tokenizers, tmp)
        give_usual_file_modes(tmp)
        with signals_deferred():
            for marker in FINISHED_MARKERS:
                remove_if_exists(os.path.join(args.output_dir, marker))
            for name in sorted(os.listdir(tmp), key=lambda n: n in FINISHED_MARKERS):
                src, dst = os.path.join(tmp, name), os.path.join(args.output_dir, name)
                commit_dir(src, dst, args.run_id) if os.path.isdir(src) else os.replace(src, dst)
            os.rmdir(tmp)
    if args.use_lora:
        how = "pipe.load_lora_weights(output_dir)" if family.lora_loads_plainly and not args.train_text_encoder \
            else "load_lora(pipe, output_dir) from train_dreambooth"
        logger.info("Saved the LoRA weights to %s; load them onto the base model with %s", args.output_dir, how)
    else:
        logger.info("Saved the trained pipeline to %s", args.output_dir)


def export_result(args, family):
    """--export_single_file: the saved result as output_dir/<its name>.safetensors for WebUI / ComfyUI.
    Read from what save_final just wrote, never from memory, where frozen models may be held in half."""
    import export_single_file

    out = export_single_file.default_out_path(args.output_dir)
    try:
        with on_host():  # a second UNet on the device next to the trained one and its optimizer states
            summary = family.export(args.output_dir, out, args.use_lora, args.export_half)
    except (ValueError, *write_failures()) as e:
        raise DreamBoothError(f"--export_single_file: could not write {out} ({failure_reason(e)}); "
                              f"the trained model is saved in {args.output_dir}, and python export_single_file.py "
                              f"{args.output_dir} exports it later") from e
    logger.info("Exported %s (%d tensors, %s) for WebUI / ComfyUI", out, summary["tensors"], summary["dtype"])


# ----------------------------------------------------------------------------------------------
# Validation


def image_grid(rows, pad=4):
    """rows: [(label, [PIL images])] -> one white image, each row of images under its label."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = max(measure.textbbox((0, 0), label, font=font)[3] for label, _ in rows) + pad
    cell_w, cell_h = rows[0][1][0].size
    per_row = max(len(images) for _, images in rows)
    text_w = max(measure.textbbox((0, 0), label, font=font)[2] for label, _ in rows)
    width = max(per_row * (cell_w + pad) + pad, text_w + 2 * pad)  # tiny images: don't clip the label
    row_h = label_h + cell_h + pad
    grid = Image.new("RGB", (width, len(rows) * row_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        top = pad + r * row_h
        draw.text((pad, top), label, fill="black", font=font)
        for i, image in enumerate(images):
            grid.paste(image, (pad + i * (cell_w + pad), top + label_h))
    return grid


@contextlib.contextmanager
def sampling_mode(*models):
    """Eval mode for sampling; the models' modes and Paddle's RNG come back afterwards, also when a
    signal cuts sampling short, so training continues as if it had not sampled."""
    import paddle

    modes, rng = [model.training for model in models], paddle.get_rng_state()
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
        paddle.set_rng_state(rng)


def validate(args, family, parts, writer, step, autocast):
    """Sample the validation prompts with the models in memory (no copy of the weights) and write
    output_dir/validation/step-<N>.png. Image i of every prompt and step starts from seed + i, so
    grids are comparable across steps. Training state (modes, RNG) is left as it was."""
    import paddle

    from diagnostics import measuring

    pipe = family.pipeline(parts, family.sampling_scheduler(parts.noise_scheduler))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    # Frozen models may be held in half, as in training.
    with paddle.no_grad(), autocast(), sampling_mode(parts.denoiser, *parts.text_encoders.values()):
        for prompt in args.validation_prompt:
            generators = [paddle.Generator().manual_seed(args.seed + i) for i in range(args.num_validation_images)]
            images = pipe([prompt] * args.num_validation_images, height=args.height, width=args.width,
                          num_inference_steps=args.validation_num_inference_steps,
                          guidance_scale=args.validation_guidance_scale, generator=generators).images
            rows.append((prompt, images))
    folder = os.path.join(args.output_dir, "validation")
    path = os.path.join(folder, f"step-{step:06d}.png")
    with saving(path, resume_fix(args.output_dir), staging=path + ".tmp"):
        os.makedirs(folder, exist_ok=True)
        image_grid(rows).save(path + ".tmp", format="PNG")  # not *.png until complete
        os.replace(path + ".tmp", path)
    for i, (prompt, images) in enumerate(rows):
        writer.add_image(f"validation/{i}", np.asarray(image_grid([(prompt, images)])), step, dataformats="HWC")
    logger.info("Validation images of update %d in %s", step, folder)


# ----------------------------------------------------------------------------------------------
# Logging


def make_writer(args):
    logdir = os.path.join(args.output_dir, args.logging_dir)
    with saving(logdir, resume_fix(args.output_dir)):
        if args.writer_type == "tensorboard":
            from tensorboardX import SummaryWriter

            return GuardedWriter(SummaryWriter(logdir), logdir, resume_fix(args.output_dir))
        from visualdl import LogWriter

        return GuardedWriter(LogWriter(logdir=logdir), logdir, resume_fix(args.output_dir))


class GuardedWriter:
    """The VisualDL / TensorBoard writer with every call under the write guard (see saving). Both
    write in a thread of their own and only print what fails there; what fails in the caller's
    thread (creating the file, flushing, closing) becomes one line."""

    def __init__(self, writer, logdir, fix):
        self.writer, self.logdir, self.fix = writer, logdir, fix

    def __getattr__(self, name):
        method = getattr(self.writer, name)

        def guarded(*args, **kwargs):
            with saving(self.logdir, self.fix):
                return method(*args, **kwargs)
        return guarded


def setup_logging(rank):
    import ppdiffusers
    from paddlenlp.utils.log import logger as paddlenlp_logger

    logging.basicConfig(format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, force=True)
    logging.captureWarnings(True)
    # The libraries' own per-file loading chatter would drown the trainer's log.
    ppdiffusers.utils.logging.set_verbosity_error()
    ppdiffusers.utils.logging.disable_progress_bar()
    paddlenlp_logger.set_level("ERROR")


# ----------------------------------------------------------------------------------------------
# Training


def main(args):
    """Train, with the output folder locked (by rank 0) and SIGTERM / Ctrl-C ending any phase in one line.
    MKL_DEBUG_CPU_TYPE, if this sets it, is for this run only: an in-process caller (a notebook, the
    tests) must not pass it on to every later subprocess."""
    mkl_code_path = choose_mkl_code_path()  # before any Paddle op
    try:
        with contextlib.ExitStack() as stack:
            # Importing Paddle installs its own SIGTERM handler (a C++ stack dump): signals wait until ours
            # replace it.
            with signals_deferred():
                _, rank = world()
                setup_logging(rank)
                stack.enter_context(interrupt_handlers())
            stack.enter_context(output_dir_lock(args.output_dir, take=rank == 0))
            return train(args, mkl_code_path)
    finally:
        if mkl_code_path:
            os.environ.pop("MKL_DEBUG_CPU_TYPE", None)


def train(args, mkl_code_path):
    import paddle
    import paddle.distributed as dist
    from ppdiffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    import diagnostics

    world_size, rank = world()
    set_phase("loading the images and models", "nothing was written: rerun the same command")
    if not args.with_prior_preservation and (args.class_data_dir or args.class_prompt and not args.diagnostics_steps):
        logger.warning("--class_prompt/--class_data_dir are ignored without --with_prior_preservation "
                       "(--class_prompt only names the class whose drift --diagnostics_steps measures)")
    if mkl_code_path:
        logger.info("AMD processor: MKL_DEBUG_CPU_TYPE=%s makes MKL use its AVX2 kernels (set the variable, "
                    "even empty, to keep MKL's own choice)", mkl_code_path)
    if world_size > 1:
        dist.init_parallel_env()
    args.world_size = world_size
    args.run_id = shared_run_id()
    if rank == 0:
        recover_interrupted_saves(args.output_dir)
    barrier()
    resume_from = find_resume_checkpoint(args)
    resume_state = read_training_state(args, resume_from) if resume_from else None
    family = families.for_model(args.pretrained_model_name_or_path)
    family.check_args(args)
    if args.seed is None:  # a resumed run keeps its seed; a new one draws and logs it
        args.seed = resume_state["args"]["seed"] if resume_state else random.SystemRandom().randrange(2**31)
        logger.info("No --seed given: using --seed %d", args.seed)
    paddle.seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    dtype = amp_dtype(args.mixed_precision)  # before anything is loaded, generated or cast
    autocast = autocast_factory(dtype)

    # --- Data: every input is checked before anything is written.
    concepts = read_concepts(args)
    instances = load_instances(concepts, args)
    check_output_dir(args, resume_from)
    set_phase("preparing class images", "the class images already written are kept: rerun the same command to "
              "generate the rest")
    classes = load_classes(concepts, args, world_size, rank, (dtype, autocast)) if args.with_prior_preservation else []
    num_items = max(len(instances), len(classes))
    logger.info("%d instance images, %d class images, %d examples per epoch", len(instances), len(classes),
                num_items)

    # --- Models: what the family loads; the loop below never asks which family it is.
    set_phase("loading the models", "nothing of this run was written" + (
        " but whole class images, which are kept" if args.with_prior_preservation else "") + ": rerun the same command")
    trained_text = [name for name in family.trained_text_encoders if args.train_text_encoder]
    # Trained weights stay fp32; frozen ones only ever run forward, in the half dtype of mixed precision,
    # except a VAE that overflows in fp16 (SDXL's own), which stays fp32 and encodes outside autocast.
    keep_vae_fp32 = family.vae_overflows_in_fp16 and not args.pretrained_vae_model_name_or_path \
        and dtype == "float16"
    frozen = {name: dtype for name in family.text_encoder_names if name not in trained_text}
    frozen["vae"] = None if keep_vae_fp32 else dtype
    parts = family.load(args, resume_from, reading_checkpoint, frozen_on_host(frozen))
    tokenizers, text_encoders, vae, denoiser, noise_scheduler = (parts.tokenizers, parts.text_encoders, parts.vae,
                                                                 parts.denoiser, parts.noise_scheduler)
    check_prompts(next(iter(tokenizers.values())), concepts, instances, args.validation_prompt)
    if rank == 0:  # the first write to output_dir, once every input has been checked
        with saving(args.output_dir, "choose a folder you can write to"):
            os.makedirs(args.output_dir, exist_ok=True)
    if world_size > 1:
        check_shared_output_dir(args.output_dir, world_size, rank)
    args.prediction_type = noise_scheduler.config.get("prediction_type")  # None: flow matching
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (vae.config.latent_channels, args.height // vae_factor, args.width // vae_factor)
    vae.eval()
    for p in vae.parameters():
        p.stop_gradient = True
    for name, text_encoder in text_encoders.items():
        text_encoder.train() if name in trained_text else text_encoder.eval()
        unreachable = tuple(family.unreachable(name, text_encoder))
        for key, p in text_encoder.named_parameters():
            p.stop_gradient = name not in trained_text or key.startswith(unreachable)
    denoiser.train()
    models = {family.denoiser_name: denoiser, **text_encoders}  # unwrapped, whatever wraps them later
    if args.use_lora:
        counts = {family.denoiser_name: family.add_denoiser_lora(denoiser, args.lora_rank, args.lora_alpha)}
        for name in trained_text:
            counts[name] = add_text_encoder_lora(text_encoders[name], args.lora_rank, args.lora_alpha,
                                                 skip=family.unreachable(name, text_encoders[name]))
        for label, trainable in counts.items():
            total = sum(int(p.numel()) for p in models[label].parameters())
            logger.info("LoRA rank %d, alpha %g: %d trainable parameters in the %s (%.2f%% of its %d)",
                        args.lora_rank, args.lora_alpha, trainable, label, 100 * trainable / total, total)
        if resume_from:
            with reading_checkpoint(resume_from, "lora_training_state.pdparams"):
                saved = paddle.load(os.path.join(resume_from, "lora_training_state.pdparams"))
                for name, p in lora_training_state(models).items():
                    p.set_value(saved[name])
    frozen_text = [m for name, m in text_encoders.items() if name not in trained_text]
    scaler = grad_scaler(dtype)
    vae_autocast = contextlib.nullcontext if keep_vae_fp32 else autocast
    if args.enable_xformers_memory_efficient_attention:
        enable_memory_efficient_attention(denoiser)
    if args.gradient_checkpointing:
        family.enable_gradient_checkpointing(denoiser)
        for name in trained_text:
            text_encoders[name].gradient_checkpointing_enable()
    if args.cache_latents is None:
        args.cache_latents = not any(it.random_crop for it in instances + classes)
    elif args.cache_latents and any(it.random_crop for it in instances + classes):
        logger.warning("--cache_latents: images are center-cropped once instead of randomly per step")
    # What waits in host memory while training (see park): the VAE with cached latents, frozen text encoders.
    to_park = ([vae] if args.cache_latents else []) + frozen_text
    if args.print_memory_estimate and rank == 0:
        import memory_estimate

        memory_estimate.log_estimate(logger.info, *memory_estimate.estimate(
            denoiser, text_encoders, vae, to_park, args, latent_shape[1:], family.max_tokens(tokenizers)))

    # --- What never changes is computed once: prompt embeddings of frozen text encoders, and the
    # VAE posterior (mean, std) of each image when no random crop would be lost by caching.
    all_prompts = {it.prompt for it in instances + classes} | ({""} if args.caption_dropout_rate else set())
    prompt_ids = {p: family.tokenize(tokenizers, p) for p in all_prompts}
    embeddings = {}
    if not trained_text:
        with paddle.no_grad():
            embeddings = {p: family.encode(text_encoders, [ids]) for p, ids in prompt_ids.items()}
    posterior_cache = {}
    if args.cache_latents:
        with paddle.no_grad():
            for item in instances + classes:
                for flip in ([False, True] if args.random_flip else [False]):
                    box = crop_box(item.image, args.height, args.width, True, None)
                    pixels = paddle.to_tensor(to_pixels(item.image.crop(box), flip)[None], dtype=vae.dtype)
                    posterior = vae.encode(pixels).latent_dist
                    posterior_cache[id(item), flip] = (posterior.mean[0].astype("float32"),
                                                       posterior.std[0].astype("float32"))

    # --- Optimizer and schedule, all counted in optimizer updates.
    global_batch = args.train_batch_size * world_size
    batches_per_epoch = math.ceil(num_items / global_batch)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * world_size
    if args.train_batch_size > len(instances):
        logger.warning("--train_batch_size %d is larger than the %d instance images: batches repeat images",
                       args.train_batch_size, len(instances))
    lr_scheduler = get_scheduler(args.lr_scheduler, learning_rate=args.learning_rate,
                                 num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_train_steps,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    params = [p for m in models.values() for p in m.parameters() if not p.stop_gradient]
    optimizer = paddle.optimizer.AdamW(
        learning_rate=lr_scheduler, parameters=params, beta1=args.adam_beta1, beta2=args.adam_beta2,
        epsilon=args.adam_epsilon, weight_decay=args.adam_weight_decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(args.max_grad_norm) if args.max_grad_norm else None)

    # The one record of training progress: updates made, where the data stream stands (an update
    # skipped for a non-finite loss or an fp16 overflow consumes its batches but is no update).
    position = dict(global_step=0, epoch=0, batch=0, skipped_updates=0)
    if resume_from:
        position = restore_training_state(resume_from, resume_state, optimizer, lr_scheduler, scaler, models, rank)
        logger.info("Resuming from %s at update %d", resume_from, position["global_step"])

    if world_size > 1:
        denoiser = paddle.DataParallel(denoiser)
        text_encoders = {name: paddle.DataParallel(m) if name in trained_text else m
                         for name, m in text_encoders.items()}
    trained = [denoiser] + [text_encoders[name] for name in trained_text]

    def no_sync():
        """Skip the gradient all-reduce on accumulation micro-steps; it runs on the last one."""
        stack = contextlib.ExitStack()
        for model in trained:
            if isinstance(model, paddle.DataParallel):
                stack.enter_context(model.no_sync())
        return stack

    def prepare_batch(epoch, batch_index):
        """NumPy side of this rank's share of one global batch: items, crops, noise, timesteps.
        Pure NumPy/PIL, so --dataloader_num_workers threads can run it ahead of the model."""
        batch_items = order[batch_index]
        # A sample's randomness is keyed by its place in the epoch's stream of samples, so batch 2,
        # batch 1 x accumulation 2, and 2 processes x batch 1 all see the same noise for it.
        mine = range(rank * args.train_batch_size, (rank + 1) * args.train_batch_size)
        keyed = [(instances[batch_items[pos] % len(instances)], (epoch, batch_index * global_batch + pos, 0))
                 for pos in mine]
        if classes:  # class samples follow the instance samples in the same forward pass
            keyed += [(classes[batch_items[pos] % len(classes)], (epoch, batch_index * global_batch + pos, 1))
                      for pos in mine]
        batch = dict(items=[], prompts=[], flips=[], pixels=[], geometry=[], eps=[], noise=[], times=[], masks=[])
        for item, key in keyed:
            aug_key = [args.seed, AUGMENT_STREAM, *key]
            aug_rng = np.random.default_rng(aug_key)
            if args.cache_latents:
                flip = bool(args.random_flip and aug_rng.random() < 0.5)
                box = crop_box(item.image, args.height, args.width, True, None)
            else:
                pixels, flip = item.pixels(aug_rng, args)
                box, _ = item.augmentation(np.random.default_rng(aug_key), args)  # the same draws: the crop made
                batch["pixels"].append(pixels)
            eps, noise, t = draw_noise(args.seed, key, latent_shape, args.noise_offset,
                                       lambda rng: family.draw_time(rng, noise_scheduler))
            dropped = args.caption_dropout_rate and \
                np.random.default_rng([args.seed, CAPTION_STREAM, *key]).random() < args.caption_dropout_rate
            batch["prompts"].append("" if dropped else item.prompt)
            if args.masked_loss:  # class images, and photos without transparency, count everywhere
                mask = item.loss_mask(box, flip, latent_shape[1:])
                batch["masks"].append(np.ones(latent_shape[1:], np.float32) if mask is None else mask)
            for name, value in zip(("items", "flips", "geometry", "eps", "noise", "times"),
                                   (item, flip, item.geometry(box, flip), eps, noise, t)):
                batch[name].append(value)
        return batch

    def model_inputs(batch):
        """Paddle side: latents sampled from the (cached or fresh) VAE posterior, noised; the prompts'
        conditioning; the target and per-sample loss weight."""
        if args.cache_latents:
            cached = [posterior_cache[id(item), flip] for item, flip in zip(batch["items"], batch["flips"])]
            mean, std = paddle.stack([m for m, _ in cached]), paddle.stack([s for _, s in cached])
        else:
            with paddle.no_grad(), vae_autocast():
                posterior = vae.encode(paddle.to_tensor(np.stack(batch["pixels"]), dtype=vae.dtype)).latent_dist
            mean, std = posterior.mean.astype("float32"), posterior.std.astype("float32")
        latents = families.vae_latents(mean + std * paddle.to_tensor(np.stack(batch["eps"])), vae.config)
        noise = paddle.to_tensor(np.stack(batch["noise"]))
        prompts = batch["prompts"]
        if trained_text:
            with autocast():
                cond = family.encode(text_encoders, [prompt_ids[p] for p in prompts])
        else:
            cond = {k: paddle.concat([embeddings[p][k] for p in prompts]) for k in embeddings[prompts[0]]}
        noisy, timesteps, target, weight = family.noise_step(noise_scheduler, latents, noise, batch["times"],
                                                             args.snr_gamma)
        return noisy, timesteps, cond, target, weight

    set_phase("preparing to train", "complete checkpoints are kept: rerun the same command with "
              "--resume_from_checkpoint latest")
    writer = make_writer(args) if rank == 0 else None
    # Rank 0 alone measures; the other ranks go on and wait for it in the next all-reduce.
    diag = None
    if rank == 0 and args.diagnostics_steps:
        with saving(os.path.join(args.output_dir, diagnostics.CSV_FILE), resume_fix(args.output_dir)):
            diag = diagnostics.start(args, family, concepts, instances, parts, autocast, writer,
                                     position["global_step"])
    parked = park(to_park)
    logger.info("Training: %d updates (%d epochs of %d), batch %d x %d processes x %d accumulation, lr %g",
                args.max_train_steps, num_epochs, updates_per_epoch, args.train_batch_size, world_size,
                args.gradient_accumulation_steps, args.learning_rate)
    global_step = position["global_step"]
    stop = global_step >= args.max_train_steps
    validated_at = None  # the final model is not validated twice
    consecutive_skips = 0
    with stop_signals(lambda: global_step) as stop_signal, \
            tqdm(total=args.max_train_steps, initial=position["global_step"], desc="steps", disable=rank != 0) as bar:
        started, update_seconds = time.time(), []
        epoch = position["epoch"]
        while not stop:  # past num_epochs only when skipped updates must be made up
            order = epoch_batches(num_items, epoch, args.seed, global_batch)
            first_batch = position["batch"] if epoch == position["epoch"] else 0
            batches = prefetch(lambda b: prepare_batch(epoch, b), range(first_batch, batches_per_epoch),
                               args.dataloader_num_workers)
            # Accumulation groups never cross the epoch's end: the last group may be shorter,
            # and its loss is averaged over the micro-batches it really has.
            for group_start in range(first_batch, batches_per_epoch, args.gradient_accumulation_steps):
                group = range(group_start, min(group_start + args.gradient_accumulation_steps, batches_per_epoch))
                group_loss, update_started, update_cpu = 0.0, time.perf_counter(), time.process_time()
                for batch_index in group:
                    batch = next(batches)
                    noisy, timesteps, cond, target, weight = model_inputs(batch)
                    with no_sync() if batch_index != group[-1] else contextlib.nullcontext():
                        with autocast():
                            pred = family.denoise(denoiser, noisy, timesteps, cond, batch["geometry"])
                        mask = np.stack(batch["masks"]) if batch["masks"] else None
                        loss = compute_loss(pred, target, args.train_batch_size,
                                            args, weight=weight, mask=mask) / len(group)
                        scaler.scale(loss).backward() if scaler else loss.backward()
                    group_loss += loss.detach()
                # One small all-reduce per update: every rank logs the global mean loss and takes the
                # same decision on a non-finite loss or a stop signal.
                group_loss, signalled = agree_across_ranks(group_loss, stop_signal)
                lr = optimizer.get_lr()  # the rate this update uses
                if math.isfinite(group_loss):
                    stepped = optimizer_step(optimizer, scaler)
                    why = "fp16 gradients overflowed (the loss scale is lowered)"
                elif args.skip_nonfinite_steps:
                    stepped, why = False, f"loss is {group_loss}"
                else:
                    raise DreamBoothError(f"loss is {group_loss} at update {position['global_step'] + 1}; nothing "
                                          "from this update was saved; lower --learning_rate, or pass "
                                          "--skip_nonfinite_steps")
                optimizer.clear_grad(set_to_zero=False)
                batch = group[-1] + 1
                position.update(epoch=epoch + (batch == batches_per_epoch), batch=batch % batches_per_epoch)
                if stepped:
                    lr_scheduler.step()
                    position["global_step"] += 1
                    consecutive_skips = 0
                    bar.update(1)
                else:  # the data moves on, the update is made up with the next batches
                    position["skipped_updates"] += 1
                    consecutive_skips += 1
                    logger.warning("%s at update %d: update skipped (%d skipped so far)", why,
                                   position["global_step"] + 1, position["skipped_updates"])
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        raise DreamBoothError(f"{consecutive_skips} updates in a row were skipped ({why}); training "
                                              "has diverged: lower --learning_rate, or resume from an earlier "
                                              "checkpoint")
                global_step = position["global_step"]
                update_seconds.append(time.perf_counter() - update_started)
                update_cpu = time.process_time() - update_cpu  # CPU time: robust on a busy machine
                logged = stepped and rank == 0
                if logged:
                    bar.set_postfix(loss=f"{group_loss:.4f}", lr=f"{lr:.2e}")
                    if global_step % args.logging_steps == 0:
                        writer.add_scalar("train/loss", group_loss, global_step)
                        writer.add_scalar("train/lr", lr, global_step)
                        writer.add_scalar("train/update_seconds", update_seconds[-1], global_step)
                        writer.add_scalar("train/update_cpu_seconds", update_cpu, global_step)
                        writer.add_scalar("train/skipped_updates", position["skipped_updates"], global_step)
                    if diag and global_step % args.diagnostics_steps == 0:
                        with borrowed(parked), stop_signal.interruptible("Diagnostics"), saving(
                                os.path.join(args.output_dir, diagnostics.CSV_FILE), resume_fix(args.output_dir)):
                            diag.measure(global_step)
                if signalled or stepped and global_step % args.save_steps == 0:
                    save_checkpoint(args, family, models, tokenizers, optimizer, lr_scheduler, scaler, position)
                if logged and args.validation_prompt and global_step % args.validation_steps == 0 and not signalled:
                    with borrowed(parked), stop_signal.interruptible("Validation"):
                        validate(args, family, parts, writer, global_step, autocast)
                    validated_at = global_step
                if signalled:
                    raise Interrupted(f"stopped by a signal after update {global_step}; checkpoint saved: resume with "
                                      f"--resume_from_checkpoint latest and the same --output_dir {args.output_dir}")
                if global_step >= args.max_train_steps:
                    stop = True
                    break
            epoch += 1
    elapsed = time.time() - started
    if world_size > 1:
        check_ranks_agree(trained)
    if rank == 0:
        logger.info("Trained to update %d in %.1f s; median update %.4f s (after the first)", global_step, elapsed,
                    float(np.median(update_seconds[1:] or update_seconds or [0.0])))
        if paddle.device.get_device().startswith("gpu"):  # tools/gpu_check.sh reads this line
            logger.info("Peak GPU memory allocated: %.0f MiB", paddle.device.cuda.max_memory_allocated() / 2**20)
        set_phase("saving the trained model", f"{args.output_dir} holds no half-written model and complete "
                  "checkpoints are kept: rerun the same command with --resume_from_checkpoint latest")
        save_final(args, family, models, tokenizers)
        set_phase("validating the trained model", f"the trained model is saved in {args.output_dir}")
        with borrowed(parked):
            if args.validation_prompt and validated_at != global_step:
                validate(args, family, parts, writer, global_step, autocast)
            if diag:
                with saving(os.path.join(args.output_dir, diagnostics.PLOT_FILE),
                            f"the trained model is saved in {args.output_dir}"):
                    diag.finish(global_step)
        writer.close()
        if args.export_single_file:
            set_phase("exporting", f"the trained model is saved in {args.output_dir}; python export_single_file.py "
                      f"{args.output_dir} exports it later")
            export_result(args, family)
    barrier()


def prefetch(fn, inputs, workers):
    """fn over inputs, in order; with workers > 0, up to 2 x workers results are prepared ahead."""
    if not workers:
        yield from map(fn, inputs)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending = collections.deque()
        for x in inputs:
            pending.append(pool.submit(fn, x))
            if len(pending) > 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------------------------
# Signals. SIGTERM and Ctrl-C end every phase with one line saying what was kept (exit code 130).
# Outside training they stop at once: every write is staged and committed by a rename that signals
# wait for, so nothing half-written is left under a final name. In training they stop after the
# current update, with a checkpoint.

# What the run is doing, and what an interrupt now leaves behind; set_phase keeps it current.
PHASE = ["starting", "nothing was written"]


def set_phase(doing, kept):
    PHASE[:] = [doing, kept]


def interrupt(signum, frame):
    doing, kept = PHASE
    raise Interrupted(f"stopped by {signal_name(signum)} while {doing}; {kept}")


@contextlib.contextmanager
def interrupt_handlers():
    """SIGTERM and Ctrl-C raise Interrupted, naming the phase. Install after importing Paddle, which
    puts its own SIGTERM handler (a C++ stack dump) in place at import."""
    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGINT)}
    set_phase("starting", "nothing was written")
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGTERM and SIGINT until a few renames are done, so that they happen all or not at all."""
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequest:
    """Truthy once SIGTERM or Ctrl-C asked training to stop (see stop_signals)."""

    def __init__(self):
        self.signals, self.cut_short = [], False

    def __bool__(self):
        return bool(self.signals)

    @contextlib.contextmanager
    def interruptible(self, what):
        """Work a signal should cut short rather than wait for (validation, diagnostics): it stops
        at once, and training stops after the next update, with its checkpoint."""
        self.cut_short = True
        try:
            yield
        except CutShort:
            logger.warning("%s stopped; nothing of it was written", what)
        finally:
            self.cut_short = False


class CutShort(BaseException):
    """Raised by a signal inside StopRequest.interruptible."""


@contextlib.contextmanager
def stop_signals(global_step):
    """SIGTERM or a first Ctrl-C asks to stop after the current update (the yielded StopRequest turns
    true); a second Ctrl-C aborts at once, without a checkpoint. The previous handlers come back
    afterwards. `global_step` is a callable giving the number of finished updates."""
    request = StopRequest()

    def handle(signum, frame):
        if request and signum == signal.SIGINT:
            raise Interrupted(f"aborted by a second Ctrl-C after update {global_step()}, without a checkpoint of it; "
                              "complete checkpoints are kept: resume with --resume_from_checkpoint latest")
        request.signals.append(signum)
        logger.warning("%s received: stopping after this update and writing a checkpoint (Ctrl-C again to "
                       "abort without one)", signal_name(signum))
        if request.cut_short:
            raise CutShort

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def agree_across_ranks(loss, stop_signal):
    """(mean loss over ranks, whether any rank was asked to stop)."""
    import paddle
    import paddle.distributed as dist

    if dist.get_world_size() == 1:
        return float(loss), bool(stop_signal)
    both = paddle.stack([loss.astype("float32").reshape([]), paddle.to_tensor(float(bool(stop_signal)))])
    dist.all_reduce(both)
    loss_sum, stops = both.tolist()
    return loss_sum / dist.get_world_size(), stops > 0


def check_ranks_agree(models):
    """Data parallel must leave every rank with the same weights; a silent divergence would be
    saved by rank 0 alone, so compare a fingerprint of the weights across ranks."""
    import paddle
    import paddle.distributed as dist

    fingerprint = paddle.to_tensor([sum(float(p.astype("float64").abs().sum()) for m in models
                                        for p in m.parameters())], dtype="float64")
    gathered = []
    dist.all_gather(gathered, fingerprint)
    values = [g.item() for g in gathered]
    if max(values) != min(values):
        raise DreamBoothError(f"ranks ended with different weights (fingerprints {values})")
    logger.info("Weights identical on all %d ranks (fingerprint %.10g)", len(values), values[0])


def find_resume_checkpoint(args):
    """The checkpoint to resume from, verified against its manifest: `latest` is the newest one that
    verifies (newer damaged ones are skipped, with the reason); a named one must verify."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        found, skipped = newest_good_checkpoint(args.output_dir)
        for folder, problem in skipped:
            logger.warning("--resume_from_checkpoint latest: skipping %s, which does not verify: %s", folder, problem)
        if skipped and not found:
            raise DreamBoothError(f"--resume_from_checkpoint latest: none of the checkpoints in {args.output_dir} "
                                  f"verifies ({skipped[0][1]}); delete them to start afresh, or use a new --output_dir")
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting fresh", args.output_dir)
            return None
    else:
        found = args.resume_from_checkpoint
        if not any(os.path.isfile(os.path.join(found, name)) for name in ("training_state.json", MANIFEST)):
            raise DreamBoothError(f"--resume_from_checkpoint {found}: not a checkpoint folder (no "
                                  "training_state.json); use latest or an output_dir/checkpoint-<step> folder")
        problem = checkpoint_problem(found)
        if problem:
            raise DreamBoothError(f"--resume_from_checkpoint {found}: {problem}; {good_checkpoint_advice(found)}")
    if not os.path.isfile(os.path.join(found, MANIFEST)):
        logger.warning("%s has no %s (an earlier version wrote it): resuming without verifying its files", found,
                       MANIFEST)
    return found


def read_training_state(args, folder):
    """The checkpoint's position, after checking that it was made by a compatible run."""
    with reading_checkpoint(folder, "training_state.json"):
        with open(os.path.join(folder, "training_state.json"), encoding="utf-8") as f:
            state = json.load(f)
        saved_args = dict(state["args"])
    for key, saved in saved_args.items():
        if getattr(args, key) is not None and getattr(args, key) != saved:
            shown = key if key != "world_size" else "number of processes"
            raise DreamBoothError(f"--{shown} is {getattr(args, key)!r} but {folder} was trained with {saved!r}; "
                                  f"resume with the same value or start a new --output_dir")
    return state


def restore_training_state(folder, state, optimizer, lr_scheduler, scaler, models, rank):
    import paddle

    back = {v: k for k, v in structured_names(models).items()}
    with reading_checkpoint(folder, "optimizer.pdopt"):
        # As numpy arrays, the moments wait in host memory until the first update creates each accumulator
        # on the device and takes its value; as tensors they would be loaded onto the device now, beside
        # the parts that are parked only later.
        saved = paddle.load(os.path.join(folder, "optimizer.pdopt"), return_numpy=True)
        optimizer.set_state_dict(rename_state(saved, back))
    with reading_checkpoint(folder, "training_state.json"):
        lr_scheduler.set_state_dict(state["lr_scheduler"])
        restore_scaler(scaler, state.get("grad_scaler"))
        position = dict(global_step=state["global_step"], epoch=state["epoch"], batch=state["batch"],
                        skipped_updates=state.get("skipped_updates", 0))
    with reading_checkpoint(folder, f"rng_state_{rank}.pkl"):
        load_rng_state(os.path.join(folder, f"rng_state_{rank}.pkl"))
    return position


def check_output_dir(args, resume_from):
    """Refuse to overwrite a finished run; check that output_dir can be written. Writes nothing."""
    finished = any(os.path.exists(os.path.join(args.output_dir, name)) for name in FINISHED_MARKERS)
    if finished and not resume_from and not args.overwrite_output_dir:
        raise DreamBoothError(f"--output_dir {args.output_dir} already holds a trained pipeline; pass "
                              "--overwrite_output_dir, --resume_from_checkpoint latest, or choose another folder")
    existing = os.path.abspath(args.output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise DreamBoothError(f"--output_dir {args.output_dir} is not writable ({existing} is not a writable "
                              "folder); choose a folder you can write to")


def cli(argv=None):
    """The program: a problem the user can fix, or an interrupt, ends as one line on stderr; returns
    the exit code (0, 1 for errors, 130 for interrupts; argparse's usage errors exit with 2)."""
    try:
        main(parse_args(argv))
    except Interrupted as e:
        print(f"train_dreambooth.py: {e}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:  # Ctrl-C before the handlers are in place (Python's own start-up)
        print("train_dreambooth.py: stopped by Ctrl-C while starting; nothing was written", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except DreamBoothError as e:
        print(f"train_dreambooth.py: error: {e}", file=sys.stderr)
        return 1
    return 0


def exit_now(code):
    """Ends a process of a multi-process run without C++ teardown. Under load, rank 0 (which hosts
    the launcher's TCP store) was seen to die of SIGABRT during interpreter shutdown after a run had
    finished and saved everything, so the launcher reported a failed run. Everything is written and
    closed by now, so nothing is lost by skipping the teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = cli()
    if int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        exit_now(code)
    sys.exit(code)
