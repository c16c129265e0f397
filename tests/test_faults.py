"""Faults a hostile but realistic user meets: a full disk on every writer, damaged checkpoints, two
runs on one folder, interrupts in every phase, over-long prompts and over-large images. Each ends in
one line (exit 1, or 130 for an interrupt) and loses nothing that was complete."""
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import CLASS_PROMPT, ROOT, make_images, run_train, train_args

FULL = OSError(errno.ENOSPC, "No space left on device")
QUIET = ("--diagnostics_steps", 0)  # diagnostics only where a test is about them
CLASS_NAME = re.compile(r"\b[A-Z][a-z]+[A-Za-z]*(Error|Exception|Warning|Interrupt)\b")


def cli(capsys, *argv):
    """Run the trainer as the command line does, in this process: (exit code, its one stderr line, log)."""
    import train_dreambooth

    capsys.readouterr()
    code = train_dreambooth.cli([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.replace("\r", "\n").splitlines() if ln.strip() and "it/s" not in ln
             and "s/it" not in ln and "steps:" not in ln]
    assert "Traceback" not in captured.err, captured.err
    assert len(lines) <= 1, lines
    return code, (lines or [""])[-1], captured.out


def one_line(code, line, expected_code, *words):
    assert code == expected_code, line
    prefix = "train_dreambooth.py: error: " if expected_code == 1 else "train_dreambooth.py: "
    assert line.startswith(prefix), line
    missing = [w for w in words if w not in line]
    assert not missing, f"{missing} not in {line!r}"
    assert not CLASS_NAME.search(line), f"a Python class name in {line!r}"


def staging_left(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp" in n or ".old" in n)


def send_self(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs at the next bytecode of the main thread


@pytest.fixture(scope="module")
def checkpointed(tiny_model, instance_dir, tmp_path_factory):
    """A finished 2-update run with checkpoint-1 and checkpoint-2, each with its manifest."""
    out = tmp_path_factory.mktemp("checkpointed")
    run_train(*train_args(tiny_model, instance_dir, out, "--max_train_steps", 2, "--save_steps", 1, *QUIET))
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# A full disk on each writer


def test_a_real_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_model, instance_dir, tmp_path, capsys):
    """--output_dir on a 16 MiB tmpfs: checkpoint-1 (~11 MB) fits, checkpoint-2 does not."""
    import train_dreambooth

    mount = tmp_path / "small_disk"
    os.makedirs(mount)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        out = mount / "out"
        code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 3, "--save_steps",
                                                1, *QUIET))
        one_line(code, line, 1, f"could not write {out}/checkpoint-2 (No space left on device)",
                 f"{out}/checkpoint-1 is intact", "--resume_from_checkpoint latest")
        assert sorted(os.listdir(out)) == ["checkpoint-1", "logs"]  # no staging folder keeps the disk full
        assert train_dreambooth.checkpoint_problem(str(out / "checkpoint-1")) is None
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fail_on(monkeypatch, owner, name, when, error=FULL):
    """Make owner.name raise `error` when when(*args) is true, else do what it did."""
    real = getattr(owner, name)

    def failing(*args, **kwargs):
        if when(*args, **kwargs):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def safetensors_full():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _writer_safetensors(monkeypatch, out):
    import train_dreambooth

    real = train_dreambooth.save_pipeline

    def half_then_full(args, unet, text_encoder, tokenizer, folder):
        real(args, unet, text_encoder, tokenizer, folder)  # most of the checkpoint is on disk
        if "checkpoint-2" in folder:
            raise safetensors_full()

    monkeypatch.setattr(train_dreambooth, "save_pipeline", half_then_full)
    return f"{out}/checkpoint-2"


def _writer_paddle_save(monkeypatch, out):
    import paddle

    fail_on(monkeypatch, paddle, "save", lambda obj, path, *a, **k: "checkpoint-2" in str(path))
    return f"{out}/checkpoint-2"


def _writer_pickle(monkeypatch, out):
    import train_dreambooth

    fail_on(monkeypatch, train_dreambooth.pickle, "dump", lambda obj, f, *a, **k: "rng_state" in getattr(f, "name", ""))
    return f"{out}/checkpoint-2"


