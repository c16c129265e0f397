"""Model families: what differs between Stable Diffusion 1.x/2.x, SDXL and SD3, behind one seam.

train_dreambooth.py's loop knows no family. `for_model(model)` reads `_class_name` from the model's
model_index.json and returns one small object; the trainer, diagnostics and export talk only to it. A new
family subclasses SD (the reference), overrides what differs and is registered in FAMILIES.

  names       pipeline_class_name, denoiser_name ("unet"/"transformer"), tokenizer_names and
              text_encoder_names (pipeline component names, in pipeline order), trained_text_encoders
              (what --train_text_encoder trains), lora_projections (sub-layers of every Attention layer
              of the denoiser that get LoRA), vae_overflows_in_fp16 (keep the VAE fp32 under fp16).
  check_args(args)                    refuse flags this family does not support (one line); sets
                                      args.class_sampler when not given. A subclass calls SD's, which
                                      refuses SD3's flags, or replaces it whole (SD3).
  unreachable(name, text_encoder)     parameter prefixes the conditioning never reads (frozen, no LoRA).
  load(args, resume_from, reading_checkpoint, place) -> Parts
                                      tokenizers and text_encoders ({component name: object}), vae,
                                      denoiser, noise_scheduler. Resuming a full fine-tune loads the
                                      trained parts from the checkpoint folder (reading_checkpoint names
                                      a file that fails). Every model is loaded through
                                      place(component name, loader) (the trainer's: frozen parts are
                                      loaded on the host, cast and then moved to the device).
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
  enable_gradient_checkpointing(denoiser)
  add_denoiser_lora(denoiser, rank, alpha) -> trainable parameter count; denoiser_lora_state(denoiser,
                                      rank, alpha) -> what save_lora_weights writes, alpha / rank folded in;
                                      load_denoiser_lora(pipe, folder) (static: train_dreambooth.load_lora),
                                      lora_loads_plainly (pipe.load_lora_weights reads it as it is).
  absent_components()                 pipeline components the run goes without, as None (SD3 without T5).
The VAE's latents are vae_latents(posterior sample, vae.config): shifted by shift_factor where the VAE
has one (SD3's), then scaled by scaling_factor.
"""
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from common import DreamBoothError, first_line, parameter_count

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
    if not os.path.isdir(model):
        from ppdiffusers import DiffusionPipeline

        return load_part(model, "model_index.json", lambda: DiffusionPipeline.load_config(model))
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DreamBoothError(f"--pretrained_model_name_or_path {model}: cannot read its model_index.json "
                              f"({first_line(e)}); give a pipeline folder or model id") from e


def for_model(model):
    """The family of a pipeline folder or model id, from its model_index.json's _class_name."""
    if not os.path.isdir(model):  # said before its first file is fetched
        source, cache = download_source()
        logger.info("%s is not a folder on disk: downloading it from %s into %s (once; later runs read the cache; "
                    "FROM_HF_HUB=1 downloads from the Hugging Face Hub)", model, source, cache)
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


def load_component(model, component, cls, checkpoint=None, reading_checkpoint=None):
    """A component of the model, or of the checkpoint folder a full fine-tune resumes from
    (reading_checkpoint(folder, name): the context that names a checkpoint file that fails to load)."""
    if checkpoint:
        with (reading_checkpoint or (lambda *a: contextlib.nullcontext()))(checkpoint, component):
            return cls.from_pretrained(checkpoint, subfolder=component)
    return load_part(model, component, lambda: cls.from_pretrained(model, subfolder=component))


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


def vae_latents(sample, vae_config):
    """A VAE posterior sample in the denoiser's latent space: shifted (SD3's VAE has a shift_factor),
    then scaled by the VAE's scaling_factor."""
    if vae_config.get("shift_factor") is not None:
        sample = sample - vae_config.shift_factor
    return sample * vae_config.scaling_factor


def add_attention_lora(denoiser, projections, rank, alpha):
    """Freeze the denoiser and give the named projections of every attention layer a ppdiffusers
    LoRALinearLayer; returns the number of trainable parameters."""
    from ppdiffusers.models.attention_processor import Attention
    from ppdiffusers.models.lora import LoRALinearLayer

    for p in denoiser.parameters():
        p.stop_gradient = True
    for layer in denoiser.sublayers():
        if isinstance(layer, Attention):
            for linear in (layer.get_sublayer(name) for name in projections):
                fan_in, fan_out = linear.weight.shape  # Paddle stores Linear weights [in, out]
                linear.set_lora_layer(LoRALinearLayer(fan_in, fan_out, rank=rank, network_alpha=alpha))
    return parameter_count(p for p in denoiser.parameters() if not p.stop_gradient)


