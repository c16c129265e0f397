"""Export a DreamBooth result as ONE .safetensors file for Stable Diffusion WebUI / ComfyUI.

    python export_single_file.py OUTPUT_DIR [--out FILE] [--half]

OUTPUT_DIR is either
- a ppdiffusers pipeline folder (full fine-tuning): the file is a complete checkpoint in the original
  key layout, loadable as a checkpoint by WebUI, ComfyUI and the pipeline's `from_single_file`:
  for Stable Diffusion 1.x the CompVis one (`model.diffusion_model.*`, `first_stage_model.*`,
  `cond_stage_model.transformer.*`), for 2.x Stability's (the same UNet and VAE names, and OpenCLIP's
  names under `cond_stage_model.model.*` for its OpenCLIP-H text encoder), for SDXL Stability's SGM
  one (the same UNet and VAE names, `conditioner.embedders.0.transformer.*` for the CLIP-L text encoder and
  `conditioner.embedders.1.model.*`, OpenCLIP's names, for the second); or
- a LoRA output folder of train_dreambooth.py --use_lora (paddle_lora_weights.safetensors, no
  model_index.json; with --train_text_encoder also text_encoder_lora_weights.safetensors): the file
  is the LoRA in the kohya layout that WebUI, ComfyUI and `load_lora_weights` read
  (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; `lora_te_<module>...` for
  the text encoder; for SDXL, UNet modules under their SGM names as kohya's SDXL files have them,
  and `lora_te1_` / `lora_te2_` for its two text encoders; SD 2.x LoRAs have SD 1.x's names, as kohya's).
Both use PyTorch weight orientation. Default output: OUTPUT_DIR/<name of OUTPUT_DIR>.safetensors.
"""
import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field

import numpy as np

from common import LORA_WEIGHTS, TEXT_ENCODER_LORA, give_usual_file_modes


@dataclass(frozen=True)
class Layout:
    """One family's single-file layout: where its parts go, and its kohya LoRA names."""
    label: str
    # (pipeline component, key prefix, kind): kind "clip": a CLIPTextModel in Hugging Face CLIP names;
    # "open_clip": a CLIPTextModelWithProjection in OpenCLIP's; "open_clip_unprojected": a CLIPTextModel
    # in OpenCLIP's, with an identity text_projection (see _identity_projection)
    text_encoders: tuple
    # UNet modules of this family only (ppdiffusers name -> original name)
    unet_top: dict = field(default_factory=dict)
    # pipeline component -> kohya LoRA prefix
    lora_text_prefixes: dict = field(default_factory=lambda: {"text_encoder": "lora_te_"})
    # kohya names UNet LoRA modules by their ppdiffusers names for SD 1.x, by their SGM names for SDXL
    lora_unet_sgm_names: bool = False


UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD = Layout("Stable Diffusion 1.x", (("text_encoder", "cond_stage_model.transformer.", "clip"),))
SD2 = Layout("Stable Diffusion 2.x", (("text_encoder", "cond_stage_model.model.", "open_clip_unprojected"),))
SDXL = Layout("SDXL", (("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
                       ("text_encoder_2", "conditioner.embedders.1.model.", "open_clip")),
              # the pooled-prompt-and-sizes embedding ("text_time")
              unet_top={"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"},
              lora_text_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
              lora_unet_sgm_names=True)
LAYOUTS = {"StableDiffusionPipeline": SD, "StableDiffusionXLPipeline": SDXL}  # SD 2.x: see checkpoint_layout

# Key-mapping tables: ppdiffusers module name -> original module name. A name missing from a
# table is the same in both layouts (e.g. everything inside a UNet transformer block).
UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(path, table):
    """Rename the module part of `module.param` through `table`."""
    module, param = path.rsplit(".", 1)
    return f"{table.get(module, module)}.{param}"


def _indices(keys, pattern):
    return {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}


def _unet_key(key, layers, up_with_attn, top=UNET_TOP):
    """Original name of one UNet parameter, or None if the layout has no place for it."""
    # The original numbers the UNet's layers flat: every down block fills `layers` resnet(+attention)
    # slots plus one downsampler slot; every up block fills `layers + 1` slots, the last also
    # holding the upsampler, which sits after the attention when the block has one.
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        kind, block, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        if part == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
        if part == "upsamplers":
            slot = 2 if block in up_with_attn else 1
            return f"output_blocks.{block * (layers + 1) + layers}.{slot}.{rest}"
        index = 1 + block * (layers + 1) + j if kind == "down" else block * (layers + 1) + j
        if part == "resnets":
            return f"{'input' if kind == 'down' else 'output'}_blocks.{index}.0.{_rename(rest, UNET_RESNET)}"
        return f"{'input' if kind == 'down' else 'output'}_blocks.{index}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[1] == "resnets":
            return f"middle_block.{2 * int(m[2])}.{_rename(m[3], UNET_RESNET)}"
        return f"middle_block.1.{m[3]}"
    module, param = key.rsplit(".", 1)
    return f"{top[module]}.{param}" if module in top else None


def _vae_key(key, n_up):
    """Original name of one VAE parameter, or None if the layout has no place for it."""
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        if m[2] == "downsamplers":
            return f"encoder.down.{m[1]}.downsample.{m[4]}"
        return f"encoder.down.{m[1]}.block.{m[3]}.{_rename(m[4], VAE_RESNET)}"
    # The original decoder counts its up levels from the lowest resolution backwards.
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        level = n_up - 1 - int(m[1])
        if m[2] == "upsamplers":
            return f"decoder.up.{level}.upsample.{m[4]}"
        return f"decoder.up.{level}.block.{m[3]}.{_rename(m[4], VAE_RESNET)}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        if m[2] == "resnets":
            return f"{m[1]}.mid.block_{int(m[3]) + 1}.{_rename(m[4], VAE_RESNET)}"
        return f"{m[1]}.mid.attn_1.{_rename(m[4], VAE_ATTN)}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    module, param = key.rsplit(".", 1)
    return f"{VAE_TOP[module]}.{param}" if module in VAE_TOP else None


def _check_all_mapped(component, mapping, layout):
    missing = sorted(k for k, v in mapping.items() if v is None)
    if missing:
        raise ValueError(f"{component}: no {layout.label} name for {len(missing)} parameter(s), e.g. {missing[:3]}")


# Hugging Face CLIP -> OpenCLIP (SD 2.x's text encoder, SDXL's second): module renames inside a layer, and the
# names outside the layers. q, k and v are one in_proj in OpenCLIP.
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}