def _writer_json_manifest(monkeypatch, out):
    import train_dreambooth

    fail_on(monkeypatch, train_dreambooth, "write_json",
            lambda path, value: "checkpoint-2" in path and path.endswith(train_dreambooth.MANIFEST))
    return f"{out}/checkpoint-2"


def _writer_final_pipeline(monkeypatch, out):
    import train_dreambooth

    real = train_dreambooth.save_pipeline

    def full_in_final(args, unet, text_encoder, tokenizer, folder):
        real(args, unet, text_encoder, tokenizer, folder)
        if os.path.basename(folder).startswith("final.tmp"):
            raise safetensors_full()

    monkeypatch.setattr(train_dreambooth, "save_pipeline", full_in_final)
    return f"could not write {out} "


def _writer_validation_png(monkeypatch, out):
    fail_on(monkeypatch, Image.Image, "save", lambda image, path, *a, **k: "validation" in str(path))
    return f"{out}/validation/step-000002.png"


def _writer_diagnostics_csv(monkeypatch, out):
    import diagnostics

    fail_on(monkeypatch, diagnostics, "write_rows", lambda path, rows: len(rows) == 3,
            OSError(errno.ENOSPC, "No space left on device", f"{out}/diagnostics.csv.tmp"))
    return f"{out}/diagnostics.csv"


def _writer_visualdl(monkeypatch, out):
    from visualdl import LogWriter

    fail_on(monkeypatch, LogWriter, "add_scalar", lambda self, tag, value, step, *a, **k: step == 2)
    return f"{out}/logs"


WRITERS = {name[len("_writer_"):]: fn for name, fn in list(globals().items()) if name.startswith("_writer_")}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_on_each_writer_is_one_line_and_loses_nothing(writer, checkpointed, tiny_model, instance_dir,
                                                                  tmp_path, capsys, monkeypatch):
    """The run resumes a copy of a finished run from checkpoint-1 (so a finished model, checkpoint-1
    and diagnostics are there before) and the disk fills in one writer at update 2."""
    import train_dreambooth
    from ppdiffusers import StableDiffusionPipeline

    out = copy_run(checkpointed, tmp_path / "out")
    shutil.rmtree(out / "checkpoint-2")
    before = {name: (out / name).read_bytes() for name in ("model_index.json", "unet/config.json")}
    named = WRITERS[writer](monkeypatch, out)
    extra = ["--diagnostics_steps", 1] if writer == "diagnostics_csv" else list(QUIET)
    if writer == "validation_png":
        extra += ["--validation_prompt", "a photo of sks dog", "--validation_steps", 1, "--num_validation_images", 1,
                  "--validation_num_inference_steps", 1]
    if writer == "diagnostics_csv":  # a fresh run, so that update 1's row is on disk before update 2's fails
        shutil.rmtree(out)
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 2, "--save_steps", 2,
                                            "--resume_from_checkpoint", "latest", *extra))
    one_line(code, line, 1, named, "(No space left on device)", "free disk space", "--resume_from_checkpoint latest")
    assert staging_left(out) == []
    assert not os.path.exists(out / train_dreambooth.LOCK_FILE)
    if writer == "diagnostics_csv":  # the rows of the base model and update 1 stay readable
        with open(out / "diagnostics.csv") as f:
            assert [row.split(",")[0] for row in f.read().split()] == ["step", "0", "1"]
        return
    # Checkpoint-2 is whole if it was written before the failure, and absent if the failure was in it.
    if writer in ("final_pipeline", "validation_png"):
        assert train_dreambooth.checkpoint_problem(str(out / "checkpoint-2")) is None
    else:
        assert not os.path.exists(out / "checkpoint-2")
    assert train_dreambooth.checkpoint_problem(str(out / "checkpoint-1")) is None
    # The earlier finished model is untouched, and loads.
    assert {name: (out / name).read_bytes() for name in before} == before
    StableDiffusionPipeline.from_pretrained(out)


