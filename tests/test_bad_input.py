"""Mistakes a user makes on the command line: each is one line on stderr naming the flag or file and
the fix, a non-zero exit, no traceback, and nothing written."""
import hashlib
import os
import re
import shutil
import sys

import pytest
from PIL import Image

from conftest import CLASS_PROMPT, make_images, run_cli, train_args

ERROR_PREFIX = "train_dreambooth.py: error:"


def snapshot(folder):
    """{relative path: content hash} of everything under folder, or None if it does not exist."""
    if not os.path.exists(folder):
        return None
    tree = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            tree[os.path.relpath(os.path.join(root, name), folder) + "/"] = "dir"
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                tree[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha1(f.read()).hexdigest()
    return tree


def corrupt(path):
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not really an image" * 3)


def a_finished_pipeline(out, tiny_model):
    os.makedirs(out)
    shutil.copy(os.path.join(tiny_model, "model_index.json"), out)
    shutil.copytree(os.path.join(tiny_model, "scheduler"), os.path.join(out, "scheduler"))
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("my earlier run")


def model_without_index(tmp, tiny_model):
    model = os.path.join(tmp, "no_index")
    shutil.copytree(tiny_model, model)
    os.remove(os.path.join(model, "model_index.json"))
    return model


def model_without_unet(tmp, tiny_model):
    model = os.path.join(tmp, "no_unet")
    shutil.copytree(tiny_model, model)
    shutil.rmtree(os.path.join(model, "unet"))
    return model


# Each case: (id, builder(tmp, tiny_model, instance_dir) -> (flags replacing train_args' defaults, words the
# error line must hold, output_dir prepared before the run or None)).
def _case_missing_dir(tmp, model, inst):
    return ["--instance_data_dir", os.path.join(tmp, "no_such_dir")], ["--instance_data_dir", "no_such_dir",
                                                                       "no such folder", "point"]


def _case_empty_dir(tmp, model, inst):
    os.makedirs(os.path.join(tmp, "empty"))
    return ["--instance_data_dir", os.path.join(tmp, "empty")], ["--instance_data_dir", "empty", "no images",
                                                                 "photos"]


def _case_only_txt(tmp, model, inst):
    folder = os.path.join(tmp, "texts")
    os.makedirs(folder)
    with open(os.path.join(folder, "readme.txt"), "w") as f:
        f.write("photos go here")
    return ["--instance_data_dir", folder], ["--instance_data_dir", "texts", "no images", "photos"]


def _case_one_corrupt(tmp, model, inst):
    folder = make_images(os.path.join(tmp, "imgs"), n=2)
    corrupt(os.path.join(folder, "broken.png"))
    return ["--instance_data_dir", folder], ["--instance_data_dir", "broken.png", "re-save"]


def _case_two_corrupt(tmp, model, inst):
    folder = make_images(os.path.join(tmp, "imgs"), n=2)
    corrupt(os.path.join(folder, "broken1.png"))
    corrupt(os.path.join(folder, "broken2.jpg"))
    return ["--instance_data_dir", folder], ["--instance_data_dir", "broken1.png", "broken2.jpg", "re-save"]


def _case_prior_no_class_prompt(tmp, model, inst):
    return (["--with_prior_preservation", "--class_data_dir", os.path.join(tmp, "class")],
            ["--with_prior_preservation", "--class_prompt", "a photo of"])


def _case_prior_no_class_dir(tmp, model, inst):
    return ["--with_prior_preservation", "--class_prompt", CLASS_PROMPT], ["--with_prior_preservation",
                                                                           "--class_data_dir"]


def _case_height_60(tmp, model, inst):
    return ["--resolution", None, "--height", 60, "--width", 64], ["--height 60", "multiple of 8"]


def _case_resolution_contradicts_height(tmp, model, inst):
    return ["--resolution", 64, "--height", 128], ["--resolution 64", "--height 128", "one of them"]


def _case_max_train_steps_0(tmp, model, inst):
    return ["--max_train_steps", 0], ["--max_train_steps", "positive", "0"]


def _case_max_train_steps_negative(tmp, model, inst):
    return ["--max_train_steps", -1], ["--max_train_steps", "positive", "-1"]


def _case_lr_scheduler_nope(tmp, model, inst):
    return ["--lr_scheduler", "nope"], ["--lr_scheduler", "nope", "constant", "linear", "cosine"]


def _case_writer_type_nope(tmp, model, inst):
    return ["--writer_type", "nope"], ["--writer_type", "nope", "visualdl", "tensorboard"]


def _case_model_empty_dir(tmp, model, inst):
    os.makedirs(os.path.join(tmp, "empty_model"))
    return (["--pretrained_model_name_or_path", os.path.join(tmp, "empty_model")],
            ["--pretrained_model_name_or_path", "empty_model", "model_index.json", "save_pretrained"])


def _case_model_without_index(tmp, model, inst):
    return (["--pretrained_model_name_or_path", model_without_index(tmp, model)],
            ["--pretrained_model_name_or_path", "no_index", "model_index.json"])


def _case_finished_output_dir(tmp, model, inst):
    a_finished_pipeline(os.path.join(tmp, "out"), model)
    return [], ["--output_dir", "--overwrite_output_dir"]


def _case_output_dir_not_writable(tmp, model, inst):
    blocker = os.path.join(tmp, "a_file")
    with open(blocker, "w") as f:
        f.write("not a folder")
    return ["--output_dir", os.path.join(blocker, "out")], ["--output_dir", "not writable"]


def _case_masked_loss_without_alpha(tmp, model, inst):
    return ["--masked_loss"], ["--masked_loss", "alpha channel", "transparent", "drop --masked_loss"]


def _case_masked_loss_fully_transparent(tmp, model, inst):
    folder = os.path.join(tmp, "cut_out")
    os.makedirs(folder)
    Image.new("RGBA", (64, 64), (200, 30, 30, 255)).save(os.path.join(folder, "subject.png"))
    Image.new("RGBA", (64, 64), (200, 30, 30, 0)).save(os.path.join(folder, "clear.png"))
    return ["--instance_data_dir", folder, "--masked_loss"], ["--masked_loss", "clear.png", "fully transparent"]


CASES = {name[len("_case_"):]: fn for name, fn in list(globals().items()) if name.startswith("_case_")}


def _late_model_without_unet(tmp, model, inst):
    return ["--pretrained_model_name_or_path", model_without_unet(tmp, model)], ["unet", "no_unet"]


def _late_tokenizer_name_not_a_tokenizer(tmp, model, inst):
    return ["--tokenizer_name", os.path.join(tmp, "not_a_tokenizer")], ["--tokenizer_name", "not_a_tokenizer"]


def _late_output_dir_with_foreign_tmp_folders(tmp, model, inst):
    """A user's own photos.tmp and drafts.old in output_dir are not the trainer's staging folders."""
    out = os.path.join(tmp, "out")
    os.makedirs(os.path.join(out, "photos.tmp"))
    with open(os.path.join(out, "photos.tmp", "holiday.txt"), "w") as f:
        f.write("mine")
    os.makedirs(os.path.join(out, "drafts.old"))
    return _case_one_corrupt(tmp, model, inst)


# Errors found only once the models load; they too must leave nothing behind.
CASES.update({name[len("_late_"):]: fn for name, fn in list(globals().items()) if name.startswith("_late_")})


def run_case(tmp, build, tiny_model, instance_dir):
    tmp = str(tmp)
    os.makedirs(os.path.join(tmp, "not_a_tokenizer"), exist_ok=True)
    extra, words = build(tmp, tiny_model, instance_dir)
    out = os.path.join(tmp, "out")
    watched = {path: snapshot(path) for path in (out, os.path.join(tmp, "class"))}
    steps = [] if "--max_train_steps" in extra else ["--max_train_steps", 1]  # the case's own value wins
    proc = run_cli([sys.executable, "train_dreambooth.py", *train_args(tiny_model, instance_dir, out, *extra, *steps)])
    return proc, words, watched


@pytest.fixture(scope="module")
def outcomes(tiny_model, instance_dir, tmp_path_factory):
    """Every case run once, the subprocesses in parallel (most cost only their ~5 s import)."""
    from concurrent.futures import ThreadPoolExecutor

    builders = CASES
    with ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_case, tmp_path_factory.mktemp(name), build, tiny_model, instance_dir)
                   for name, build in builders.items()}
        return {name: future.result() for name, future in futures.items()}


