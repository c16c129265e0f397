"""LoRA DreamBooth: only adapters train, the base is untouched, the result loads into the base."""
import os
import sys

import numpy as np
import pytest

from conftest import GRADIENT_LIKE, load_weights, run_cli, run_train, train_args

RANK = 2
# The UNet's output on a fixed input, computed from the trained models in memory just before the
# trainer saves them, per output folder: what a loaded LoRA must reproduce.
TRAINED_OUTPUTS = {}


def model_output(unet, text_encoder, tokenizer, seed=0):
    import paddle

    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    ids = paddle.to_tensor([tokenizer("a photo of sks dog", padding="max_length",
                                      max_length=tokenizer.model_max_length)["input_ids"]])
    with paddle.no_grad():
        return unet(x, paddle.to_tensor([500]), text_encoder(ids)[0]).sample.numpy()


def unet_output(pipe, seed=0):
    return model_output(pipe.unet, pipe.text_encoder, pipe.tokenizer, seed)


def train_recording_outputs(*argv):
    """run_train, keeping the trained models' own output in TRAINED_OUTPUTS[output_dir]."""
    import train_dreambooth

    real = train_dreambooth.save_final

    def recording(args, family, models, tokenizers):
        TRAINED_OUTPUTS[str(args.output_dir)] = model_output(models["unet"], models["text_encoder"],
                                                             tokenizers["tokenizer"])
        return real(args, family, models, tokenizers)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_dreambooth, "save_final", recording)
        run_train(*argv)


@pytest.fixture(scope="module")
def lora_run(tiny_model, instance_dir, tmp_path_factory):
    before = {c: load_weights(tiny_model, c) for c in ("unet", "vae", "text_encoder")}
    out = tmp_path_factory.mktemp("lora")
    train_recording_outputs(*train_args(tiny_model, instance_dir, out, "--use_lora", "--lora_rank", RANK,
                                        "--lora_alpha", 4, "--max_train_steps", 4, "--save_steps", 2,
                                        "--learning_rate", 1e-2, "--export_single_file"))
    return out, before