def test_a_full_disk_while_writing_class_images_keeps_the_finished_ones(tiny_model, instance_dir, tmp_path, capsys,
                                                                        monkeypatch):
    classes = tmp_path / "class"
    calls = []
    fail_on(monkeypatch, Image.Image, "save", lambda image, path, *a, **k: str(path).startswith(str(classes))
            and (calls.append(1) or len(calls) == 3))
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation",
                                            "--class_prompt", CLASS_PROMPT, "--class_data_dir", classes,
                                            "--num_class_images", 4, "--sample_batch_size", 1,
                                            "--class_inference_steps", 1, *QUIET))
    one_line(code, line, 1, f"could not write {classes}/", "(No space left on device)", "already written are kept")
    assert len(os.listdir(classes)) == 2 and all(n.endswith(".png") for n in os.listdir(classes))
    assert not os.path.exists(tmp_path / "out")  # nothing else was written


def test_a_full_disk_while_exporting_keeps_the_trained_model(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    import safetensors.numpy

    fail_on(monkeypatch, safetensors.numpy, "save_file", lambda tensors, path, *a, **k: path.endswith(".tmp"),
            safetensors_full())
    out = tmp_path / "out"
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 1,
                                            "--export_single_file", *QUIET))
    one_line(code, line, 1, "--export_single_file: could not write", "(No space left on device)",
             f"python export_single_file.py {out}")
    assert os.path.exists(out / "model_index.json")
    assert [n for n in os.listdir(out) if n.endswith((".safetensors", ".tmp"))] == []


# ---------------------------------------------------------------------------------------------
# Checkpoints verify themselves


def checkpoint_file_names(folder):
    import train_dreambooth

    with open(os.path.join(folder, train_dreambooth.MANIFEST)) as f:
        return sorted(json.load(f)["files"]) + [train_dreambooth.MANIFEST]


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(0, os.path.getsize(path) // 2))


def test_each_truncated_checkpoint_file_is_named_with_the_newest_good_checkpoint(checkpointed, tiny_model,
                                                                                  instance_dir, tmp_path, capsys):
    out = copy_run(checkpointed, tmp_path / "out")
    bad = out / "checkpoint-2"
    names = checkpoint_file_names(bad)
    assert {"optimizer.pdopt", "rng_state_0.pkl", "training_state.json", "unet/diffusion_paddle_model.safetensors",
            "text_encoder/model.safetensors"} <= set(names)
    for name in names:
        original = (bad / name).read_bytes()
        if len(original) < 2:  # nothing to cut
            continue
        truncate(bad / name)
        code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 3,
                                                "--resume_from_checkpoint", bad, *QUIET))
        one_line(code, line, 1, f"--resume_from_checkpoint {bad}: {bad}/{name}", f"{out}/checkpoint-1")
        (bad / name).write_bytes(original)
    # A changed byte with the size kept is caught by the hash.
    weights = bytearray((bad / "optimizer.pdopt").read_bytes())
    weights[-10] ^= 0xFF
    (bad / "optimizer.pdopt").write_bytes(bytes(weights))
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 3,
                                            "--resume_from_checkpoint", bad, *QUIET))
    one_line(code, line, 1, f"{bad}/optimizer.pdopt differs from what was written", f"{out}/checkpoint-1")


def test_latest_skips_newer_checkpoints_that_do_not_verify(checkpointed, tiny_model, instance_dir, tmp_path, capsys):
    out = copy_run(checkpointed, tmp_path / "out")
    truncate(out / "checkpoint-2" / "unet" / "diffusion_paddle_model.safetensors")
    code, line, log = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 3, "--save_steps", 1,
                                              "--resume_from_checkpoint", "latest", *QUIET))
    assert code == 0, line
    assert f"skipping {out}/checkpoint-2, which does not verify: {out}/checkpoint-2/unet/" in log
    assert f"Resuming from {out}/checkpoint-1 at update 1" in log
    # Every checkpoint damaged: an error, not a fresh start over them.
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):
        truncate(out / name / "optimizer.pdopt")
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 4,
                                            "--resume_from_checkpoint", "latest", *QUIET))
    one_line(code, line, 1, "none of the checkpoints", "verifies", "optimizer.pdopt")


@pytest.mark.parametrize("name", ["unet/diffusion_paddle_model.safetensors", "optimizer.pdopt", "rng_state_0.pkl",
                                  "training_state.json"])