def check_message(proc, words):
    assert proc.returncode not in (0, None), proc.stdout[-2000:]
    stderr = proc.stderr.replace("\r", "\n")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in stderr, stderr[-3000:]
    last = lines[-1]
    assert last.startswith(ERROR_PREFIX), f"last stderr line is not the error: {last!r}\n{stderr[-2000:]}"
    assert sum(ERROR_PREFIX in ln for ln in lines) == 1, stderr
    missing = [w for w in words if w not in last]
    assert not missing, f"error line lacks {missing}: {last!r}"
    assert not re.search(r"\b[A-Z][a-z]+[A-Za-z]*(Error|Exception)\b", last), f"a Python class name in {last!r}"


def check_nothing_written(watched):
    for path, before in watched.items():
        assert snapshot(path) == before, f"{path} was written or changed before the error: {before} -> " \
                                         f"{snapshot(path)}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, outcomes):
    proc, words, watched = outcomes[case]
    check_message(proc, words)
    check_nothing_written(watched)


def test_warnings_for_small_images_large_batches_and_shared_class_dirs(tiny_model, tmp_path, capsys):
    """Not errors, but worth a line each: upscaled photos, batches that repeat photos, and a class
    folder that already holds images generated for another class prompt."""
    import train_dreambooth
    from conftest import run_train

    small = make_images(tmp_path / "small", n=2, size=(32, 32))
    classes = tmp_path / "class"
    os.makedirs(classes)
    Image.new("RGB", (64, 64)).save(classes / train_dreambooth.class_image_name("a photo of cat", 0))
    run_train(*train_args(tiny_model, small, tmp_path / "out", "--train_batch_size", 3, "--max_train_steps", 1,
                          "--with_prior_preservation", "--class_prompt", CLASS_PROMPT, "--class_data_dir", classes,
                          "--num_class_images", 1))
    log = capsys.readouterr().out
    assert "2 image(s) smaller than 64x64 are upscaled" in log
    assert "--train_batch_size 3 is larger than the 2 instance images" in log
    assert "holds images generated for another class prompt" in log
