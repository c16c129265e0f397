"""Every flag of the seed README (README_zh of ppdiffusers' DreamBooth example): its default, its
aliases, and, where cheap, that it changes training as documented."""
import os
import re
import sys

import numpy as np
import pytest

from conftest import CLASS_PROMPT, load_weights, logged_scalars, make_images, run_cli, run_train, train_args

REQUIRED = ["--pretrained_model_name_or_path", "some/model", "--instance_data_dir", "imgs",
            "--instance_prompt", "a photo of sks dog"]

# Flags the seed documents (section 1.2.2 of its README), plus the aliases this trainer adds.
SEED_FLAGS = [
    "--pretrained_model_name_or_path", "--instance_data_dir", "--instance_prompt", "--class_data_dir",
    "--class_prompt", "--num_class_images", "--prior_loss_weight", "--sample_batch_size",
    "--with_prior_preservation", "--num_train_epochs", "--max_train_steps", "--save_steps",
    "--gradient_accumulation_steps", "--train_text_encoder", "--height", "--width", "--learning_rate",
    "--scale_lr", "--lr_scheduler", "--lr_warmup_steps", "--train_batch_size", "--center_crop",
    "--gradient_checkpointing", "--output_dir", "--seed", "--adam_beta1", "--adam_beta2", "--adam_weight_decay",
    "--adam_epsilon", "--max_grad_norm", "--logging_dir", "--writer_type",
]
ALIASES = ["--resolution", "--report_to", "--checkpointing_steps", "--tokenizer_name"]


def parse(*extra):
    import train_dreambooth

    return train_dreambooth.parse_args(REQUIRED + [str(e) for e in extra])


# ----------------------------------------------------------------------------------------------
# Parsing


DEFAULTS = {
    # documented with a value in the seed README
    "num_train_epochs": 1, "height": 512, "width": 512, "lr_scheduler": "constant",
    "output_dir": "dreambooth-model", "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 0.02,
    "adam_epsilon": 1e-8, "max_grad_norm": None, "writer_type": "visualdl", "center_crop": False,
    "train_text_encoder": False, "with_prior_preservation": False, "gradient_checkpointing": False,
    "scale_lr": False,
    # named without a value in the seed README: ppdiffusers' example defaults
    "class_data_dir": None, "class_prompt": None, "num_class_images": 100, "prior_loss_weight": 1.0,
    "sample_batch_size": 4, "max_train_steps": None, "save_steps": 500, "gradient_accumulation_steps": 1,
    "learning_rate": 5e-6, "lr_warmup_steps": 500, "train_batch_size": 4, "seed": None, "logging_dir": "logs",
    "tokenizer_name": None,
}


@pytest.mark.parametrize("attr,default", DEFAULTS.items(), ids=list(DEFAULTS))
def test_default(attr, default):
    value = getattr(parse(), attr)
    assert value == default and type(value) is type(default), (attr, value)


# Only what parsing itself decides: aliases, and the flags that set or keep others. A flag whose value
# argparse merely stores is checked by what it does in training (below and in the other test files).
PARSED = [
    (["--checkpointing_steps", 7], "save_steps", 7),
    (["--report_to", "visualdl"], "writer_type", "visualdl"),
    (["--resolution", 128], "height", 128),
    (["--resolution", 128], "width", 128),
    (["--resolution", 128, "--height", 128], "width", 128),  # agreeing flags are no contradiction
    (["--height", 128], "width", 512),  # one side alone keeps the other's default
    (["--width", 256], "height", 512),
    (["--lora_rank", 8], "lora_alpha", 8.0),  # alpha defaults to the rank: scale 1
]


@pytest.mark.parametrize("argv,attr,expected", PARSED, ids=[" ".join(map(str, a)) + f"->{attr}"
                                                           for a, attr, _ in PARSED])
def test_aliases_and_derived_values(argv, attr, expected):
    assert getattr(parse(*argv), attr) == expected


