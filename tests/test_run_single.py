"""The seed's single-process command, `bash run_single.sh`, end to end on the tiny model."""
import os
import sys

import numpy as np
import pytest

from conftest import PROMPT, ROOT, load_weights, run_cli, run_train, train_args

STEPS = 3


def script_env(model, instance, output):
    """run_single.sh runs in the project's venv (setup_venv.sh): make that the venv running these tests, so
    that nothing is installed; outside a venv, keep this interpreter with DREAMBOOTH_VENV=none."""
    env = {"MODEL_NAME": str(model), "INSTANCE_DIR": str(instance), "OUTPUT_DIR": str(output)}
    if sys.prefix != sys.base_prefix:
        return dict(env, DREAMBOOTH_VENV=sys.prefix)
    return dict(env, DREAMBOOTH_VENV="none", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


@pytest.fixture(scope="module")
def single_run(tiny_model, instance_dir, tmp_path_factory):
    """One run of run_single.sh from a folder of the user's, every path relative to it; later
    --height/--width/--max_train_steps replace the script's own."""
    cwd = tmp_path_factory.mktemp("run_single")
    out = cwd / "out"
    env = script_env(os.path.relpath(tiny_model, cwd), os.path.relpath(instance_dir, cwd), "out")
    proc = run_cli(["bash", os.path.join(ROOT, "run_single.sh"), "--height", "64", "--width", "64",
                    "--max_train_steps", str(STEPS), "--seed", "0", "--save_steps", "2"], env=env, cwd=str(cwd))
    return proc, str(out)


def vdl_scalars(output_dir, logging_dir="logs"):
    """{tag: [(step, value), ...]} of every scalar in the VisualDL record files under the log folder."""
    from visualdl import LogReader

    folder = os.path.join(output_dir, logging_dir)
    records = [n for n in os.listdir(folder) if n.startswith("vdlrecords.")]
    assert records, f"no VisualDL record file in {folder}: {os.listdir(folder)}"
    scalars = {}
    for name in records:
        reader = LogReader(file_path=os.path.join(folder, name))
        for tag in reader.get_tags().get("scalar", []):
            scalars.setdefault(tag, []).extend((r.id, r.value) for r in reader.get_data("scalar", tag))
    return scalars


def assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    changed = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not changed, f"{what}: {len(changed)} tensors changed, e.g. {changed[:3]}"


def test_exit_code_zero_and_relative_paths_are_the_callers(single_run):
    proc, out = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert os.path.isfile(os.path.join(out, "model_index.json")), "OUTPUT_DIR=out is not under the caller's folder"
    assert not os.path.exists(os.path.join(ROOT, "out"))


def test_output_loads_and_generates_a_64x64_image(single_run):
    from ppdiffusers import StableDiffusionPipeline

    proc, out = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    import paddle

    image = pipe(PROMPT, num_inference_steps=2, generator=paddle.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    pixels = np.asarray(image)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0, "a constant image: the pipeline is broken"


def test_only_the_unet_is_trained(single_run, tiny_model):
    proc, out = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, trained = load_weights(tiny_model, "unet"), load_weights(out, "unet")
    assert base.keys() == trained.keys()
    changed = [k for k in base if not np.array_equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} UNet tensors changed"
    assert_same(load_weights(tiny_model, "vae"), load_weights(out, "vae"), "VAE")
    assert_same(load_weights(tiny_model, "text_encoder"), load_weights(out, "text_encoder"), "text encoder")


def test_checkpoint_2_loads_and_holds_the_step_2_weights(single_run, tiny_model):
    from ppdiffusers import StableDiffusionPipeline

    proc, out = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2"], checkpoints  # --save_steps 2 of 3 updates
    ckpt = os.path.join(out, "checkpoint-2")
    pipe = StableDiffusionPipeline.from_pretrained(ckpt)
    assert pipe.unet is not None and pipe.vae is not None
    base, step2, final = (load_weights(f, "unet") for f in (tiny_model, ckpt, out))
    assert any(not np.array_equal(base[k], step2[k]) for k in base), "checkpoint-2 holds the untrained UNet"
    assert any(not np.array_equal(final[k], step2[k]) for k in base), "checkpoint-2 holds the final UNet"


def test_visualdl_log_has_one_loss_and_lr_per_update(single_run):
    proc, out = single_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = vdl_scalars(out)
    assert {"train/loss", "train/lr"} <= set(scalars), sorted(scalars)
    loss, lr = dict(scalars["train/loss"]), dict(scalars["train/lr"])
    assert len(scalars["train/loss"]) == STEPS and sorted(loss) == list(range(1, STEPS + 1)), scalars["train/loss"]
    assert all(np.isfinite(v) and v > 0 for v in loss.values()), loss
    # run_single.sh's own --learning_rate=5e-6 --lr_scheduler=constant reached the trainer
    assert sorted(lr) == list(range(1, STEPS + 1)) and all(v == pytest.approx(5e-6) for v in lr.values()), lr


def test_resolution_after_the_scripts_height_is_a_one_line_contradiction(tiny_model, instance_dir, tmp_path):
    """run_single.sh passes --height=512 --width=512; a later --resolution 64 contradicts them."""
    out = tmp_path / "out"
    proc = run_cli(["bash", "run_single.sh", "--resolution", "64"], env=script_env(tiny_model, instance_dir, out))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "--resolution 64" in last and "--height 512" in last, proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_train_text_encoder_trains_it_and_leaves_the_vae(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--train_text_encoder", "--max_train_steps", 2))
    base, trained = load_weights(tiny_model, "text_encoder"), load_weights(out, "text_encoder")
    assert base.keys() == trained.keys()
    changed = [k for k in base if not np.array_equal(base[k], trained[k])]
    assert len(changed) > len(base) // 2, f"only {len(changed)} of {len(base)} text encoder tensors changed"
    assert_same(load_weights(tiny_model, "vae"), load_weights(out, "vae"), "VAE")
    unet_base, unet_trained = load_weights(tiny_model, "unet"), load_weights(out, "unet")
    assert any(not np.array_equal(unet_base[k], unet_trained[k]) for k in unet_base)
