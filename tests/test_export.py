"""export_single_file.py: ppdiffusers pipeline folder -> one original-layout SD checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import export_single_file as export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _config(folder, sub):
    with open(os.path.join(folder, sub, "config.json")) as f:
        return json.load(f)


def original_config_yaml(folder):
    """The pipeline's architecture in the original config format (CompVis' for SD 1.x, Stability's for
    2.x: OpenCLIP, Linear attention projections, a fixed head width, v-prediction), derived from its
    config.json files so that ppdiffusers' own converter can read the exported file back."""
    unet, vae = _config(folder, "unet"), _config(folder, "vae")
    ch, vae_ch = unet["block_out_channels"][0], vae["block_out_channels"][0]
    # The original marks attention levels by downsampling factor (1, 2, 4, ...).
    attn = [2 ** i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")]
    sd2 = _config(folder, "text_encoder")["hidden_act"] == "gelu"
    heads = unet["attention_head_dim"]
    # SD 2.x's config gives the head width, from which the reader derives each block's head count.
    heads = f"num_head_channels: {ch // heads[0]}\n        use_linear_in_transformer: true" if sd2 \
        else f"num_heads: {heads}"
    parameterization = 'parameterization: "v"' if sd2 else ""
    return f"""
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    {parameterization}
    linear_start: 0.00085
    linear_end: 0.012
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: {unet["sample_size"]}
        in_channels: {unet["in_channels"]}
        out_channels: {unet["out_channels"]}
        model_channels: {ch}
        attention_resolutions: {attn}
        num_res_blocks: {unet["layers_per_block"]}
        channel_mult: {[c // ch for c in unet["block_out_channels"]]}
        {heads}
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: {unet["cross_attention_dim"]}
        legacy: false
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {vae["latent_channels"]}
        ddconfig:
          double_z: true
          z_channels: {vae["latent_channels"]}
          resolution: {vae["sample_size"]}
          in_channels: {vae["in_channels"]}
          out_ch: {vae["out_channels"]}
          ch: {vae_ch}
          ch_mult: {[c // vae_ch for c in vae["block_out_channels"]]}
          num_res_blocks: {vae["layers_per_block"]}
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.{"FrozenOpenCLIPEmbedder" if sd2 else "FrozenCLIPEmbedder"}
"""


COMPONENTS = ("unet", "vae", "text_encoder")
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")


def _load_components(folder):
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel

    classes = dict(unet=UNet2DConditionModel, vae=AutoencoderKL, text_encoder=CLIPTextModel)
    return {name: classes[name].from_pretrained(folder, subfolder=name) for name in COMPONENTS}


@pytest.fixture(scope="module")
def originals(tiny_model):
    """The tiny pipeline's parameters as Paddle stores them, per component."""
    return {name: {k: v.numpy() for k, v in model.state_dict().items()}
            for name, model in _load_components(tiny_model).items()}


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return {half: export.export_pipeline(tiny_model, str(out / f"tiny_{half}.safetensors"), half=half)
            for half in (False, True)}


def _read_back_with_ppdiffusers(path, tiny_model, tmp_path):
    """Load an original-layout file with ppdiffusers' own converter (from_single_file)."""
    import paddle
    from ppdiffusers import StableDiffusionPipeline
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    config = tmp_path / "tiny-inference.yaml"
    config.write_text(original_config_yaml(tiny_model))
    # The converter fills a given text-encoder shell instead of fetching openai/clip-vit-large-patch14;
    # a differently seeded one makes any parameter it fails to fill show up as a mismatch.
    rng = paddle.get_rng_state()
    paddle.seed(1234)
    shell = CLIPTextModel(CLIPTextConfig.from_pretrained(tiny_model, subfolder="text_encoder"))
    paddle.set_rng_state(rng)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    return StableDiffusionPipeline.from_single_file(
        path, original_config_file=str(config), text_encoder=shell, tokenizer=tokenizer,
        local_files_only=True, load_safety_checker=False,
    )


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_round_trip_through_ppdiffusers_converter(tiny_model, originals, exported, tmp_path, half):
    pipe = _read_back_with_ppdiffusers(exported[half]["path"], tiny_model, tmp_path)
    for name in COMPONENTS:
        ref = originals[name]
        got = {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
        assert set(got) == set(ref), name
        for key, value in ref.items():
            # fp16 export must equal the fp32 value rounded once to float16, nothing worse.
            want = value.astype(np.float16).astype(np.float32) if half else value
            assert got[key].shape == want.shape, f"{name}.{key}"
            assert np.array_equal(got[key], want), f"{name}.{key} differs after the round trip"


def test_original_key_names_and_layout(tiny_model, originals, exported):
    unet, vae, text = (_config(tiny_model, sub) for sub in COMPONENTS)
    # input_blocks.1.1 (the first resnet's attention) exists only because level 0 has cross-attention;
    # output_blocks.1.1 is then the upsampler of the attention-free first up block.
    assert unet["down_block_types"][0] == "CrossAttnDownBlock2D" and unet["layers_per_block"] == 1
    assert unet["up_block_types"][0] == "UpBlock2D"

    path = exported[False]["path"]
    tensors = load_file(path)
    summary = exported[False]
    assert len(tensors) == summary["tensors"] == summary["unet"] + summary["vae"] + summary["text_encoder"]
    assert (summary["unet"], summary["vae"], summary["text_encoder"]) == (
        len(originals["unet"]), len(originals["vae"]), len(originals["text_encoder"]) + 1)  # + position_ids
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ):
        assert key in tensors, key
    assert all(k.startswith(PREFIXES) for k in tensors), [k for k in tensors if not k.startswith(PREFIXES)]

    # PyTorch orientation: Linear weights are [out, in]; VAE attention and proj_in are 1x1 convs.
    ch, time_dim, hidden = unet["block_out_channels"][0], 4 * unet["block_out_channels"][0], text["hidden_size"]
    vae_mid = vae["block_out_channels"][-1]
    for key, shape in {
        "model.diffusion_model.time_embed.0.weight": (time_dim, ch),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (ch, 4 * ch),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (ch, ch, 1, 1),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (text["intermediate_size"], hidden),
        "first_stage_model.encoder.mid.attn_1.q.weight": (vae_mid, vae_mid, 1, 1),
    }.items():
        assert tensors[key].shape == shape, key
    position_ids = tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert position_ids.dtype == np.int64
    assert position_ids.tolist() == [list(range(text["max_position_embeddings"]))]
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "pt"}

    half = load_file(exported[True]["path"])
    assert set(half) == set(tensors)
    assert {str(v.dtype) for k, v in half.items() if not k.endswith("position_ids")} == {"float16"}