def test_the_seed_command_line_parses_as_written():
    """Section 1.2.2 of the seed README, `--flag=value` spelling and all."""
    import train_dreambooth

    args = train_dreambooth.parse_args([
        "--pretrained_model_name_or_path=CompVis/stable-diffusion-v1-4", "--instance_data_dir=./dream_image",
        "--output_dir=./dream_outputs", "--instance_prompt=a photo of sks dog", "--height=512", "--width=512",
        "--train_batch_size=1", "--gradient_accumulation_steps=1", "--learning_rate=5e-6", "--lr_scheduler=constant",
        "--lr_warmup_steps=0", "--max_train_steps=400"])
    assert (args.height, args.width, args.train_batch_size, args.learning_rate, args.lr_warmup_steps,
            args.max_train_steps, args.output_dir) == (512, 512, 1, 5e-6, 0, 400, "./dream_outputs")
    prior = train_dreambooth.parse_args([
        "--pretrained_model_name_or_path=CompVis/stable-diffusion-v1-4", "--instance_data_dir=./dream_image",
        "--class_data_dir=./dream_class_image", "--output_dir=./dream_outputs_with_class",
        "--with_prior_preservation", "--prior_loss_weight=1.0", "--instance_prompt=a photo of sks dog",
        "--class_prompt=a photo of dog", "--height=512", "--width=512", "--num_class_images=200",
        "--max_train_steps=800"])
    assert prior.with_prior_preservation and prior.num_class_images == 200 and prior.prior_loss_weight == 1.0


def test_writer_type_tensorboard_works_or_says_how_to_install_it(tiny_model, instance_dir, tmp_path):
    import importlib.util

    import train_dreambooth

    argv = train_args(tiny_model, instance_dir, tmp_path / "out", "--writer_type", "tensorboard")
    if importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(train_dreambooth.DreamBoothError, match=r"pip install tensorboardX"):
            run_train(*argv)
        assert not (tmp_path / "out").exists()
    else:
        run_train(*argv)
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "out" / "logs"))


def test_report_to_tensorboard_is_writer_type_tensorboard():
    import train_dreambooth

    def outcome(*argv):
        try:
            return ("args", parse(*argv).writer_type)
        except train_dreambooth.DreamBoothError as e:  # no tensorboardX: the same one-line error
            return ("error", str(e))

    assert outcome("--report_to", "tensorboard") == outcome("--writer_type", "tensorboard")
    assert outcome("--report_to", "tensorboard")[1] != "visualdl"


OUT_OF_RANGE = [("--adam_beta1", 1.5), ("--adam_beta2", 1.0), ("--adam_epsilon", -1), ("--max_grad_norm", -1),
                ("--caption_dropout_rate", 1.0), ("--caption_dropout_rate", -0.1), ("--class_guidance_scale", -1)]


@pytest.mark.parametrize("flag,value", OUT_OF_RANGE, ids=[f"{f}={v}" for f, v in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_when_parsing(flag, value):
    import train_dreambooth

    with pytest.raises(train_dreambooth.DreamBoothError, match=flag):
        parse(flag, value)


# ----------------------------------------------------------------------------------------------
# --help (docs/flags.md is generated from the same parser: tests/test_docs.py)


@pytest.fixture(scope="module")
def help_flags():
    proc = run_cli([sys.executable, "train_dreambooth.py", "--help"])
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", proc.stdout))


def test_help_lists_every_seed_flag_and_alias(help_flags):
    missing = [f for f in SEED_FLAGS + ALIASES if f not in help_flags]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------
# What the flags do, in short in-process runs


@pytest.fixture(scope="module")
def base(tiny_model, instance_dir, tmp_path_factory):
    """The reference: the shrunk seed command, 2 updates at lr 1e-3, seed 0."""
    out = tmp_path_factory.mktemp("flags") / "base"
    run_train(*train_args(tiny_model, instance_dir, out))
    return load_weights(out)


def train(tiny_model, instance, out, *extra):
    run_train(*train_args(tiny_model, instance, out, *extra))
    return load_weights(out)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("extra,updates", [
    (["--num_train_epochs", 5, "--max_train_steps", 3], 3),  # fewer than the epochs would give
    (["--num_train_epochs", 1, "--max_train_steps", 6], 6),  # more: epochs are recomputed
    (["--num_train_epochs", 2, "--max_train_steps", None], 8),  # 4 images, batch 1
    (["--train_batch_size", 2, "--max_train_steps", None], 2),
    (["--train_batch_size", 2, "--gradient_accumulation_steps", 2, "--num_train_epochs", 3,
      "--max_train_steps", None], 3),
], ids=["steps<epochs", "steps>epochs", "2epochs", "batch2", "batch2xaccum2x3epochs"])
def test_number_of_updates(tiny_model, instance_dir, tmp_path, extra, updates):
    run_train(*train_args(tiny_model, instance_dir, tmp_path, *extra))
    assert sorted(logged_scalars(tmp_path, "train/loss")) == list(range(1, updates + 1))


def test_save_steps_and_logging_dir(tiny_model, instance_dir, tmp_path):
    run_train(*train_args(tiny_model, instance_dir, tmp_path, "--max_train_steps", 5, "--save_steps", 2,
                          "--logging_dir", "mylogs"))
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "logs").exists()
    assert sorted(logged_scalars(tmp_path, "train/loss", logging_dir="mylogs")) == [1, 2, 3, 4, 5]


def test_scale_lr_multiplies_by_accumulation_batch_and_processes(tiny_model, instance_dir, tmp_path):
    common = ["--learning_rate", 1e-4, "--gradient_accumulation_steps", 2, "--train_batch_size", 2,
              "--max_train_steps", 1]
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "scaled", *common, "--scale_lr"))
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "plain", *common))
    assert logged_scalars(tmp_path / "scaled", "train/lr")[1] == pytest.approx(1e-4 * 2 * 2 * 1)
    assert logged_scalars(tmp_path / "plain", "train/lr")[1] == pytest.approx(1e-4)


