"""--diagnostics_steps: reproducible, invisible to training, rank 0's alone, continued on resume,
measured against the base model (bench/EFFICACY.md compares prior preservation with none)."""
import csv
import os
import shutil

import numpy as np
import pytest

from conftest import CLASS_PROMPT, load_weights, logged_scalars, run_train, train_args


def diagnostics_rows(output_dir):
    with open(os.path.join(output_dir, "diagnostics.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_measuring_puts_modes_and_paddle_rng_back():
    import paddle

    from diagnostics import measuring

    training, frozen = paddle.nn.Dropout(0.5), paddle.nn.Linear(2, 2)
    frozen.eval()
    state = paddle.get_rng_state()
    with measuring(training, frozen):
        assert not training.training and not frozen.training
        paddle.rand([4])  # a draw while measuring must not shift training's stream
    assert training.training and not frozen.training
    after = paddle.rand([4]).numpy()
    paddle.set_rng_state(state)
    assert np.array_equal(after, paddle.rand([4]).numpy())


def test_same_seed_same_diagnostics_logged_plotted_and_drift_zero_at_the_start(tiny_model, instance_dir, tmp_path):
    for name in ("a", "b"):
        run_train(*train_args(tiny_model, instance_dir, tmp_path / name, "--class_prompt", CLASS_PROMPT,
                              "--diagnostics_steps", 2, "--max_train_steps", 5))
    with open(tmp_path / "a" / "diagnostics.csv") as a, open(tmp_path / "b" / "diagnostics.csv") as b:
        assert a.read() == b.read()
    rows = diagnostics_rows(tmp_path / "a")
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # every 2 updates and the last
    assert float(rows[0]["class_drift"]) == 0.0 and all(float(r["class_drift"]) > 0 for r in rows[1:])
    for tag, column in (("diag/subject_fit", "subject_fit"), ("diag/class_drift", "class_drift")):
        logged = logged_scalars(tmp_path / "a", tag)
        assert logged == {int(r["step"]): pytest.approx(float(r[column]), rel=1e-6) for r in rows}
    assert os.path.getsize(tmp_path / "a" / "diagnostics.png") > 0


def test_training_is_bit_identical_with_and_without_diagnostics(tiny_model, instance_dir, tmp_path):
    """Measured after every update, with the text encoder trained too (its mode is switched)."""
    common = ["--class_prompt", CLASS_PROMPT, "--max_train_steps", 3, "--train_text_encoder"]
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "with", *common, "--diagnostics_steps", 1))
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "without", *common, "--diagnostics_steps", 0))
    assert len(diagnostics_rows(tmp_path / "with")) == 4
    assert not os.path.exists(tmp_path / "without" / "diagnostics.csv")
    for component in ("unet", "text_encoder"):
        measured, plain = load_weights(tmp_path / "with", component), load_weights(tmp_path / "without", component)
        assert all(np.array_equal(measured[k], plain[k]) for k in plain), component


def test_a_resumed_run_continues_the_diagnostics_of_its_start(tiny_model, instance_dir, tmp_path):
    """Without a class prompt only subject fit is measured. The resumed run reuses the saved probes
    and drops what the first run measured after the checkpoint, so its rows equal an unbroken run's."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    common = ["--diagnostics_steps", 1, "--max_train_steps", 4, "--save_steps", 2]
    run_train(*train_args(tiny_model, instance_dir, whole, *common))
    shutil.copytree(whole, resumed)
    run_train(*train_args(tiny_model, instance_dir, resumed, *common, "--resume_from_checkpoint",
                          resumed / "checkpoint-2"))
    rows = diagnostics_rows(whole)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"] and all(r["class_drift"] == "" for r in rows)
    assert diagnostics_rows(resumed) == rows


def test_two_processes_rank_zero_measures_alone(two_process_run):
    """conftest.two_process_run: 2 updates on 2 processes, diagnostics after each, a class prompt."""
    out, logs = two_process_run
    assert "Weights identical on all 2 ranks" in logs
    # one row per measurement: a second writer would have appended its own
    assert [int(r["step"]) for r in diagnostics_rows(out)] == [0, 1, 2]