class SD:
    """Stable Diffusion 1.x / 2.x: one CLIP (or BERT-like) text encoder, a UNet, DDPM training."""
    label = "Stable Diffusion 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_name = "unet"
    denoiser_class = "UNet2DConditionModel"  # ppdiffusers' class names: imported when loading
    scheduler_class = "DDPMScheduler"  # the training noise schedule
    tokenizer_names = ("tokenizer",)
    text_encoder_names = ("text_encoder",)
    trained_text_encoders = ("text_encoder",)
    lora_projections = ("to_q", "to_k", "to_v", "to_out.0")
    vae_overflows_in_fp16 = False
    # load_sampling_pipeline's extra from_pretrained arguments: no safety checker for class images
    sampling_kwargs = dict(safety_checker=None, requires_safety_checker=False)
    class_sampler = "dpm_solver"  # --class_sampler's default
    # Flags of flow-matching families only, with their defaults: another family refuses other values.
    flow_matching_flags = dict(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                               max_sequence_length=None, drop_t5=False)

    def __init__(self, model):
        self.model = model

    @property
    def pipeline_class(self):
        import ppdiffusers

        return getattr(ppdiffusers, self.pipeline_class_name)

    def check_args(self, args):
        self.check_flow_matching_flags(args)
        args.class_sampler = args.class_sampler or self.class_sampler

    def check_flow_matching_flags(self, args):
        for flag, default in self.flow_matching_flags.items():
            if getattr(args, flag) != default:
                raise DreamBoothError(f"--{flag} applies to Stable Diffusion 3 only; this is a {self.label} model, "
                                      "drop the flag")

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

    def used_text_encoders(self):
        """The text encoders this run reads (all the model has, for SD and SDXL)."""
        return self.text_encoder_names

    def load(self, args, resume_from=None, reading_checkpoint=None, place=None):
        """The parts; resuming a full fine-tune takes the trained ones from the checkpoint (LoRA resumes
        onto the base). reading_checkpoint(folder, name): the context that names a checkpoint file that
        fails to load. place(name, loader): returns the model of that pipeline component, loading it
        with loader() where it chooses (default: loader() as it is)."""
        import ppdiffusers

        place = place or (lambda name, loader: loader())
        model, checkpoint = self.model, resume_from if not args.use_lora else None
        tokenizers = self.load_tokenizers(args)
        text_encoders = {name: place(name, lambda name=name: load_component(
            model, name, load_text_encoder_class(model, name),
            args.train_text_encoder and name in self.trained_text_encoders and checkpoint, reading_checkpoint))
            for name in self.used_text_encoders()}
        vae = place("vae", lambda: load_vae(model, args.pretrained_vae_model_name_or_path))
        denoiser = place(self.denoiser_name, lambda: load_component(
            model, self.denoiser_name, getattr(ppdiffusers, self.denoiser_class), checkpoint, reading_checkpoint))
        scheduler_class = getattr(ppdiffusers, self.scheduler_class)
        noise_scheduler = load_part(model, "scheduler",
                                    lambda: scheduler_class.from_pretrained(model, subfolder="scheduler"))
        return Parts(tokenizers, text_encoders, vae, denoiser, noise_scheduler)

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

    def enable_gradient_checkpointing(self, denoiser):
        denoiser.enable_gradient_checkpointing()

    # --- LoRA

    def add_denoiser_lora(self, denoiser, rank, alpha):
        """Freeze the denoiser and put LoRA on lora_projections; returns the number of trainable parameters."""
        return add_attention_lora(denoiser, self.lora_projections, rank, alpha)

    def denoiser_lora_state(self, denoiser, rank, alpha):
        """The denoiser's LoRA as the pipeline's load_lora_weights reads it (before the prefix
        save_lora_weights adds). The loader knows no alpha: alpha / rank is folded into the up weights."""
        from ppdiffusers.training_utils import unet_lora_state_dict

        # save_lora_weights adds the "unet." prefix that unet_lora_state_dict already carries
        return {k.removeprefix("unet."): v * (alpha / rank) if ".up." in k else v
                for k, v in unet_lora_state_dict(denoiser).items()}

    lora_loads_plainly = True  # the pipeline's own load_lora_weights reads the denoiser's LoRA as it is

    @staticmethod
    def load_denoiser_lora(pipe, folder):
        pipe.load_lora_weights(folder)

    # --- pipelines

    def absent_components(self):
        """Pipeline components this run goes without, as None (from_pretrained would load them)."""
        return {}

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
        return self.pipeline_class.from_pretrained(self.model, **self.sampling_kwargs, **self.absent_components(),
                                                   **kwargs, **({"vae": vae} if vae is not None else {}))

    # --- saving

    def save_lora_weights(self, folder, denoiser_state):
        self.pipeline_class.save_lora_weights(folder, unet_lora_layers=denoiser_state)

    def export(self, folder, out, lora, half):
        """--export_single_file: the result saved in folder, in the original single-file layout (a LoRA:
        kohya's). Returns its summary."""
        import export_single_file

        if lora:  # SD 2.x LoRAs have SD 1.x's kohya names
            layout = export_single_file.LAYOUTS[self.pipeline_class_name]
            return export_single_file.export_lora(folder, out, half=half, layout=layout)
        layout = export_single_file.checkpoint_layout(self.pipeline_class_name, folder)  # SD 1.x or 2.x
        return export_single_file.export_pipeline(folder, out, half=half, layout=layout)


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
        super().check_args(args)
        if args.tokenizer_name:
            raise DreamBoothError("--tokenizer_name: SDXL has two tokenizers, which come from the model folder; "
                                  "drop the flag")

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