def test_linear_schedule_with_warmup_follows_the_formula(tiny_model, instance_dir, tmp_path):
    lr, warmup, total = 1e-3, 2, 4
    run_train(*train_args(tiny_model, instance_dir, tmp_path, "--lr_scheduler", "linear", "--lr_warmup_steps", warmup,
                          "--max_train_steps", total, "--learning_rate", lr))
    logged = logged_scalars(tmp_path, "train/lr")

    def expected(update):  # the rate update number `update` (1-based) uses: 0 -> lr over the warmup, then -> 0
        s = update - 1
        return lr * (s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup)))

    assert sorted(logged) == [1, 2, 3, 4]
    for update in logged:
        assert logged[update] == pytest.approx(expected(update), rel=1e-6, abs=1e-12), (update, logged)
    assert logged[2] == pytest.approx(lr / 2) and logged[3] == pytest.approx(lr) and logged[4] == pytest.approx(lr / 2)


@pytest.fixture
def recorded_crops(monkeypatch):
    """Every cropped image the trainer turns into pixels."""
    import train_dreambooth

    seen, real = [], train_dreambooth.to_pixels

    def recording(image, flip):
        seen.append(np.asarray(image).copy())
        return real(image, flip)

    monkeypatch.setattr(train_dreambooth, "to_pixels", recording)
    return seen


@pytest.mark.parametrize("cache", [[], ["--no_cache_latents"]], ids=["default", "no_cache"])
def test_center_crop_gives_the_center_of_a_wide_image(tiny_model, tmp_path, recorded_crops, cache):
    import train_dreambooth as td

    wide = make_images(tmp_path / "wide", n=2, size=(150, 64))
    run_train(*train_args(tiny_model, wide, tmp_path / "out", "--center_crop", "--max_train_steps", 4, *cache))
    centers = []
    for name in sorted(os.listdir(wide)):
        resized = td.resize_to_cover(td.open_rgb(os.path.join(wide, name)), 64, 64)
        assert resized.size == (150, 64)
        centers.append(np.asarray(resized.crop((43, 0, 107, 64))))
    assert len(recorded_crops) >= 2
    for crop in recorded_crops:
        assert any(np.array_equal(crop, c) for c in centers), "a sample is not the center crop"
    assert {i for i, c in enumerate(centers) for crop in recorded_crops if np.array_equal(crop, c)} == {0, 1}


def test_without_center_crop_a_wide_image_is_cropped_at_random(tiny_model, tmp_path, recorded_crops):
    import train_dreambooth as td

    wide = make_images(tmp_path / "wide", n=1, size=(150, 64))
    run_train(*train_args(tiny_model, wide, tmp_path / "out", "--max_train_steps", 6))
    resized = np.asarray(td.resize_to_cover(td.open_rgb(os.path.join(wide, "img0.png")), 64, 64))
    offsets = set()
    for crop in recorded_crops:
        matches = [x for x in range(150 - 64 + 1) if np.array_equal(resized[:, x:x + 64], crop)]
        assert matches, "a sample is not a crop of the resized image"
        offsets.add(matches[0])
    assert len(recorded_crops) == 6 and len(offsets) > 1, offsets


def test_gradient_checkpointing_gives_the_same_weights(tiny_model, instance_dir, tmp_path, base, monkeypatch):
    from ppdiffusers import UNet2DConditionModel

    enabled, real = [], UNet2DConditionModel.enable_gradient_checkpointing

    def spy(self):
        enabled.append(type(self).__name__)
        return real(self)

    monkeypatch.setattr(UNet2DConditionModel, "enable_gradient_checkpointing", spy)
    assert max_diff(train(tiny_model, instance_dir, tmp_path, "--gradient_checkpointing"), base) < 1e-5
    assert enabled == ["UNet2DConditionModel"], "--gradient_checkpointing did not enable it on the UNet"