def _to_open_clip(state, component):
    """A PyTorch-oriented CLIPTextModelWithProjection state in OpenCLIP's names."""
    out, qkv = {}, {}
    for key, value in state.items():
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(value.T)  # OpenCLIP multiplies x @ text_projection
        elif m and m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((m[1], m[3]), {})[m[2][-6]] = value
        elif m and m[2] in OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{m[1]}.{OPEN_CLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            raise ValueError(f"{component}: no OpenCLIP name for {key}")
    if "text_projection" not in out:
        raise ValueError(f"{component}: not a CLIP text model with a projection (no text_projection.weight); "
                         "SDXL's second text encoder has one")
    for (layer, param), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise ValueError(f"{component}: layer {layer} lacks one of q_proj, k_proj, v_proj")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = np.concatenate([parts[c] for c in "qkv"])
    return out


def _identity_projection(state, component):
    """The state of SD 2.x's text encoder, which has no projection, with an identity text_projection.

    SD 2.x conditions on hidden states only and never multiplies by OpenCLIP's text_projection, so
    ppdiffusers' CLIPTextModel has none; but the original checkpoints hold one, and readers take the
    attention width from it to split in_proj into q, k and v (ppdiffusers' reader from its first dimension,
    assuming SD 2.x's 1024 when it is missing).
    """
    final_norm = "text_model.final_layer_norm.weight"
    if final_norm not in state:
        raise ValueError(f"{component}: not a CLIP text model (no {final_norm})")
    width = np.asarray(state[final_norm]).shape[0]
    return {**state, "text_projection.weight": np.eye(width, dtype=np.asarray(state[final_norm]).dtype)}


def _clip(state, component):
    """A PyTorch-oriented CLIP text model state as the original layouts hold it: its own names, and the
    position ids, not a parameter in ppdiffusers (a buffer) but in the original checkpoints, where some
    loaders look them up."""
    positions = "text_model.embeddings.position_embedding.weight"
    if positions not in state:
        raise ValueError(f"{component}: not a CLIP text model (no {positions})")
    n_pos = np.asarray(state[positions]).shape[0]
    return {**state, "text_model.embeddings.position_ids": np.arange(n_pos, dtype=np.int64)[None]}


def to_original_layout(unet_state, vae_state, *text_states, layout=SD):
    """Rename PyTorch-oriented state dicts (see `pytorch_state_dict`) to the layout's original names;
    text_states in the order of layout.text_encoders.

    Returns {original key: np.ndarray}. Raises ValueError when a parameter has no place in the layout
    (e.g. an SDXL UNet in the SD 1.x layout), rather than silently dropping it.
    """
    if len(text_states) != len(layout.text_encoders):
        raise ValueError(f"the {layout.label} layout has {len(layout.text_encoders)} text encoder(s), "
                         f"got {len(text_states)}")
    unet_keys = list(unet_state)
    layers = 1 + max(_indices(unet_keys, r"down_blocks\.\d+\.resnets\.(\d+)\."), default=0)
    up_with_attn = _indices(unet_keys, r"up_blocks\.(\d+)\.attentions\.")
    n_up = 1 + max(_indices(vae_state, r"decoder\.up_blocks\.(\d+)\."), default=0)

    unet_map = {k: _unet_key(k, layers, up_with_attn, {**UNET_TOP, **layout.unet_top}) for k in unet_keys}
    vae_map = {k: _vae_key(k, n_up) for k in vae_state}
    _check_all_mapped("unet", unet_map, layout)
    _check_all_mapped("vae", vae_map, layout)

    out = {UNET_PREFIX + unet_map[k]: np.asarray(v) for k, v in unet_state.items()}
    for k, v in vae_state.items():
        v = np.asarray(v)
        # The original VAE attention projections are 1x1 convolutions, not Linear layers.
        if ".mid.attn_1." in vae_map[k] and v.ndim == 2:
            v = v[:, :, None, None]
        out[VAE_PREFIX + vae_map[k]] = v
    expected = len(out)
    for (component, prefix, kind), state in zip(layout.text_encoders, text_states):
        state = {k: np.asarray(v) for k, v in state.items()}
        if kind == "open_clip_unprojected":
            state = _identity_projection(state, component)
        state = _clip(state, component) if kind == "clip" else _to_open_clip(state, component)
        out.update({prefix + k: v for k, v in state.items()})
        expected += len(state)
    if len(out) != expected:
        raise ValueError("two parameters were mapped to the same original key")
    return out


def pytorch_state_dict(layer):
    """A Paddle layer's parameters as numpy arrays in PyTorch orientation.

    Paddle stores Linear weights as [in, out], PyTorch as [out, in]. Which weights belong to a
    Linear is read off the layer objects, since names alone cannot tell (proj_in is a Linear or a
    1x1 conv depending on the config; the VAE attention is Linear here but a conv originally).
    """
    import paddle

    linear = {f"{name}.weight".lstrip(".") for name, sub in layer.named_sublayers(include_self=True)
              if isinstance(sub, paddle.nn.Linear)}
    state = {}
    for key, value in layer.state_dict().items():
        # numpy has no bfloat16 (Paddle hands it out as uint16), so widen half types first.
        if paddle.is_floating_point(value) and value.dtype != paddle.float32:
            value = value.astype(paddle.float32)
        arr = value.numpy()
        state[key] = np.ascontiguousarray(arr.T) if key in linear else arr
    return state


def is_pipeline_folder(folder):
    return all(os.path.isfile(os.path.join(folder, sub, "config.json")) for sub in ("unet", "vae", "text_encoder"))


def _read_json(folder, name):
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot read its {name} ({e})") from e


def checkpoint_layout(class_name, folder):
    """The single-file layout of a `class_name` pipeline saved in folder.

    A StableDiffusionPipeline is SD 2.x when its text encoder is OpenCLIP-H: its MLP uses the exact GELU,
    OpenAI's CLIP-L (SD 1.x) quick_gelu. ppdiffusers' single-file reader, which has only the file, tells
    SD 2.x by its UNet's cross-attention width instead (1024, 768 in SD 1.x); the activation also tells
    a model of another size (e.g. tiny_sd.py --family sd2).
    """
    if class_name not in LAYOUTS:
        raise ValueError(f"{folder} is a {class_name}; a single file can be written for "
                         f"{', '.join(LAYOUTS)} only (the folder itself loads with {class_name}.from_pretrained)")
    layout = LAYOUTS[class_name]
    if layout is SD and _read_json(folder, os.path.join("text_encoder", "config.json")).get("hidden_act") == "gelu":
        return SD2
    return layout


def pipeline_layout(folder):
    """The single-file layout of a pipeline folder, from its model_index.json (StableDiffusionPipeline
    without one) and, for SD 1.x/2.x, its text encoder's config."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        return checkpoint_layout("StableDiffusionPipeline", folder)
    return checkpoint_layout(_read_json(folder, "model_index.json").get("_class_name"), folder)


def _write(tensors, out_path):
    """Save {name: np.ndarray} to out_path; a crash leaves no half-written file under that name."""
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    try:
        # "pt": the tensors are in PyTorch orientation; ppdiffusers' loaders read this key to
        # decide whether Linear weights need transposing.
        save_file(tensors, tmp, metadata={"format": "pt"})
        give_usual_file_modes(tmp)  # a file for WebUI / ComfyUI, often installed under another account
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_models(unet, vae, text_encoders, out_path, half=False, layout=SD):
    """Write in-memory ppdiffusers models to `out_path` in the layout's original single-file names;
    text_encoders in the order of layout.text_encoders.

    Returns {"path", "tensors", "unet", "vae", <each text encoder's component name>, "dtype", "bytes"}.
    """
    states = [pytorch_state_dict(m) for m in (unet, vae, *text_encoders)]
    dtype = np.float16 if half else np.float32
    tensors = {k: (v.astype(dtype, copy=False) if np.issubdtype(v.dtype, np.floating) else v)
               for k, v in to_original_layout(*states, layout=layout).items()}
    del states
    _write(tensors, out_path)
    prefixes = [("unet", UNET_PREFIX), ("vae", VAE_PREFIX)] + [(c, p) for c, p, _ in layout.text_encoders]
    counts = {name: sum(k.startswith(prefix) for k in tensors) for name, prefix in prefixes}
    return dict(path=out_path, tensors=len(tensors), dtype=np.dtype(dtype).name,
                bytes=os.path.getsize(out_path), **counts)


def export_pipeline(folder, out_path, half=False, layout=None):
    """Load the pipeline saved at `folder` and write it with `export_models` in its family's layout
    (`layout`, by default read from its model_index.json); returns its summary."""
    if not is_pipeline_folder(folder):
        raise ValueError(f"{folder} is not a Stable Diffusion pipeline folder (needs unet/, vae/, text_encoder/)")
    layout = layout or pipeline_layout(folder)
    import ppdiffusers.transformers as transformers
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel

    # SDXL's second encoder is a CLIPTextModelWithProjection: its projection belongs in the file.
    classes = {"clip": transformers.CLIPTextModel, "open_clip": transformers.CLIPTextModelWithProjection,
               "open_clip_unprojected": transformers.CLIPTextModel}
    return export_models(
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        [classes[kind].from_pretrained(folder, subfolder=component) for component, _, kind in layout.text_encoders],
        out_path,
        half=half,
        layout=layout,
    )


# ----------------------------------------------------------------------------------------------
# LoRA: ppdiffusers layout -> the kohya layout that WebUI, ComfyUI and load_lora_weights read.
#
# ppdiffusers: `unet.<module>.lora.down.weight` [in, rank] and `.lora.up.weight` [rank, out]
# (Paddle Linear weights are [in, out]); the layer adds up(down(x)) * network_alpha / rank. The
# text encoder's: `text_encoder.<module>.lora_linear_layer.down.weight`, likewise.
# kohya: `lora_unet_<module with "_" for ".">.lora_down.weight` [rank, in], `.lora_up.weight`
# [out, rank] (PyTorch Linear orientation) and a scalar `.alpha`; loaders add
# up @ down @ x * alpha / rank, rank being lora_down's first dimension.
#
# train_dreambooth.py folds its --lora_alpha / --lora_rank scale into the up weights (ppdiffusers'
# loader reads no alpha from its own files), so the export writes alpha = rank: scale 1, and the
# LoRA acts exactly as it does in ppdiffusers. WebUI's and ComfyUI's strength slider multiplies on top.

UNET_LORA = re.compile(r"unet\.(.+)\.lora\.(down|up)\.weight")
TEXT_LORA = re.compile(r"(text_encoder(?:_2)?)\.(.+)\.lora_linear_layer\.(down|up)\.weight")


def is_lora_folder(folder):
    """A train_dreambooth.py --use_lora output folder: LoRA weights, and no pipeline."""
    return (os.path.isfile(os.path.join(folder, LORA_WEIGHTS))
            and not os.path.isfile(os.path.join(folder, "model_index.json")))


def lora_layout(keys):
    """The family of a trainer LoRA, from its keys: SDXL has a second text encoder and, unlike SD 1.x/2.x,
    no attention in its first UNet block."""
    if any(k.startswith("text_encoder_2.") for k in keys):
        return SDXL
    down = [k for k in keys if k.startswith("unet.down_blocks.") and ".attentions." in k]
    return SDXL if down and not any(k.startswith("unet.down_blocks.0.") for k in down) else SD


def _sgm_lora_modules(modules, layout):
    """{ppdiffusers UNet module: its SGM name} (kohya's SDXL names) for the attention modules LoRA adapts."""
    attention_layers = _indices(modules, r"down_blocks\.\d+\.attentions\.(\d+)\.")
    if not attention_layers:
        raise ValueError("no LoRA in a down block's attention: cannot tell the UNet's layers per block")
    layers = 1 + max(attention_layers)
    # LoRA sits inside attention blocks only, where the upsampler's slot does not matter.
    names = {m: _unet_key(f"{m}.weight", layers, set(), {**UNET_TOP, **layout.unet_top}) for m in modules}
    _check_all_mapped("unet LoRA", names, layout)
    return {m: name.removesuffix(".weight") for m, name in names.items()}


def to_webui_lora(state, paddle_orientation=True, layout=SD):
    """{ppdiffusers LoRA key: array} -> {kohya key: np.ndarray}, with alpha = rank per module, in the
    layout's kohya names.

    `paddle_orientation`: the arrays are Paddle-oriented (a file saved with metadata format "pd",
    as the trainer writes); False for files already in PyTorch orientation (format "pt").
    Raises ValueError for anything but 2-D UNet and text-encoder LoRA pairs (conv LoRA has no
    mapping here) and for text encoders the layout does not have.
    """
    pairs = {}  # (kohya prefix, ppdiffusers module) -> {"down"/"up": array}
    for key, value in state.items():
        if m := UNET_LORA.fullmatch(key):
            prefix, module, which = "lora_unet_", m[1], m[2]
        elif (m := TEXT_LORA.fullmatch(key)) and m[1] in layout.lora_text_prefixes:
            prefix, module, which = layout.lora_text_prefixes[m[1]], m[2], m[3]
        elif m:
            raise ValueError(f"{key}: the {layout.label} layout has no {m[1]}")
        else:
            raise ValueError(f"{key}: not a UNet or text-encoder LoRA weight (expected unet.<module>.lora.down/up"
                             ".weight or text_encoder.<module>.lora_linear_layer.down/up.weight)")
        value = np.asarray(value)
        if value.ndim != 2:
            raise ValueError(f"{key}: {value.ndim}-D LoRA weights (e.g. of convolutions) are not supported")
        value = value.astype(np.float32) if value.dtype != np.float32 else value
        pairs.setdefault((prefix, module), {})[which] = np.ascontiguousarray(value.T) if paddle_orientation else value

    unet_modules = [module for prefix, module in pairs if prefix == "lora_unet_"]
    renamed = _sgm_lora_modules(unet_modules, layout) if layout.lora_unet_sgm_names and unet_modules else {}
    out = {}
    for (prefix, module), pair in sorted(pairs.items()):
        name = prefix + renamed.get(module, module).replace(".", "_")
        if set(pair) != {"down", "up"}:
            raise ValueError(f"{name}: LoRA {'down' if 'down' not in pair else 'up'} weight missing")
        down, up = pair["down"], pair["up"]  # now [rank, in] and [out, rank]
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"{name}: LoRA up {list(up.shape)} and down {list(down.shape)} disagree on the rank")
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = np.array(down.shape[0], dtype=np.float32)
    if not out:
        raise ValueError("no LoRA weights found")
    return out


def export_lora(lora_file_or_dir, out_path, half=False, layout=None):
    """Write the trainer's LoRA (its paddle_lora_weights.safetensors, or the folder holding it and,
    if the text encoders were trained, text_encoder_lora_weights.safetensors) to `out_path` in the kohya
    layout of `layout` (by default the family read off the keys); float16 with `half`.

    Returns {"path", "tensors", "modules", "rank", "dtype", "bytes"}.
    """
    from safetensors import safe_open

    paths = [lora_file_or_dir]
    if os.path.isdir(lora_file_or_dir):
        paths = [os.path.join(lora_file_or_dir, name) for name in (LORA_WEIGHTS, TEXT_ENCODER_LORA)]
        paths = paths[:1] + [p for p in paths[1:] if os.path.isfile(p)]
    if not os.path.isfile(paths[0]):
        raise ValueError(f"{lora_file_or_dir}: no LoRA weights ({LORA_WEIGHTS})")
    states = []
    for path in paths:
        with safe_open(path, framework="np") as f:
            # ppdiffusers marks its own (Paddle-oriented) files "pd"; a file without the key is a PyTorch one.
            fmt = (f.metadata() or {}).get("format", "pt")
            states.append(({k: f.get_tensor(k) for k in f.keys()}, fmt in ("pd", "np")))
    layout = layout or lora_layout([k for state, _ in states for k in state])
    tensors = {}
    for state, paddle_orientation in states:
        tensors.update(to_webui_lora(state, paddle_orientation=paddle_orientation, layout=layout))
    dtype = np.float16 if half else np.float32
    tensors = {k: v.astype(dtype, copy=False) for k, v in tensors.items()}
    _write(tensors, out_path)
    ranks = sorted({int(v) for k, v in tensors.items() if k.endswith(".alpha")})
    return dict(path=out_path, tensors=len(tensors), modules=len(tensors) // 3,
                rank=ranks[0] if len(ranks) == 1 else ranks, dtype=np.dtype(dtype).name,
                bytes=os.path.getsize(out_path))


def default_out_path(folder):
    folder = os.path.normpath(os.path.abspath(folder))
    return os.path.join(folder, os.path.basename(folder) + ".safetensors")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="a pipeline folder, or a --use_lora output folder (paddle_lora_weights.safetensors)")
    parser.add_argument("--out", default=None, help="output file (default: OUTPUT_DIR/<dir name>.safetensors)")
    parser.add_argument("--half", action="store_true", help="store float16 instead of float32")
    args = parser.parse_args(argv)
    folder = args.output_dir
    if is_pipeline_folder(folder):
        export, what = export_pipeline, "checkpoint"
    elif is_lora_folder(folder):
        export, what = export_lora, "LoRA"
    else:
        print(f"error: {folder} is not a Stable Diffusion pipeline folder (expected unet/, vae/ and "
              f"text_encoder/ with config.json) nor a LoRA output folder (expected {LORA_WEIGHTS})", file=sys.stderr)
        return 1
    out = args.out or default_out_path(folder)
    try:
        summary = export(folder, out, half=args.half)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {what}: {summary['tensors']} tensors ({summary['dtype']}, {summary['bytes'] / 2**20:.1f} MiB) "
          f"to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
