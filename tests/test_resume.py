"""Checkpoints, exact resume, signals and interrupted saves."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, assert_same_weights, logged_scalars, run_train, train_args

STEPS = 12  # 3 epochs of the 4 photos; a kill after checkpoint-4 leaves 8 updates and their saves to go


# Per family: the tiny model's fixture, the run's own flags, and what it trains. SDXL and SD3 train their
# text encoders too (their optimizer states and the checkpoint's encoders must come back); SD3 draws its
# noise levels from the logit-normal density.
FAMILIES = {
    "sd": ("tiny_model", [], ("unet",)),
    "sdxl": ("tiny_sdxl", ["--train_text_encoder"], ("unet", "text_encoder", "text_encoder_2")),
    "sd3": ("tiny_sd3", ["--train_text_encoder", "--weighting_scheme", "logit_normal", "--diagnostics_steps", 0],
            ("transformer", "text_encoder", "text_encoder_2")),
}


def family_args(request, family, instance_dir, out):
    fixture, flags, _ = FAMILIES[family]
    return train_args(request.getfixturevalue(fixture), instance_dir, out, "--max_train_steps", STEPS,
                      "--save_steps", 4, *flags)


@pytest.fixture(scope="module")
def uninterrupted_runs(tmp_path_factory):
    """{family: output folder of its uninterrupted run}, filled as the tests ask."""
    return {}


@pytest.fixture
def uninterrupted_run(request, instance_dir, tmp_path_factory, uninterrupted_runs):
    def run(family):
        if family not in uninterrupted_runs:
            out = tmp_path_factory.mktemp(f"uninterrupted-{family}")
            run_train(*family_args(request, family, instance_dir, out))
            uninterrupted_runs[family] = out
        return uninterrupted_runs[family]
    return run


@pytest.fixture
def uninterrupted(uninterrupted_run):
    return uninterrupted_run("sd")


def start_training(argv):
    return subprocess.Popen([sys.executable, "train_dreambooth.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_kill_9_then_resume_latest_gives_the_uninterrupted_weights(request, family, instance_dir, tmp_path,
                                                                    uninterrupted_run, capsys):
    out = tmp_path / "out"
    argv = family_args(request, family, instance_dir, out)
    proc = start_training(argv)
    wait_for(out / "checkpoint-4", proc)
    time.sleep(np.random.default_rng().uniform(0, 0.25))  # somewhere after that checkpoint, well before the end
    proc.kill()
    proc.wait()
    assert not os.path.exists(out / "model_index.json"), "the run finished before it could be killed"
    assert not os.path.exists(out / "model_index.json"), "the run finished before it could be killed"
    capsys.readouterr()
    run_train(*argv, "--resume_from_checkpoint", "latest")
    resumed_at = int(capsys.readouterr().out.split(" at update ")[1].split()[0])
    assert 4 <= resumed_at < STEPS  # a resume, not a fresh start, which would give the same weights
    assert_same_weights(out, uninterrupted_run(family), atol=1e-6, components=FAMILIES[family][2])


def test_sigterm_writes_a_checkpoint_that_resumes_exactly(tiny_model, instance_dir, tmp_path, uninterrupted):
    out = tmp_path / "out"
    argv = train_args(tiny_model, instance_dir, out, "--max_train_steps", STEPS, "--save_steps", 4)
    proc = start_training(argv)
    wait_for(out / "checkpoint-4", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "--resume_from_checkpoint latest" in stderr.strip().splitlines()[-1]
    stopped_at = int(stderr.split("after update ")[1].split(";")[0])
    assert os.path.exists(out / f"checkpoint-{stopped_at}" / "training_state.json")
    assert stopped_at < STEPS and not os.path.exists(out / "model_index.json")
    run_train(*argv, "--resume_from_checkpoint", "latest")
    assert_same_weights(out, uninterrupted, atol=1e-6)


def test_checkpoint_rotation_and_resume_from_an_older_one(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    common = ["--save_steps", 2, "--checkpoints_total_limit", 2]
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 6, *common))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 8, *common,
                          "--resume_from_checkpoint", out / "checkpoint-4"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-6", "checkpoint-8"]


def test_a_resumed_optimizer_state_waits_in_host_memory(tiny_model, instance_dir, tmp_path, monkeypatch):
    """The saved AdamW moments reach the optimizer as numpy arrays (host memory), not as tensors that a
    GPU run would hold on the device before its idle parts are parked; each accumulator takes its value
    at the first update (the resume tests above check the values)."""
    import paddle

    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 1, "--save_steps", 1))
    handed, real = [], paddle.optimizer.AdamW.set_state_dict

    def recording(optimizer, state):
        handed.extend(v for k, v in state.items() if k.endswith(("moment1_0", "moment2_0")))
        return real(optimizer, state)

    monkeypatch.setattr(paddle.optimizer.AdamW, "set_state_dict", recording)
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 2, "--save_steps", 1,
                          "--resume_from_checkpoint", "latest"))
    assert handed and all(isinstance(v, np.ndarray) for v in handed), {type(v) for v in handed}


def test_resume_refuses_a_changed_batch_size_and_a_missing_path(tiny_model, instance_dir, tmp_path):
    import train_dreambooth

    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 2, "--save_steps", 2))
    with pytest.raises(train_dreambooth.DreamBoothError, match="--train_batch_size is 2 .* trained with 1"):
        run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 4, "--train_batch_size", 2,
                              "--resume_from_checkpoint", "latest"))
    with pytest.raises(train_dreambooth.DreamBoothError, match="not a checkpoint folder"):
        run_train(*train_args(tiny_model, instance_dir, out, "--resume_from_checkpoint", tmp_path / "nope"))


def test_latest_without_a_checkpoint_starts_fresh(tiny_model, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--resume_from_checkpoint", "latest"))
    assert os.path.exists(out / "model_index.json")
    assert "no checkpoint in" in capsys.readouterr().out


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_model, instance_dir, tmp_path, monkeypatch):
    """A disk that fills while checkpoint-4 is written: a one-line error, checkpoint-2 intact, and
    no folder under a final name that does not load."""
    import train_dreambooth
    from ppdiffusers import StableDiffusionPipeline

    real_save = train_dreambooth.save_pipeline

    def filling_disk(args, unet, text_encoder, tokenizer, folder):
        if "checkpoint-4" in str(folder):
            real_save(args, unet, text_encoder, tokenizer, folder)  # half the checkpoint is on disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(args, unet, text_encoder, tokenizer, folder)

    monkeypatch.setattr(train_dreambooth, "save_pipeline", filling_disk)
    out = tmp_path / "out"
    with pytest.raises(train_dreambooth.DreamBoothError, match="No space left on device.*intact"):
        run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 6, "--save_steps", 2))
    # The staging folder of the failed save is gone; checkpoint-2 is whole.
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]
    assert train_dreambooth.checkpoint_problem(str(out / "checkpoint-2")) is None
    StableDiffusionPipeline.from_pretrained(out / "checkpoint-2")
    assert not os.path.exists(out / "model_index.json")
    monkeypatch.setattr(train_dreambooth, "save_pipeline", real_save)
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 6, "--save_steps", 2,
                          "--resume_from_checkpoint", "latest"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_a_crash_while_replacing_a_folder_is_undone_at_the_next_start(tmp_path, monkeypatch):
    """commit_dir moves the old folder aside before moving the new one in; a crash between the two
    leaves final.old, which recover_interrupted_saves restores."""
    import train_dreambooth

    final, tmp = tmp_path / "checkpoint-2", tmp_path / "checkpoint-2.tmp"
    os.makedirs(final)
    (final / "weights").write_text("old")
    os.makedirs(tmp)
    (tmp / "weights").write_text("new")
    real_replace, calls = os.replace, []

    def crash_on_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(train_dreambooth.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_dreambooth.commit_dir(str(tmp), str(final))
    monkeypatch.setattr(train_dreambooth.os, "replace", real_replace)
    assert not final.exists()
    train_dreambooth.recover_interrupted_saves(str(tmp_path))
    assert (final / "weights").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]


def test_nan_loss_stops_with_the_step_named(tiny_model, instance_dir, tmp_path, monkeypatch):
    import train_dreambooth

    real_loss = train_dreambooth.compute_loss
    calls = []

    def nan_on_third(*a, **k):
        calls.append(1)
        loss = real_loss(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_dreambooth, "compute_loss", nan_on_third)
    out = tmp_path / "out"
    with pytest.raises(train_dreambooth.DreamBoothError, match="loss is nan at update 3"):
        run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 4, "--save_steps", 2))
    assert not os.path.exists(out / "model_index.json")
    assert os.path.exists(out / "checkpoint-2" / "model_index.json")
    calls.clear()
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "skip", "--max_train_steps", 4,
                          "--skip_nonfinite_steps"))
    assert os.path.exists(tmp_path / "skip" / "model_index.json")
    # The skipped update is made up with the next batch: still 4 updates, one skip logged.
    assert sorted(logged_scalars(tmp_path / "skip", "train/loss")) == [1, 2, 3, 4]
    assert logged_scalars(tmp_path / "skip", "train/skipped_updates")[4] == 1


def test_a_run_that_skips_update_after_update_stops_with_one_line(tiny_model, instance_dir, tmp_path, monkeypatch):
    """--skip_nonfinite_steps must not spin forever on a run that has diverged for good."""
    import train_dreambooth

    monkeypatch.setattr(train_dreambooth, "compute_loss", lambda *a, **k: paddle_nan())
    monkeypatch.setattr(train_dreambooth, "MAX_CONSECUTIVE_SKIPS", 3)
    with pytest.raises(train_dreambooth.DreamBoothError, match="3 updates in a row were skipped"):
        run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--max_train_steps", 2,
                              "--skip_nonfinite_steps"))


def paddle_nan():
    import paddle

    return paddle.to_tensor(float("nan"), stop_gradient=False) * 1.0


def test_two_processes_killed_with_9_resume_to_the_uninterrupted_weights(tiny_model, instance_dir, tmp_path):
    """The launcher and both ranks killed after a checkpoint; a 2-process resume ends where an
    uninterrupted 2-process run ends."""
    steps = 12

    def launch(out, *extra):
        argv = train_args(tiny_model, instance_dir, out, "--max_train_steps", steps, "--save_steps", 4, *extra)
        return subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                                 "--log_dir", str(out) + "-log", "train_dreambooth.py", *argv], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    full = launch(tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    proc = launch(interrupted)
    wait_for(interrupted / "checkpoint-4", proc)
    import psutil

    launcher = psutil.Process(proc.pid)
    for process in [launcher, *launcher.children(recursive=True)]:  # the launcher and every rank
        process.kill()
    proc.wait()
    assert not os.path.exists(interrupted / "model_index.json"), "the run finished before it could be killed"
    resumed = launch(interrupted, "--resume_from_checkpoint", "latest")  # while the full run goes on
    assert full.wait(timeout=300) == 0
    assert resumed.wait(timeout=300) == 0
    assert_same_weights(interrupted, tmp_path / "full", atol=1e-6)