class SD3(SD):
    """Stable Diffusion 3: two CLIPs with projections and T5, an MMDiT transformer, trained by flow
    matching. The math, and what ppdiffusers 0.29 needs repaired for it, are in family_sd3.py."""
    label = "Stable Diffusion 3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trained_text_encoders = ("text_encoder", "text_encoder_2")  # T5 stays frozen, as in diffusers
    sampling_kwargs = {}
    class_sampler = "model"  # flow matching samples with its own scheduler

    def __init__(self, model):
        super().__init__(model)
        import family_sd3

        family_sd3.install_attention_fallback()  # before any SD3 model runs
        self.ships_t5 = (model_index(model).get("text_encoder_3") or [None])[0] is not None
        self.use_t5 = self.ships_t5
        self.weighting = dict(scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        self.max_sequence_length = None
        self.t5_cache = {}  # T5's output per token ids: T5 is never trained
        self.schedule = None
        self.joint_attention_dim = self.sequence_length = None

    @property
    def lora_projections(self):
        import family_sd3

        return family_sd3.TRANSFORMER_LORA_TARGETS

    def check_args(self, args):
        if args.class_sampler not in (None, "model"):
            raise DreamBoothError(f"--class_sampler {args.class_sampler}: SD3 samples class images with its own "
                                  "flow-matching scheduler; drop the flag")
        args.class_sampler = "model"
        for flag, why in [("tokenizer_name", "its three tokenizers come from the model folder"),
                          ("export_single_file", "the output folder loads with StableDiffusion3Pipeline"),
                          ("enable_xformers_memory_efficient_attention",
                           "its attention uses ppdiffusers' memory-efficient kernel wherever Paddle has one")]:
            if getattr(args, flag):
                raise DreamBoothError(f"--{flag} is not supported for SD3 ({why}); drop the flag")
        if args.snr_gamma is not None:
            raise DreamBoothError("--snr_gamma weighs noise-prediction losses; SD3 is trained by flow matching: "
                                  "weigh it with --weighting_scheme and drop --snr_gamma")
        if args.max_sequence_length is not None and args.max_sequence_length <= 0:
            raise DreamBoothError(f"--max_sequence_length must be a positive number, got {args.max_sequence_length}")
        self.use_t5 = self.ships_t5 and not args.drop_t5
        self.weighting = dict(scheme=args.weighting_scheme, logit_mean=args.logit_mean, logit_std=args.logit_std,
                              mode_scale=args.mode_scale)
        self.max_sequence_length = args.max_sequence_length

    # --- loading

    def load_tokenizers(self, args):
        import ppdiffusers.transformers as transformers

        index = model_index(self.model)
        return {name: load_part(self.model, name, lambda: getattr(transformers, index[name][1]).from_pretrained(
            self.model, subfolder=name)) for name in self.tokenizer_names[:len(self.used_text_encoders())]}

    def used_text_encoders(self):
        """Without T5 (--drop_t5, or a model saved without it) T5 is not loaded at all."""
        return self.text_encoder_names[:3 if self.use_t5 else 2]

    def load(self, args, resume_from=None, reading_checkpoint=None, place=None):
        import family_sd3

        parts = super().load(args, resume_from, reading_checkpoint, place)
        # Kept apart: a pipeline built on this scheduler would replace its schedule by the sampling one.
        self.schedule = family_sd3.training_schedule(parts.noise_scheduler)
        self.joint_attention_dim = parts.denoiser.config.joint_attention_dim
        self.sequence_length = self.t5_length(parts.tokenizers)
        self.t5_cache = {}
        return parts

    # --- prompts

    def t5_length(self, tokenizers):
        """--max_sequence_length, by default the CLIP tokenizer's length, which ppdiffusers' pipeline gives T5."""
        return self.max_sequence_length or tokenizers["tokenizer"].model_max_length

    def tokenize(self, tokenizers, prompt):
        import family_sd3

        clip_length = tokenizers["tokenizer"].model_max_length  # the pipeline's: both CLIPs read the first's
        ids = tuple(family_sd3.tokenize(tokenizers[name], prompt, clip_length) for name in self.tokenizer_names[:2])
        if self.use_t5:
            ids += (family_sd3.tokenize(tokenizers["tokenizer_3"], prompt, self.t5_length(tokenizers)),)
        return ids

    def max_tokens(self, tokenizers):
        return tokenizers["tokenizer"].model_max_length + self.t5_length(tokenizers)

    def encode(self, text_encoders, ids):
        """prompt_embeds (both CLIPs' penultimate hidden states side by side, zero-padded to T5's width,
        then T5's tokens) and pooled_prompt_embeds (both pooled projections), as
        StableDiffusion3Pipeline.encode_prompt lays them out."""
        import paddle

        import family_sd3

        clips = [family_sd3.encode_clip(text_encoders[name], [row[i] for row in ids])
                 for i, name in enumerate(self.text_encoder_names[:2])]
        t5 = text_encoders.get("text_encoder_3")
        if t5 is None:
            t5_states = family_sd3.encode_t5(None, None, len(ids), self.sequence_length, self.joint_attention_dim)
        else:
            with paddle.no_grad():
                for row in ids:
                    key = tuple(row[2])
                    if key not in self.t5_cache:
                        self.t5_cache[key] = family_sd3.encode_t5(t5, [row[2]], 1, None, None)
            t5_states = paddle.concat([self.t5_cache[tuple(row[2])] for row in ids])
        prompt_embeds, pooled = family_sd3.join_embeddings([c[0] for c in clips], [c[1] for c in clips], t5_states)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    # --- the noise step and the denoiser

    def draw_time(self, rng, noise_scheduler):
        """An index into the training schedule, drawn with --weighting_scheme's density."""
        import family_sd3

        return family_sd3.draw_schedule_index(rng, num_train_timesteps=noise_scheduler.config.num_train_timesteps,
                                              **self.weighting)

    def noise_step(self, noise_scheduler, latents, noise, times, snr_gamma=None):
        """Rectified flow: noisy = (1 - sigma) latents + sigma noise, target = noise - latents, with sigma
        from the scheduler's shifted training schedule at each sample's index; the loss weight of
        --weighting_scheme (None where it is 1)."""
        import paddle

        import family_sd3

        timesteps, sigmas = self.schedule if self.schedule is not None else \
            family_sd3.training_schedule(noise_scheduler)
        index = np.asarray(times, dtype=np.int64)
        sigma = paddle.to_tensor(sigmas[index], dtype="float32")
        noisy, target = family_sd3.flow_matching_inputs(latents, noise, sigma)
        weight = family_sd3.loss_weighting(self.weighting["scheme"], sigmas[index])
        weight = None if np.all(weight == 1.0) else paddle.to_tensor(weight, dtype="float32")
        return noisy, paddle.to_tensor(timesteps[index], dtype="float32"), target, weight

    def denoise(self, denoiser, noisy, timesteps, cond, geometry):
        return denoiser(hidden_states=noisy, encoder_hidden_states=cond["prompt_embeds"],
                        pooled_projections=cond["pooled_prompt_embeds"], timestep=timesteps).sample

    def enable_gradient_checkpointing(self, denoiser):
        import family_sd3

        family_sd3.checkpoint_transformer_blocks(denoiser)

    # --- LoRA

    def add_denoiser_lora(self, denoiser, rank, alpha):
        import family_sd3

        return family_sd3.add_transformer_lora(denoiser, rank, alpha)

    def denoiser_lora_state(self, denoiser, rank, alpha):
        import family_sd3

        return family_sd3.lora_state_for_loading(denoiser, rank, alpha)

    lora_loads_plainly = False  # ppdiffusers' loader needs USE_PEFT_BACKEND=True (see family_sd3.load_lora)

    @staticmethod
    def load_denoiser_lora(pipe, folder):
        import family_sd3

        family_sd3.load_lora(pipe, folder)

    def save_lora_weights(self, folder, denoiser_state):
        self.pipeline_class.save_lora_weights(folder, transformer_lora_layers=denoiser_state)

    # --- pipelines

    def absent_components(self):
        return {} if self.use_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def components(self, parts):
        return {**self.absent_components(), **super().components(parts)}

    def pipeline(self, parts, scheduler):
        return self.pipeline_class(**self.components(parts), scheduler=scheduler)

    def sampling_scheduler(self, noise_scheduler):
        from ppdiffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)


FAMILIES = {cls.pipeline_class_name: cls for cls in (SD, SDXL, SD3)}