def test_a_checkpoint_of_an_earlier_version_resumes_unverified_and_bad_files_are_named_as_checkpoint_files(
        name, checkpointed, tiny_model, instance_dir, tmp_path, capsys):
    import train_dreambooth

    out = copy_run(checkpointed, tmp_path / "out")
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        os.remove(out / checkpoint / train_dreambooth.MANIFEST)
    bad = out / "checkpoint-2"
    truncate(bad / name)
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 3,
                                            "--resume_from_checkpoint", bad, *QUIET))
    words = [f"checkpoint file {bad}/{name.split('/')[0]}", "cannot be read", f"{out}/checkpoint-1"]
    one_line(code, line, 1, *words)
    assert tiny_model not in line  # never blamed on the base model
    if name == "optimizer.pdopt":  # the old, whole checkpoint-1 still resumes, with a warning
        code, line, log = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 3,
                                                  "--resume_from_checkpoint", out / "checkpoint-1", *QUIET))
        assert code == 0, line
        assert f"{out}/checkpoint-1 has no manifest.json (an earlier version wrote it)" in log
        assert f"Resuming from {out}/checkpoint-1 at update 1" in log


# ---------------------------------------------------------------------------------------------
# One run per output folder


def start_training(argv):
    return subprocess.Popen([sys.executable, "train_dreambooth.py", *map(str, argv)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=180):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def write_lock(out, **holder):
    import train_dreambooth

    os.makedirs(out, exist_ok=True)
    with open(out / train_dreambooth.LOCK_FILE, "w") as f:
        json.dump(holder, f)
    return out / train_dreambooth.LOCK_FILE


def test_a_stale_lock_is_taken_over_and_a_foreign_hosts_lock_is_not(tiny_model, instance_dir, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    lock = write_lock(out, pid=gone.pid, host=socket.gethostname(), started="yesterday")
    code, line, log = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 1, *QUIET))
    assert code == 0, line
    assert f"Taking over the lock of --output_dir {out} from process {gone.pid}" in log
    assert not lock.exists()
    other = tmp_path / "other"
    lock = write_lock(other, pid=gone.pid, host="another-node", started="today")
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, other, "--max_train_steps", 1, *QUIET))
    one_line(code, line, 1, f"process {gone.pid} on another-node", f"delete {lock}")
    assert sorted(os.listdir(other)) == [lock.name]  # nothing else written, the foreign lock kept


def test_staging_names_are_unique_per_run(tiny_model, instance_dir, tmp_path, monkeypatch):
    import train_dreambooth

    staged, real = [], train_dreambooth.atomic_dir
    monkeypatch.setattr(train_dreambooth, "atomic_dir", lambda final, run_id: staged.append(real(final, run_id))
                        or staged[-1])
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--max_train_steps", 1, "--save_steps", 1,
                          *QUIET))
    names = [os.path.basename(p) for p in staged]
    assert [n.split(".tmp-")[0] for n in names] == ["checkpoint-1", "final"], names
    run_id = names[0].split(".tmp-")[1]
    assert names[1].split(".tmp-")[1] == run_id and len(run_id) == 10
    assert len({train_dreambooth.shared_run_id() for _ in range(5)} | {run_id}) == 6


# ---------------------------------------------------------------------------------------------
# Interrupts in every phase


def signal_in(monkeypatch, owner, name, signums, when=lambda *a, **k: True):
    """owner.name sends itself each of `signums` (the first time `when` holds), then does its work."""
    real, sent = getattr(owner, name), []

    def signalling(*args, **kwargs):
        if not sent and when(*args, **kwargs):
            sent.append(True)
            for signum in signums:
                send_self(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalling)


def has_loaded(pid, library):
    """Whether process pid has mapped a shared library whose path contains `library` (/proc/pid/maps)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return library in f.read()
    except FileNotFoundError:  # it ended
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc to see how far the start-up is")
def test_sigterm_during_the_imports_ends_in_one_line(tiny_model, instance_dir, tmp_path):
    """The first part of a run is imports, before main() has its handlers: SIGTERM there (a scheduler
    cancelling a job just submitted) is one line, not a silent death. Sent while NumPy is being imported,
    the first of the trainer's imports; only the interpreter's own start before the script runs is
    not covered."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train_dreambooth.py", *train_args(tiny_model, instance_dir, out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not has_loaded(proc.pid, "_multiarray_umath") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-2000:]
    one_line(proc.returncode, lines[0], 130, "stopped by SIGTERM while starting", "nothing was written")
    assert not os.path.exists(out)


