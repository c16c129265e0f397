"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, behind one seam.

train_dreambooth.py's loop knows no family. `for_model(model)` reads `_class_name` from the model's
model_index.json and returns one small object; the trainer, diagnostics and export talk only to it. A new
family subclasses SD (the reference), overrides what differs and is registered in FAMILIES.

  names       pipeline_class_name, denoiser_name ("unet"/"transformer"), tokenizer_names and
              text_encoder_names (pipeline component names, in pipeline order), trained_text_encoders
              (what --train_text_encoder trains), lora_projections (sub-layers of every Attention layer
              of the denoiser that get LoRA), vae_overflows_in_fp16 (keep the VAE fp32 under fp16).
  check_args(args)                    refuse flags this family does not support (one line).
  unreachable(name, text_encoder)     parameter prefixes the conditioning never reads (frozen, no LoRA).
  load(args, resume_from, reading_checkpoint) -> Parts
                                      tokenizers and text_encoders ({component name: object}), vae,
                                      denoiser, noise_scheduler. Resuming a full fine-tune loads the
                                      trained parts from the checkpoint folder (reading_checkpoint names
                                      a file that fails).
  tokenize(tokenizers, prompt)        -> per tokenizer (input ids, attention mask) (cached per prompt).
  encode(text_encoders, ids)          ids: list (batch) of tokenize() results -> conditioning, a dict
                                      of tensors with the batch first. For frozen encoders the trainer
                                      encodes each prompt once and concatenates the cached dicts per key.
  draw_time(rng, noise_scheduler)     the per-sample random time draw (NumPy, after the sample's noise,
                                      from the same keyed stream, so it is the same whatever the batch
                                      layout, number of processes or resumption).
  probe_times(rng, n, noise_scheduler) fixed times for the diagnostics probes.
  noise_step(noise_scheduler, latents, noise, times, snr_gamma=None)
                                      -> (noisy, timesteps, target, per-sample loss weight or None);
                                      latents are the VAE's, times the draws of the batch's samples.
  denoise(denoiser, noisy, timesteps, cond, geometry) -> prediction. geometry: per-sample Geometry of
                                      the crop the data side really made (SDXL's add_time_ids).
  pipeline(parts, scheduler)          a pipeline around the models in memory (validation, diagnostics).
  sampling_scheduler(noise_scheduler) the scheduler of validation images and diagnostics probes.
  from_pretrained(vae=None, **kw)     the base pipeline (class images).
  save_lora_weights(folder, state)    the denoiser's LoRA, where the pipeline's load_lora_weights reads it
                                      (text-encoder LoRA: the trainer's own file, common.TEXT_ENCODER_LORA).
  export(folder, out, lora, half)    --export_single_file, from the saved result.
The VAE's latents are (posterior sample) x vae.config.scaling_factor in the trainer (a family with a
shift factor, as SD3's VAE has, is the place to extend that).
"""
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from common import DreamBoothError, first_line

logger = logging.getLogger("dreambooth")


class Geometry(NamedTuple):
    """Where a training sample came from: the image's size before resizing, the top-left corner of the
    crop in the resized (and, if flipped, mirrored) image, and the size trained at. SDXL was trained
    conditioned on exactly these six numbers (its add_time_ids)."""
    original_height: int
    original_width: int
    crop_top: int
    crop_left: int
    height: int
    width: int


@dataclass
class Parts:
    tokenizers: dict
    text_encoders: dict
    vae: object
    denoiser: object
    noise_scheduler: object


def model_index(model):
    """model_index.json of a pipeline folder or model id, as a dict."""
    path = os.path.join(model, "model_index.json")
    try:
        if os.path.isdir(model):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        from ppdiffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as e:
        raise DreamBoothError(f"--pretrained_model_name_or_path {model}: cannot read its model_index.json "
                              f"({first_line(e)}); give a pipeline folder or model id") from e


def for_model(model):
    """The family of a pipeline folder or model id, from its model_index.json's _class_name."""
    name = model_index(model).get("_class_name")
    if name not in FAMILIES:
        raise DreamBoothError(f"--pretrained_model_name_or_path {model} is a {name} model; this trainer supports "
                              f"{', '.join(FAMILIES)}")
    return FAMILIES[name](model)


def download_source():
    """(where ppdiffusers downloads a model id from, the folder it caches it in), as its environment
    variables FROM_HF_HUB and FROM_AISTUDIO choose."""
    from ppdiffusers.utils import constants

    if constants.FROM_AISTUDIO:
        return "AI Studio", constants.PPDIFFUSERS_CACHE
    if constants.FROM_HF_HUB:
        return "the Hugging Face Hub", constants.DIFFUSERS_CACHE
    return f"Paddle's model server ({constants.PPNLP_BOS_RESOLVE_ENDPOINT})", constants.PPDIFFUSERS_CACHE


def load_part(model, component, fn):
    """fn(), its failure named as the component of the model that could not be loaded (or downloaded)."""
    try:
        return fn()
    except DreamBoothError:
        raise
    except Exception as e:
        if not os.path.isdir(model):
            source, _ = download_source()
            reason = first_line(e).split(". ")[0][:200]
            raise DreamBoothError(
                f"cannot download the {component} of {model} from {source}: {reason}; check the model id, the "
                "network and that you accepted the model's licence, or give a folder holding the downloaded "
                "model to --pretrained_model_name_or_path") from e
        raise DreamBoothError(f"cannot load the {component} of {model} ({first_line(e)}); check that "
                              f"{component}/ is complete, or give another --pretrained_model_name_or_path") from e


def mask_argument(text_encoder, masks):
    """The attention mask, for text encoders whose config asks for one (as the pipelines pass it:
    BERT-like encoders need it, CLIP's are trained without)."""
    import paddle

    config = getattr(text_encoder, "_layers", text_encoder).config  # through a DataParallel wrapper
    return dict(attention_mask=paddle.to_tensor(masks)) if getattr(config, "use_attention_mask", False) else {}


def load_text_encoder_class(model, subfolder):
    """The text encoder class named in the model's own config (CLIP for SD, BERT-like for Taiyi, ...)."""
    import ppdiffusers.transformers as transformers
    from ppdiffusers.transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(model, subfolder=subfolder)
    name = (config.get("architectures") or ["CLIPTextModel"])[0]
    if not hasattr(transformers, name):
        raise DreamBoothError(f"{subfolder} of {model} is a {name}, which ppdiffusers.transformers does not have")
    return getattr(transformers, name)


def load_vae(model, vae_path):
    """The model's own VAE, or the one --pretrained_vae_model_name_or_path names."""
    from ppdiffusers import AutoencoderKL

    if not vae_path:
        return load_part(model, "vae", lambda: AutoencoderKL.from_pretrained(model, subfolder="vae"))
    try:
        return AutoencoderKL.from_pretrained(vae_path)
    except Exception as e:
        raise DreamBoothError(f"--pretrained_vae_model_name_or_path {vae_path}: cannot load a VAE ({first_line(e)}); "
                              "give a VAE folder (with config.json) or model id, or drop the flag") from e


def min_snr_weight(snr, gamma, prediction_type):
    """Min-SNR loss weight: min(snr, gamma) / snr for epsilon; for velocity the target already carries a
    factor (snr + 1) relative to epsilon, so divide by snr + 1."""
    return snr.clip(max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)


class SD:
    """Stable Diffusion 1.x / 2.x: one CLIP (or BERT-like) text encoder, a UNet, DDPM training."""
    label = "Stable Diffusion 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_name = "unet"
    tokenizer_names = ("tokenizer",)
    text_encoder_names = ("text_encoder",)
    trained_text_encoders = ("text_encoder",)
    lora_projections = ("to_q", "to_k", "to_v", "to_out.0")
    vae_overflows_in_fp16 = False
    # load_sampling_pipeline's extra from_pretrained arguments: no safety checker for class images
    sampling_kwargs = dict(safety_checker=None, requires_safety_checker=False)

    def __init__(self, model):
        self.model = model

    @property
    def pipeline_class(self):
        import ppdiffusers

        return getattr(ppdiffusers, self.pipeline_class_name)

    def check_args(self, args):
        pass

    # --- loading

    def load_tokenizers(self, args):
        from ppdiffusers.transformers import AutoTokenizer

        if args.tokenizer_name:
            try:
                return {"tokenizer": AutoTokenizer.from_pretrained(args.tokenizer_name)}
            except Exception as e:
                raise DreamBoothError(f"--tokenizer_name {args.tokenizer_name}: cannot load a tokenizer "
                                      f"({first_line(e)}); give a tokenizer id or folder, or drop the flag") from e
        return {name: load_part(self.model, name, lambda: AutoTokenizer.from_pretrained(self.model, subfolder=name))
                for name in self.tokenizer_names}

    def load(self, args, resume_from=None, reading_checkpoint=None):
        """The parts; resuming a full fine-tune takes the trained ones from the checkpoint (LoRA resumes
        onto the base). reading_checkpoint(folder, name): the context that names a checkpoint file that
        fails to load."""
        from ppdiffusers import DDPMScheduler, UNet2DConditionModel

        model = self.model
        if not os.path.isdir(model):
            source, cache = download_source()
            logger.info("%s is not a folder on disk: downloading it from %s into %s (once; later runs read the cache; "
                        "FROM_HF_HUB=1 downloads from the Hugging Face Hub)", model, source, cache)

        def load(component, cls, trained):
            if resume_from and trained and not args.use_lora:
                with (reading_checkpoint or (lambda *a: contextlib.nullcontext()))(resume_from, component):
                    return cls.from_pretrained(resume_from, subfolder=component)
            return load_part(model, component, lambda: cls.from_pretrained(model, subfolder=component))

        tokenizers = self.load_tokenizers(args)
        text_encoders = {name: load(name, load_text_encoder_class(model, name),
                                    args.train_text_encoder and name in self.trained_text_encoders)
                         for name in self.text_encoder_names}
        vae = load_vae(model, args.pretrained_vae_model_name_or_path)
        unet = load("unet", UNet2DConditionModel, True)
        noise_scheduler = load_part(model, "scheduler",
                                    lambda: DDPMScheduler.from_pretrained(model, subfolder="scheduler"))
        return Parts(tokenizers, text_encoders, vae, unet, noise_scheduler)

    def unreachable(self, name, text_encoder):
        """Parameter-name prefixes of a text encoder that the conditioning never reads: they get no
        gradient, so they are frozen (and get no LoRA), which data parallel needs (its reducer would
        wait for their gradients)."""
        return ()

    # --- prompts

    def tokenize(self, tokenizers, prompt):
        """Per tokenizer: (input ids, attention mask), padded to its length."""
        tokens = [tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                            return_attention_mask=True) for tokenizer in tokenizers.values()]
        return tuple((t["input_ids"], t["attention_mask"]) for t in tokens)

    def max_tokens(self, tokenizers):
        return max(t.model_max_length for t in tokenizers.values())

    def encode(self, text_encoders, ids):
        import paddle

        text_encoder = text_encoders["text_encoder"]
        masks = mask_argument(text_encoder, [row[0][1] for row in ids])
        return {"prompt_embeds": text_encoder(paddle.to_tensor([row[0][0] for row in ids]), **masks)[0]}

    # --- the noise step and the denoiser

    def draw_time(self, rng, noise_scheduler):
        return int(rng.integers(0, noise_scheduler.config.num_train_timesteps))

    def probe_times(self, rng, n, noise_scheduler):
        """Stratified, so a few probes cover the whole schedule instead of clustering by chance."""
        strata = (np.arange(n) + rng.random(n)) * noise_scheduler.config.num_train_timesteps / n
        return rng.permutation(strata.astype(np.int64))

    def noise_step(self, noise_scheduler, latents, noise, times, snr_gamma=None):
        import paddle

        timesteps = paddle.to_tensor(np.asarray(times), dtype="int64")
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = noise_scheduler.config.prediction_type
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" \
            else noise
        weight = None
        if snr_gamma:
            from ppdiffusers.training_utils import compute_snr

            weight = min_snr_weight(compute_snr(noise_scheduler, timesteps), snr_gamma, prediction_type)
        return noisy, timesteps, target, weight

    def denoise(self, denoiser, noisy, timesteps, cond, geometry):
        return denoiser(noisy, timesteps, cond["prompt_embeds"]).sample

    # --- pipelines

    def components(self, parts):
        """The pipeline components that are models or tokenizers, by name."""
        return {self.denoiser_name: parts.denoiser, "vae": parts.vae, **parts.text_encoders, **parts.tokenizers}

    def pipeline(self, parts, scheduler):
        """A pipeline around the models in memory (no copy of the weights)."""
        return self.pipeline_class(**self.components(parts), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)

    def sampling_scheduler(self, noise_scheduler):
        from ppdiffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(noise_scheduler.config)

    def from_pretrained(self, vae=None, **kwargs):
        """The base pipeline (class images), with the VAE --pretrained_vae_model_name_or_path names."""
        return self.pipeline_class.from_pretrained(self.model, **self.sampling_kwargs, **kwargs,
                                                   **({"vae": vae} if vae is not None else {}))

    # --- saving

    def save_lora_weights(self, folder, denoiser_state):
        self.pipeline_class.save_lora_weights(folder, unet_lora_layers=denoiser_state)

    def export(self, folder, out, lora, half):
        """--export_single_file: the result saved in folder, in the original single-file layout (a LoRA:
        kohya's). Returns its summary."""
        import export_single_file

        if lora:
            return export_single_file.export_lora(folder, out, half=half)
        return export_single_file.export_pipeline(folder, out, half=half)


class SDXL(SD):
    """SDXL: two CLIP text encoders (penultimate hidden states of both, concatenated, and the second's
    pooled projection) and a UNet conditioned on those plus each sample's Geometry."""
    label = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    tokenizer_names = ("tokenizer", "tokenizer_2")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    trained_text_encoders = ("text_encoder", "text_encoder_2")
    vae_overflows_in_fp16 = True  # SDXL's own VAE; a fixed one comes with --pretrained_vae_model_name_or_path
    sampling_kwargs = dict(add_watermarker=False)

    def check_args(self, args):
        if args.tokenizer_name:
            raise DreamBoothError("--tokenizer_name: SDXL has two tokenizers, which come from the model folder; "
                                  "drop the flag")
        if args.export_single_file:
            raise DreamBoothError("--export_single_file is not supported for SDXL yet; drop the flag (the output "
                                  "folder loads with StableDiffusionXLPipeline)")

    def unreachable(self, name, text_encoder):
        if name != "text_encoder":
            return ()
        last = text_encoder.config.num_hidden_layers - 1  # the penultimate layer's output is the last read
        return f"text_model.encoder.layers.{last}.", "text_model.final_layer_norm."

    def encode(self, text_encoders, ids):
        """As SDXL was trained: the penultimate hidden states of both encoders, concatenated, and the
        pooled (projected) output of the second."""
        import paddle

        outputs = [text_encoders[name](paddle.to_tensor([row[i][0] for row in ids]), output_hidden_states=True)
                   for i, name in enumerate(self.text_encoder_names)]
        return {"prompt_embeds": paddle.concat([out.hidden_states[-2] for out in outputs], axis=-1),
                "pooled_prompt_embeds": outputs[-1][0]}  # the second encoder's projected text_embeds

    def denoise(self, denoiser, noisy, timesteps, cond, geometry):
        import paddle

        time_ids = paddle.to_tensor(np.asarray(geometry, dtype=np.float32))
        added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids}
        return denoiser(noisy, timesteps, cond["prompt_embeds"], added_cond_kwargs=added).sample

    def pipeline(self, parts, scheduler):
        return self.pipeline_class(**self.components(parts), scheduler=scheduler, add_watermarker=False)


FAMILIES = {cls.pipeline_class_name: cls for cls in (SD, SDXL)}