def test_a_loaded_unet_lora_reproduces_the_trained_model_own_outputs(tiny_model, lora_run):
    """alpha 4, rank 2: the scale 2 the trained model applied must survive the save, through
    ppdiffusers' load_lora_weights and through its reader of the kohya file WebUI takes."""
    from ppdiffusers import StableDiffusionPipeline

    out, _ = lora_run
    trained = TRAINED_OUTPUTS[str(out)]
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert np.abs(unet_output(base) - trained).max() > 1e-3, "the LoRA must have trained"
    for weight_name in (None, os.path.basename(out) + ".safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.load_lora_weights(str(out), **({"weight_name": weight_name} if weight_name else {}))
        np.testing.assert_allclose(unet_output(pipe), trained, atol=1e-5, err_msg=str(weight_name))


def test_base_weights_are_untouched_and_the_lora_loads_into_the_base(tiny_model, lora_run):
    from ppdiffusers import StableDiffusionPipeline

    out, before = lora_run
    for component, weights in before.items():
        after = load_weights(tiny_model, component)
        assert all(np.array_equal(weights[k], after[k]) for k in weights), component
    assert os.listdir(out).count("paddle_lora_weights.safetensors") == 1
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    base = unet_output(pipe)
    pipe.load_lora_weights(str(out))
    assert np.abs(unet_output(pipe) - base).max() > 1e-4


def test_only_lora_parameters_are_trained_and_their_count_matches_the_rank_formula(tiny_model, lora_run):
    from ppdiffusers import UNet2DConditionModel
    from ppdiffusers.models.attention_processor import Attention
    from safetensors.numpy import load_file

    import train_dreambooth

    out, _ = lora_run
    saved = load_file(os.path.join(out, "paddle_lora_weights.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    expected = sum(RANK * (lin.weight.shape[0] + lin.weight.shape[1]) for layer in unet.sublayers()
                   if isinstance(layer, Attention) for lin in (layer.to_q, layer.to_k, layer.to_v, layer.to_out[0]))
    assert sum(v.size for v in saved.values()) == expected
    args = train_dreambooth.parse_args(train_args(tiny_model, "x", "y", "--use_lora", "--lora_rank", RANK))
    assert train_dreambooth.add_lora_adapters(unet, args) == expected
    assert all(".lora_layer." in n for n, p in unet.named_parameters() if not p.stop_gradient)
    up = [v for k, v in saved.items() if ".up." in k]
    assert any(np.abs(v).max() > 0 for v in up), "up projections start at zero and must have trained"


def test_a_lora_checkpoint_resumes_to_the_same_adapters(tiny_model, instance_dir, lora_run, tmp_path):
    import shutil

    from safetensors.numpy import load_file

    out, _ = lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run_train(*train_args(tiny_model, instance_dir, resumed, "--use_lora", "--lora_rank", RANK, "--lora_alpha", 4,
                          "--max_train_steps", 4, "--save_steps", 2, "--learning_rate", 1e-2,
                          "--resume_from_checkpoint", "latest"))
    a = load_file(os.path.join(out, "paddle_lora_weights.safetensors"))
    b = load_file(os.path.join(resumed, "paddle_lora_weights.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


# --- LoRA in the text encoder too (--train_text_encoder)

TEXT_LORA_FLAGS = ("--use_lora", "--train_text_encoder", "--lora_rank", RANK, "--lora_alpha", 4)


@pytest.fixture(scope="module")
def text_lora_run(tiny_model, instance_dir, tmp_path_factory):
    before = {c: load_weights(tiny_model, c) for c in ("unet", "vae", "text_encoder")}
    out = tmp_path_factory.mktemp("text-lora")
    train_recording_outputs(*train_args(tiny_model, instance_dir, out, *TEXT_LORA_FLAGS, "--max_train_steps", 4,
                                        "--save_steps", 2, "--learning_rate", 1e-2, "--export_single_file"))
    return out, before


def test_load_lora_reproduces_the_trained_model_own_outputs_with_its_text_encoder(tiny_model, text_lora_run):
    import train_dreambooth

    out, _ = text_lora_run
    loaded = train_dreambooth.load_lora(base_pipeline(tiny_model), str(out))
    np.testing.assert_allclose(unet_output(loaded), TRAINED_OUTPUTS[str(out)], atol=1e-5)


def text_states(pipe):
    import paddle

    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=pipe.tokenizer.model_max_length)
    with paddle.no_grad():
        return pipe.text_encoder(paddle.to_tensor([ids["input_ids"]]))[0].numpy()


def base_pipeline(model):
    from ppdiffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(model)


def merged_text_states(model, low_rank_updates):
    """The base text encoder with W += update per layer, written into its weights directly:
    an independent computation of what a loaded text-encoder LoRA must do."""
    pipe = base_pipeline(model)
    weights = pipe.text_encoder.state_dict()
    for module, update in low_rank_updates.items():
        weight = weights[f"{module}.weight"]
        weight.set_value(weight.numpy() + update)
    return text_states(pipe)


def text_lora_files(out):
    from safetensors.numpy import load_file

    import train_dreambooth

    return (load_file(os.path.join(out, "paddle_lora_weights.safetensors")),
            load_file(os.path.join(out, train_dreambooth.TEXT_ENCODER_LORA)))


def test_text_encoder_lora_leaves_the_base_untouched_and_load_lora_applies_both(tiny_model, text_lora_run):
    import train_dreambooth

    out, before = text_lora_run
    for component, weights in before.items():
        after = load_weights(tiny_model, component)
        assert all(np.array_equal(weights[k], after[k]) for k in weights), component
    unet_file, text_file = text_lora_files(out)
    assert all(k.startswith("unet.") for k in unet_file) and all(k.startswith("text_encoder.") for k in text_file)
    base = base_pipeline(tiny_model)
    base_states, base_unet = text_states(base), unet_output(base)
    unet_only = base_pipeline(tiny_model)
    unet_only.load_lora_weights(str(out))  # ppdiffusers' own loader still reads the UNet part
    assert np.array_equal(text_states(unet_only), base_states)
    loaded = train_dreambooth.load_lora(base_pipeline(tiny_model), str(out))
    assert np.abs(text_states(loaded) - base_states).max() > 1e-3
    assert np.abs(unet_output(loaded) - unet_output(unet_only)).max() > 1e-4, "the UNet sees the LoRA'd encoder"
    assert np.abs(unet_output(unet_only) - base_unet).max() > 1e-4


def test_loaded_text_encoder_equals_the_base_plus_the_saved_low_rank_update(tiny_model, text_lora_run):
    import train_dreambooth

    out, _ = text_lora_run
    _, text_file = text_lora_files(out)
    updates = {}  # Paddle Linear weights are [in, out]: W + down [in, r] @ up [r, out]; alpha is folded into up
    for key, down in text_file.items():
        if key.endswith(".lora_linear_layer.down.weight"):
            module = key.removeprefix("text_encoder.").removesuffix(".lora_linear_layer.down.weight")
            updates[module] = down @ text_file[key.replace(".down.", ".up.")]
    loaded = text_states(train_dreambooth.load_lora(base_pipeline(tiny_model), str(out)))
    np.testing.assert_allclose(loaded, merged_text_states(tiny_model, updates), atol=1e-5)


def test_text_encoder_lora_covers_every_attention_projection_with_the_rank_formula(tiny_model, text_lora_run):
    from ppdiffusers.transformers import CLIPTextModel

    import train_dreambooth

    out, _ = text_lora_run
    _, text_file = text_lora_files(out)
    encoder = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    hidden, layers = encoder.config.hidden_size, encoder.config.num_hidden_layers
    expected = layers * 4 * RANK * (hidden + hidden)  # q, k, v, out: hidden -> hidden each
    assert len(text_file) == layers * 4 * 2 and sum(v.size for v in text_file.values()) == expected
    assert train_dreambooth.add_text_encoder_lora(encoder, RANK, 4.0) == expected
    assert all(".lora_linear_layer." in n for n, p in encoder.named_parameters() if not p.stop_gradient)


def test_a_text_encoder_lora_checkpoint_resumes_to_the_same_adapters(tiny_model, instance_dir, text_lora_run, tmp_path):
    import shutil

    out, _ = text_lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run_train(*train_args(tiny_model, instance_dir, resumed, *TEXT_LORA_FLAGS, "--max_train_steps", 4,
                          "--save_steps", 2, "--learning_rate", 1e-2, "--resume_from_checkpoint", "latest"))
    for a, b in zip(text_lora_files(out), text_lora_files(resumed)):
        assert a.keys() == b.keys()
        assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6


def test_text_encoder_lora_exports_in_the_kohya_layout_webui_reads(tiny_model, text_lora_run):
    """The kohya file's lora_te_ weights, merged by hand in PyTorch orientation (W[out, in] += up @ down
    * alpha / rank), give the text encoder load_lora gives; ppdiffusers' kohya converter maps every key."""
    from ppdiffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    import train_dreambooth

    out, _ = text_lora_run
    webui = load_file(os.path.join(out, os.path.basename(out) + ".safetensors"))
    layers = base_pipeline(tiny_model).text_encoder.config.num_hidden_layers
    modules = {f"text_model.encoder.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qkv"}
    modules |= {f"text_model.encoder.layers.{i}.self_attn.out_proj" for i in range(layers)}
    kohya = {"lora_te_" + m.replace(".", "_"): m for m in modules}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
            for k in webui if k.startswith("lora_te_")} == set(kohya)
    updates = {}
    for name, module in kohya.items():
        down, up, alpha = (webui[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        updates[module] = (up @ down * (alpha / down.shape[0])).T  # back to Paddle's [in, out]
    loaded = text_states(train_dreambooth.load_lora(base_pipeline(tiny_model), str(out)))
    np.testing.assert_allclose(merged_text_states(tiny_model, updates), loaded, atol=1e-5)
    state, alphas, _ = StableDiffusionPipeline.lora_state_dict(str(out),
                                                               weight_name=os.path.basename(out) + ".safetensors")
    assert len([k for k in state if k.startswith("text_encoder.")]) == 2 * len(modules)
    assert len([k for k in alphas if k.startswith("text_encoder.")]) == len(modules)


@pytest.fixture(scope="module")
def text_lora_batch_of_two(tiny_model, instance_dir, tmp_path_factory):
    """Two gradient-like updates of UNet and text-encoder LoRA at batch 2: the reference the
    equivalence tests below compare against."""
    out = tmp_path_factory.mktemp("text-lora-batch2")
    run_train(*train_args(tiny_model, instance_dir, out, *TEXT_LORA_FLAGS, "--train_batch_size", 2,
                          "--max_train_steps", 2, *GRADIENT_LIKE))
    return out


def assert_same_lora(a, b, atol=1e-5):
    for fa, fb in zip(text_lora_files(a), text_lora_files(b)):
        assert fa.keys() == fb.keys()
        worst = max(float(np.abs(fa[k] - fb[k]).max()) for k in fa)
        assert worst <= atol, f"largest LoRA weight difference {worst}"


@pytest.mark.parametrize("variant", [("--train_batch_size", 1, "--gradient_accumulation_steps", 2),
                                     ("--train_batch_size", 2, "--gradient_checkpointing")],
                         ids=["accumulation", "checkpointing"])
def test_text_encoder_lora_trains_the_same_with_accumulation_and_checkpointing(
        tiny_model, instance_dir, text_lora_batch_of_two, tmp_path, variant):
    run_train(*train_args(tiny_model, instance_dir, tmp_path, *TEXT_LORA_FLAGS, "--max_train_steps", 2,
                          *GRADIENT_LIKE, *variant))
    assert_same_lora(tmp_path, text_lora_batch_of_two)


def test_text_encoder_lora_on_two_processes_equals_one(tiny_model, instance_dir, text_lora_batch_of_two, tmp_path):
    args = train_args(tiny_model, instance_dir, tmp_path / "two", *TEXT_LORA_FLAGS, "--max_train_steps", 2,
                      *GRADIENT_LIKE)
    result = run_cli([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                      str(tmp_path / "log"), "train_dreambooth.py", *args])
    logs = "".join(open(tmp_path / "log" / f).read() for f in os.listdir(tmp_path / "log") if "workerlog" in f)
    assert result.returncode == 0, logs[-3000:]
    assert "Weights identical on all 2 ranks" in logs
    assert_same_lora(tmp_path / "two", text_lora_batch_of_two)


def test_text_encoder_lora_names_what_it_cannot_adapt():
    """A text encoder other than CLIP (e.g. Taiyi's BERT) gets a one-line error, not a traceback."""
    import paddle

    import train_dreambooth

    with pytest.raises(train_dreambooth.DreamBoothError, match="LoRA covers CLIP text encoders only"):
        train_dreambooth.add_text_encoder_lora(paddle.nn.Linear(4, 4), RANK, 4.0)