def test_sigterm_while_loading_ends_in_one_line_and_leaves_nothing(tiny_model, instance_dir, tmp_path, capsys,
                                                                    monkeypatch):
    import families

    signal_in(monkeypatch, families.SD, "load", [signal.SIGTERM])
    out = tmp_path / "out"
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, *QUIET))
    one_line(code, line, 130, "stopped by SIGTERM while loading the models", "nothing", "rerun the same command")
    assert not os.path.exists(out)  # not even the lock or the folder it made


def test_a_second_run_refuses_and_ctrl_c_while_generating_class_images_resumes_there(tiny_model, instance_dir,
                                                                                     tmp_path, capsys):
    """A real process generating class images: a second run on its --output_dir refuses at once, naming
    it; then a real Ctrl-C (SIGINT) stops it in one line, and the next run generates only what is missing."""
    import train_dreambooth

    classes, out = tmp_path / "class", tmp_path / "out"
    argv = train_args(tiny_model, instance_dir, out, "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
                      "--class_data_dir", classes, "--num_class_images", 200, "--sample_batch_size", 1,
                      "--class_inference_steps", 1, "--max_train_steps", 1, *QUIET)
    proc = start_training(argv)
    wait_for(classes, proc)
    deadline = time.time() + 180
    while not [n for n in os.listdir(classes) if n.endswith(".png")]:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, *QUIET))
    one_line(code, line, 1, f"--output_dir {out} is in use by another training run",
             f"process {proc.pid} on {socket.gethostname()}", str(out / train_dreambooth.LOCK_FILE))
    assert proc.poll() is None  # the first run goes on
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=180)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "class images:" not in ln]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert lines[-1].startswith("train_dreambooth.py: stopped by Ctrl-C while preparing class images"), lines
    assert "already written are kept" in lines[-1]
    made = sorted(os.listdir(classes))
    assert made and all(n.endswith(".png") for n in made) and len(made) < 200, made
    for name in made:  # every image on disk is whole
        Image.open(classes / name).load()
    assert not os.path.exists(out)  # the lock is released, and the folder it made is gone
    # The next run generates only the missing ones.
    code, line, log = cli(capsys, *argv[:argv.index("--num_class_images") + 1], len(made) + 1,
                          *argv[argv.index("--num_class_images") + 2:])
    assert code == 0, line
    assert f"Generating 1 class images for '{CLASS_PROMPT}'" in log


def test_a_second_ctrl_c_aborts_in_one_line_without_a_checkpoint(tiny_model, instance_dir, tmp_path, capsys,
                                                                   monkeypatch):
    import train_dreambooth

    calls = []
    signal_in(monkeypatch, train_dreambooth, "compute_loss", [signal.SIGINT, signal.SIGINT],
              lambda *a, **k: calls.append(1) or len(calls) == 2)
    out = tmp_path / "out"
    code, line, log = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 4, "--save_steps",
                                              1, *QUIET))
    one_line(code, line, 130, "aborted by a second Ctrl-C after update 1", "--resume_from_checkpoint latest")
    assert "Ctrl-C received: stopping after this update" in log
    assert sorted(os.listdir(out)) == ["checkpoint-1", "logs"]


def test_a_second_ctrl_c_while_the_checkpoint_is_written_leaves_no_half_checkpoint(tiny_model, instance_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    import train_dreambooth

    signal_in(monkeypatch, train_dreambooth, "compute_loss", [signal.SIGINT])
    signal_in(monkeypatch, train_dreambooth, "save_pipeline", [signal.SIGINT])
    out = tmp_path / "out"
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 4, *QUIET))
    one_line(code, line, 130, "aborted by a second Ctrl-C after update 1")
    assert sorted(os.listdir(out)) == ["logs"]