def test_gradient_checkpointing_with_the_text_encoder(tiny_model, instance_dir, tmp_path):
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "a", "--train_text_encoder"))
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "b", "--train_text_encoder",
                          "--gradient_checkpointing"))
    for component in ("unet", "text_encoder"):
        assert max_diff(load_weights(tmp_path / "a", component), load_weights(tmp_path / "b", component)) < 1e-5


def test_seed_makes_runs_repeatable_and_a_new_seed_changes_them(tiny_model, instance_dir, tmp_path, base):
    assert max_diff(train(tiny_model, instance_dir, tmp_path / "same", "--seed", 0), base) == 0
    assert max_diff(train(tiny_model, instance_dir, tmp_path / "other", "--seed", 1), base) > 1e-4


def test_max_grad_norm_clips(tiny_model, instance_dir, tmp_path, base):
    assert max_diff(train(tiny_model, instance_dir, tmp_path / "tiny", "--max_grad_norm", 1e-6), base) > 1e-4
    assert max_diff(train(tiny_model, instance_dir, tmp_path / "huge", "--max_grad_norm", 1e9), base) < 1e-7


def test_adam_weight_decay_is_decoupled_decay_of_the_weights(tiny_model, instance_dir, tmp_path):
    """AdamW: one update with decay wd moves each weight by an extra -lr * wd * weight."""
    lr = 1e-3
    initial = load_weights(tiny_model)
    off = train(tiny_model, instance_dir, tmp_path / "off", "--adam_weight_decay", 0, "--max_train_steps", 1)
    on = train(tiny_model, instance_dir, tmp_path / "on", "--adam_weight_decay", 1.0, "--max_train_steps", 1)
    assert max_diff(on, off) > 1e-4
    for k in initial:
        np.testing.assert_allclose(on[k] - off[k], -lr * 1.0 * initial[k], atol=1e-6, err_msg=k)


def test_adam_flags_reach_the_optimizer(tiny_model, instance_dir, tmp_path, monkeypatch):
    import paddle

    seen, real = {}, paddle.optimizer.AdamW

    def recording(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(paddle.optimizer, "AdamW", recording)
    run_train(*train_args(tiny_model, instance_dir, tmp_path, "--adam_beta1", 0.8, "--adam_beta2", 0.95,
                          "--adam_epsilon", 1e-6, "--adam_weight_decay", 0.1, "--max_grad_norm", 2.0,
                          "--max_train_steps", 1))
    assert (seen["beta1"], seen["beta2"], seen["epsilon"], seen["weight_decay"]) == (0.8, 0.95, 1e-6, 0.1)
    assert seen["grad_clip"].clip_norm == 2.0


def test_tokenizer_name_is_used(tiny_model, instance_dir, tmp_path):
    import train_dreambooth

    run_train(*train_args(tiny_model, instance_dir, tmp_path / "ok", "--tokenizer_name",
                          os.path.join(tiny_model, "tokenizer")))
    assert os.path.isfile(tmp_path / "ok" / "tokenizer" / "vocab.json")
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(train_dreambooth.DreamBoothError, match="tokenizer"):
        run_train(*train_args(tiny_model, instance_dir, tmp_path / "bad", "--tokenizer_name", empty))


def test_prior_preservation_generates_num_class_images_in_sample_batches(tiny_model, instance_dir, tmp_path,
                                                                         monkeypatch):
    import train_dreambooth

    batches, real = [], train_dreambooth.load_sampling_pipeline

    def recording_pipeline(args, dtype):
        pipe = real(args, dtype)

        def call(prompts, **kwargs):
            batches.append(len(prompts))
            return pipe(prompts, **kwargs)
        return call

    monkeypatch.setattr(train_dreambooth, "load_sampling_pipeline", recording_pipeline)
    classes = tmp_path / "class"
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation",
                          "--class_prompt", CLASS_PROMPT, "--class_data_dir", classes, "--num_class_images", 3,
                          "--sample_batch_size", 2, "--class_inference_steps", 2, "--prior_loss_weight", 0.5))
    assert batches == [2, 1]
    names = sorted(os.listdir(classes))
    assert len(names) == 3 and all(n.endswith(".png") for n in names)
    from PIL import Image

    assert {Image.open(classes / n).size for n in names} == {(64, 64)}
    # a second run finds them all and generates none
    batches.clear()
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "again", "--with_prior_preservation",
                          "--class_prompt", CLASS_PROMPT, "--class_data_dir", classes, "--num_class_images", 3,
                          "--sample_batch_size", 2, "--class_inference_steps", 2))
    assert batches == [] and sorted(os.listdir(classes)) == names