def test_unmappable_parameter_is_an_error(originals):
    unet = dict(originals["unet"], **{"add_embedding.linear_1.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match="add_embedding"):
        export.to_original_layout(unet, originals["vae"], originals["text_encoder"])


def _run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "export_single_file.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_writes_default_location(tiny_model, tmp_path):
    folder = tmp_path / "my-dreambooth"  # a copy, so the shared fixture folder stays untouched
    shutil.copytree(tiny_model, folder)
    result = _run_cli(str(folder) + os.sep, "--half")
    assert result.returncode == 0, result.stderr[-2000:]
    out = folder / "my-dreambooth.safetensors"
    assert out.is_file() and not os.path.exists(str(out) + ".tmp")
    assert load_file(str(out))["first_stage_model.quant_conv.weight"].dtype == np.float16


def test_cli_rejects_non_pipeline_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    result = _run_cli(str(tmp_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a Stable Diffusion pipeline folder" in lines[0], result.stderr
    assert not list(tmp_path.glob("*.safetensors*"))


# ----------------------------------------------------------------------------------------------
# The trainer's --export_single_file, and LoRA in the kohya layout (WebUI, ComfyUI)

LORA_RANK, LORA_ALPHA = 2, 4  # scale 2, which the trainer folds into the up weights


@pytest.fixture(scope="module")
def trained(tiny_model, instance_dir, tmp_path_factory):
    """Output folders of two short runs with --export_single_file: full fine-tuning and LoRA."""
    from conftest import run_train, train_args

    runs = {}
    for kind, extra in (("full", ()), ("lora", ("--use_lora", "--lora_rank", LORA_RANK, "--lora_alpha", LORA_ALPHA,
                                                "--learning_rate", 1e-2))):
        runs[kind] = tmp_path_factory.mktemp("runs") / f"my-{kind}"
        run_train(*train_args(tiny_model, instance_dir, runs[kind], "--export_single_file", *extra))
    return runs


def test_trainer_exports_the_saved_pipeline_as_one_file(trained, exported, tmp_path):
    out = trained["full"]
    got = load_file(str(out / "my-full.safetensors"))
    # The trainer exports its in-memory models; the saved folder, exported afresh, must give the same file.
    want = load_file(export.export_pipeline(str(out), str(tmp_path / "again.safetensors"))["path"])
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
    base = load_file(exported[False]["path"])
    assert any(not np.array_equal(got[k], base[k]) for k in got if k.startswith(PREFIXES[0])), "UNet not trained?"


def _pipeline_with_lora(tiny_model, *load_args, **load_kwargs):
    from ppdiffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    if load_args:
        pipe.load_lora_weights(*load_args, **load_kwargs)
    return pipe


def _unet_output(pipe):
    import paddle

    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32))
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=pipe.tokenizer.model_max_length)
    with paddle.no_grad():
        states = pipe.text_encoder(paddle.to_tensor([ids["input_ids"]]))[0]
        return pipe.unet(x, paddle.to_tensor([500]), states).sample.numpy()


def test_lora_export_layout(trained):
    out = trained["lora"]
    paddle_lora = load_file(str(out / export.LORA_WEIGHTS))
    webui = load_file(str(out / "my-lora.safetensors"))
    assert all(k.startswith("lora_unet_") for k in webui)
    assert len(webui) == 3 * len(paddle_lora) // 2
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(webui)
    with safe_open(str(out / "my-lora.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
    for key, down in paddle_lora.items():  # Paddle: down [in, rank], up [rank, out]; x @ down @ up
        if ".lora.down." not in key:
            continue
        up = paddle_lora[key.replace(".lora.down.", ".lora.up.")]
        module = key.split(".", 1)[1].rsplit(".lora.", 1)[0]  # after the "unet." prefix
        kohya = "lora_unet_" + module.replace(".", "_")
        k_down, k_up, alpha = (webui[f"{kohya}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        # PyTorch orientation: lora_down [rank, in], lora_up [out, rank]; loaders add up @ down * alpha / rank.
        assert k_down.shape == (LORA_RANK, down.shape[0]) and k_up.shape == (up.shape[1], LORA_RANK), kohya
        assert alpha.shape == () and float(alpha) == LORA_RANK, kohya
        assert np.abs(k_up @ k_down * float(alpha) / LORA_RANK - (down @ up).T).max() <= 1e-7, kohya


def test_lora_round_trip_through_ppdiffusers_kohya_loader(tiny_model, trained, tmp_path):
    out = trained["lora"]
    base = _unet_output(_pipeline_with_lora(tiny_model))
    own = _unet_output(_pipeline_with_lora(tiny_model, str(out)))  # the trainer's ppdiffusers-format file
    assert np.abs(own - base).max() > 1e-3, "the LoRA must change the output for the comparison to mean anything"
    # ppdiffusers detects the lora_unet_ keys as kohya, renames them and transposes the PyTorch weights itself.
    kohya = _unet_output(_pipeline_with_lora(tiny_model, str(out), weight_name="my-lora.safetensors"))
    assert np.abs(kohya - own).max() <= 1e-5

    half = export.export_lora(str(out), str(tmp_path / "half.safetensors"), half=True)
    assert {str(v.dtype) for v in load_file(half["path"]).values()} == {"float16"}
    assert (half["modules"], half["rank"]) == (len(load_file(str(out / export.LORA_WEIGHTS))) // 2, LORA_RANK)
    from_half = _unet_output(_pipeline_with_lora(tiny_model, str(tmp_path), weight_name="half.safetensors"))
    assert np.abs(from_half - own).max() <= 1e-3


def test_cli_exports_a_lora_folder(trained, tmp_path):
    folder = tmp_path / "webui-lora"
    folder.mkdir()
    shutil.copy(trained["lora"] / export.LORA_WEIGHTS, folder)
    assert export.main([str(folder)]) == 0  # in-process: the subprocess CLI is covered above
    got = load_file(str(folder / "webui-lora.safetensors"))
    want = load_file(str(trained["lora"] / "my-lora.safetensors"))
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_lora_export_refuses_what_it_cannot_map():
    w = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="not a UNet or text-encoder LoRA"):
        export.to_webui_lora({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight": w})
    with pytest.raises(ValueError, match="up weight missing"):
        export.to_webui_lora({"unet.mid_block.attentions.0.proj_in.lora.down.weight": w})


def test_export_half_needs_export_single_file(tiny_model):
    from conftest import train_args

    import train_dreambooth

    with pytest.raises(train_dreambooth.DreamBoothError, match="--export_half"):
        train_dreambooth.parse_args(train_args(tiny_model, "x", "y", "--export_half"))


# ----------------------------------------------------------------------------------------------
# Stable Diffusion 2.x: its OpenCLIP-H text encoder in OpenCLIP's names under cond_stage_model.model.

SD2_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.")


@pytest.fixture(scope="module")
def sd2_run(tiny_sd2, instance_dir, tmp_path_factory):
    """The output folder of a short full fine-tune of the tiny SD 2.x, text encoder included, with
    --export_single_file."""
    from conftest import run_train, train_args

    out = tmp_path_factory.mktemp("sd2") / "my-sd2"
    run_train(*train_args(tiny_sd2, instance_dir, out, "--train_text_encoder", "--export_single_file"))
    return out


def _read_back_sd2(path, folder, work, monkeypatch):
    """An SD 2.x single file loaded by StableDiffusionPipeline.from_single_file, offline: the architecture
    from original_config_yaml, the text encoder's config and the tokenizer from a folder named by the hub id
    the reader asks for (with local_files_only it takes a folder of that name in the working directory)."""
    from ppdiffusers import StableDiffusionPipeline

    hub = work / "stabilityai" / "stable-diffusion-2"
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(os.path.join(folder, sub), hub / sub, dirs_exist_ok=True)
    (work / "sd2.yaml").write_text(original_config_yaml(folder))
    monkeypatch.chdir(work)
    return StableDiffusionPipeline.from_single_file(str(path), original_config_file=str(work / "sd2.yaml"),
                                                    local_files_only=True, load_safety_checker=False)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_sd2_single_file_round_trips_through_ppdiffusers_sd2_reader(tiny_sd2, sd2_run, tmp_path, monkeypatch, half):
    """The trainer's SD 2.x file (and the float16 one export_single_file.py writes from the saved folder) loads
    back through ppdiffusers' SD 2 reader into exactly the saved UNet, text encoder and VAE (float16: each
    value rounded once), and the text encoder gives the saved pipeline's prompt embeddings."""
    from conftest import PROMPT, load_weights
    from ppdiffusers import StableDiffusionPipeline

    path = sd2_run / "my-sd2.safetensors"
    if half:
        path = export.export_pipeline(str(sd2_run), str(tmp_path / "half.safetensors"), half=True)["path"]
    pipe = _read_back_sd2(path, str(sd2_run), tmp_path / "reader", monkeypatch)
    for name in COMPONENTS:
        saved = load_weights(sd2_run, name)
        got = {k: v.numpy() for k, v in getattr(pipe, name).state_dict().items()}
        assert set(got) == set(saved), name
        for key, value in saved.items():
            want = value.astype(np.float16).astype(np.float32) if half else value
            assert np.array_equal(got[key], want), f"{name}.{key} differs after the round trip"
    if not half:
        saved_pipe = StableDiffusionPipeline.from_pretrained(str(sd2_run), safety_checker=None)
        want, got = (p.encode_prompt(PROMPT, num_images_per_prompt=1, do_classifier_free_guidance=False)[0].numpy()
                     for p in (saved_pipe, pipe))
        assert np.abs(got - want).max() <= 1e-5
    base = load_weights(tiny_sd2, "text_encoder")
    assert any(not np.array_equal(base[k], v) for k, v in load_weights(sd2_run, "text_encoder").items()), "trained?"


def test_sd2_single_file_has_the_open_clip_names_other_tools_look_up(sd2_run):
    from conftest import load_weights

    tensors = load_file(str(sd2_run / "my-sd2.safetensors"))
    assert all(k.startswith(SD2_PREFIXES) for k in tensors), [k for k in tensors if not k.startswith(SD2_PREFIXES)]
    text = _config(sd2_run, "text_encoder")
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    open_clip = "cond_stage_model.model."
    # WebUI tells SD 2.x by the fused q, k, v of the first OpenCLIP block; the file holds as many blocks as the
    # pipeline's encoder (SD 2.x's 23: OpenCLIP's 24 without the last, which SD 2.x never runs).
    assert tensors[open_clip + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert len({k.split(".")[4] for k in tensors if k.startswith(open_clip + "transformer.resblocks.")}) == layers
    for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"):
        assert open_clip + key in tensors, key
    # SD 2.x never multiplies by text_projection; readers size in_proj's parts from it.
    assert np.array_equal(tensors[open_clip + "text_projection"], np.eye(hidden, dtype=np.float32))
    saved = load_weights(sd2_run, "text_encoder")  # Paddle: Linear weights [in, out]
    q, k, v = (saved[f"text_model.encoder.layers.0.self_attn.{c}_proj.weight"].T for c in "qkv")
    assert np.array_equal(tensors[open_clip + "transformer.resblocks.0.attn.in_proj_weight"], np.concatenate([q, k, v]))
    assert export.pipeline_layout(str(sd2_run)) is export.SD2
