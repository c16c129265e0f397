"""LoRA DreamBooth: only adapters train, the base is untouched, the result loads into the base."""
import os

import numpy as np
import pytest

from conftest import load_weights, run_train, train_args

RANK = 2


@pytest.fixture(scope="module")
def lora_run(tiny_model, instance_dir, tmp_path_factory):
    before = {c: load_weights(tiny_model, c) for c in ("unet", "vae", "text_encoder")}
    out = tmp_path_factory.mktemp("lora")
    run_train(*train_args(tiny_model, instance_dir, out, "--use_lora", "--lora_rank", RANK, "--lora_alpha", 4,
                          "--max_train_steps", 4, "--save_steps", 2, "--learning_rate", 1e-2))
    return out, before


def unet_output(pipe, seed=0):
    import paddle

    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    ids = paddle.to_tensor([pipe.tokenizer("a photo of sks dog", padding="max_length",
                                           max_length=pipe.tokenizer.model_max_length)["input_ids"]])
    with paddle.no_grad():
        return pipe.unet(x, paddle.to_tensor([500]), pipe.text_encoder(ids)[0]).sample.numpy()


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


def test_lora_with_text_encoder_training_is_refused(tiny_model, instance_dir, tmp_path):
    import train_dreambooth

    with pytest.raises(train_dreambooth.DreamBoothError, match="text-encoder LoRA"):
        run_train(*train_args(tiny_model, instance_dir, tmp_path, "--use_lora", "--train_text_encoder"))