def test_sigterm_during_validation_cuts_it_short_then_checkpoints(tiny_model, instance_dir, tmp_path, capsys,
                                                                   monkeypatch):
    import train_dreambooth

    signal_in(monkeypatch, train_dreambooth, "image_grid", [signal.SIGTERM])
    out = tmp_path / "out"
    code, line, log = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 4,
                                              "--validation_prompt", "a photo of sks dog", "--validation_steps", 1,
                                              "--num_validation_images", 1, "--validation_num_inference_steps", 1,
                                              *QUIET))
    one_line(code, line, 130, "stopped by a signal after update 2; checkpoint saved")
    assert "Validation stopped; nothing of it was written" in log
    assert not os.path.exists(out / "validation") or os.listdir(out / "validation") == []
    assert train_dreambooth.checkpoint_problem(str(out / "checkpoint-2")) is None
    assert staging_left(out) == [] and not os.path.exists(out / "model_index.json")


def test_sigterm_while_saving_the_model_leaves_no_half_model(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    import train_dreambooth

    signal_in(monkeypatch, train_dreambooth, "save_pipeline", [signal.SIGTERM],
              lambda args, unet, text_encoder, tokenizer, folder: os.path.basename(folder).startswith("final.tmp-"))
    out = tmp_path / "out"
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 2, "--save_steps", 1,
                                            *QUIET))
    one_line(code, line, 130, "stopped by SIGTERM while saving the trained model", "no half-written model",
             "--resume_from_checkpoint latest")
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", "logs"]


def test_sigterm_while_exporting_leaves_no_half_file(tiny_model, instance_dir, tmp_path, capsys, monkeypatch):
    import export_single_file

    signal_in(monkeypatch, export_single_file, "_write", [signal.SIGTERM])
    out = tmp_path / "out"
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, out, "--max_train_steps", 1,
                                            "--export_single_file", *QUIET))
    one_line(code, line, 130, "stopped by SIGTERM while exporting", f"the trained model is saved in {out}",
             f"python export_single_file.py {out}")
    assert os.path.exists(out / "model_index.json")
    assert [n for n in os.listdir(out) if n.endswith((".safetensors", ".tmp"))] == []


# ---------------------------------------------------------------------------------------------
# Messages in words


def test_a_cut_prompt_warns_with_the_count_and_a_cut_identifier_is_an_error(tiny_model, instance_dir, tmp_path,
                                                                            capsys):
    from ppdiffusers.transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    long_prompt = "a photo of sks dog " + "on a photo " * 6
    dropped = len(tokenizer(long_prompt)["input_ids"]) - tokenizer.model_max_length
    assert dropped > 0
    code, line, log = cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "out", "--max_train_steps", 1,
                                              "--instance_prompt", long_prompt, "--class_prompt", CLASS_PROMPT, *QUIET))
    assert code == 0, line
    assert f"tokenizer keeps {tokenizer.model_max_length}, so its last {dropped} are dropped" in log
    buried = "on a photo " * 6 + "a photo of sks dog"
    dropped = len(tokenizer(buried)["input_ids"]) - tokenizer.model_max_length
    code, line, _ = cli(capsys, *train_args(tiny_model, instance_dir, tmp_path / "buried", "--instance_prompt", buried,
                                            "--class_prompt", CLASS_PROMPT, *QUIET))
    one_line(code, line, 1, f"the {dropped} it drops hold the identifier 'sks'", "shorten the prompt")
    assert not os.path.exists(tmp_path / "buried")


def test_an_over_large_image_names_its_pixels_and_the_limit(tmp_path, monkeypatch, caplog):
    import train_dreambooth

    folder = make_images(tmp_path / "imgs", n=1, size=(72, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 72 x 64 is over twice this: PIL refuses it
    with pytest.raises(train_dreambooth.DreamBoothError) as refused:
        train_dreambooth.load_images(train_dreambooth.list_images(folder, "--instance_data_dir"), "--instance_data_dir")
    message = str(refused.value)
    for words in ("img0.png has 72x64 = 4,608 pixels", "limit is 2,000 pixels", "downscale"):
        assert words in message, message
    assert "Error" not in message and "re-save" not in message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between the limit and twice it: PIL warns, and so do we
    with caplog.at_level("WARNING", logger="dreambooth"):
        train_dreambooth.load_images(train_dreambooth.list_images(folder, "--instance_data_dir"), "--instance_data_dir")
    assert "img0.png has 72x64 = 4,608 pixels: decoding it takes much memory; downscale it" in caplog.text
