import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("PYTHONWARNINGS", "ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
# Adam's first step moves every weight by ~lr*sign(g), which turns float noise in gradients that are
# zero in exact arithmetic (a conv bias feeding a GroupNorm) into full-size steps. With a large
# epsilon the update is ~lr*g, so comparing weights compares the gradients themselves.
GRADIENT_LIKE = ["--learning_rate", 0.1, "--adam_epsilon", 1.0]


@pytest.fixture(scope="session", autouse=True)
def mkl_code_path_as_the_trainer_chooses():
    """MKL picks its code once, at its first call in a process, and on an AMD processor the trainer
    asks it for its AVX2 code (choose_mkl_code_path) before any Paddle op. A training subprocess
    always gets that choice; a run in this process (run_train) only if no fixture ran a Paddle op
    first. Runs compared with each other (killed in a subprocess, resumed here) must compute the
    same way, so this process makes the choice before any test, and keeps it out of the environment its
    subprocesses inherit (they make it themselves, as a user's run does). A fixture, not an import-time
    call: collecting tests (tools/deliberate_bugs.py --check does it per bug) stays free of Paddle."""
    import train_dreambooth

    if train_dreambooth.choose_mkl_code_path():
        import paddle

        paddle.matmul(paddle.ones([8, 8]), paddle.ones([8, 8]))  # MKL's first call: it reads the variable
        os.environ.pop("MKL_DEBUG_CPU_TYPE")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SD pipeline folder, built once per test session."""
    from tiny_sd import save_tiny_pipeline

    out = str(tmp_path_factory.mktemp("tiny_model"))
    save_tiny_pipeline(out)
    return out


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """A tiny random SD 2.x-like pipeline folder (tiny_sd.py --family sd2), built once per test session."""
    from tiny_sd import save_tiny_pipeline

    out = str(tmp_path_factory.mktemp("tiny_sd2"))
    save_tiny_pipeline(out, family="sd2")
    return out


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL pipeline folder (tiny_sd.py --family sdxl), built once per test session."""
    from tiny_sd import save_tiny_sdxl_pipeline

    out = str(tmp_path_factory.mktemp("tiny_sdxl"))
    save_tiny_sdxl_pipeline(out)
    return out


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny random SD3 pipeline folder (tiny_sd.py --family sd3), built once per test session.
    Building it runs no attention; what runs the models installs the attention fallback itself."""
    from tiny_sd import save_tiny_sd3_pipeline

    out = str(tmp_path_factory.mktemp("tiny_sd3"))
    save_tiny_sd3_pipeline(out)
    return out


@pytest.fixture(autouse=True)
def no_leaked_attention_fallback():
    """SD3 runs install family_sd3.plain_attention as paddle.nn.functional.scaled_dot_product_attention_
    for the rest of the process (what a user's run needs). In a test session that would reach every
    later test; this puts back what was there before the test (ppdiffusers' own kernel, or nothing),
    so no test depends on which SD3 tests ran before it."""
    name = "scaled_dot_product_attention_"
    functional = sys.modules.get("paddle.nn.functional")
    before = getattr(functional, name, None)
    yield
    functional = sys.modules.get("paddle.nn.functional")
    family_sd3 = sys.modules.get("family_sd3")
    if functional is None or family_sd3 is None or getattr(functional, name, None) is not family_sd3.plain_attention:
        return
    if before is None:
        delattr(functional, name)
    else:
        setattr(functional, name, before)


def make_images(folder, n=4, size=(72, 64), seed=0, ext="png"):
    """n random RGB images of size (width, height) in folder; returns the folder."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.{ext}"))
    return str(folder)


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("instance"), n=4)


def train_args(model, instance, output, *extra):
    """The seed's command line shrunk to the tiny model: 64x64, a few steps.

    A flag in `extra` replaces the default one; followed by None it removes it."""
    defaults = {"--pretrained_model_name_or_path": model, "--instance_data_dir": instance, "--output_dir": output,
                "--instance_prompt": PROMPT, "--resolution": 64, "--train_batch_size": 1, "--learning_rate": 1e-3,
                "--lr_scheduler": "constant", "--lr_warmup_steps": 0, "--max_train_steps": 2, "--seed": 0}
    extra = list(extra)
    for flag in [e for e in extra if isinstance(e, str) and e in defaults]:
        del defaults[flag]
    argv = [str(x) for kv in defaults.items() for x in kv]
    for i, e in enumerate(extra):
        if e is None or (i + 1 < len(extra) and extra[i + 1] is None):
            continue
        argv.append(str(e))
    return argv


def run_train(*argv):
    """Run the trainer in this process (no import cost); DreamBoothError propagates."""
    import train_dreambooth

    return train_dreambooth.main(train_dreambooth.parse_args([str(a) for a in argv]))


def run_cli(args, env=None, cwd=ROOT, timeout=600):
    """Run a command as a user would; returns CompletedProcess with text output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


# The 2-process SD run several tests share (two_process_run): what trains, and what it measures on the way.
TWO_PROCESS_TRAINING = ["--max_train_steps", 2, *GRADIENT_LIKE]


@pytest.fixture(scope="session")
def two_process_run(tiny_model, instance_dir, tmp_path_factory):
    """One run on 2 processes (paddle.distributed.launch, batch 1 each) with diagnostics after every update:
    test_numerics compares its weights with one process, test_diagnostics its diagnostics rows (one launch
    for both: its start-up is most of its time). Returns (output folder, the ranks' logs)."""
    root = tmp_path_factory.mktemp("two_processes")
    argv = train_args(tiny_model, instance_dir, root / "out", *TWO_PROCESS_TRAINING, "--class_prompt", CLASS_PROMPT,
                      "--diagnostics_steps", 1)
    result = run_cli([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                      str(root / "log"), "train_dreambooth.py", *argv])
    logs = "".join(open(root / "log" / f).read() for f in sorted(os.listdir(root / "log")) if "workerlog" in f)
    assert result.returncode == 0, logs[-3000:]
    return root / "out", logs


def load_weights(folder, component="unet"):
    """A component's weights as numpy arrays, read straight from the safetensors file."""
    from safetensors.numpy import load_file

    sub = os.path.join(folder, component)
    files = [f for f in os.listdir(sub) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    return load_file(os.path.join(sub, files[0]))


def assert_same_weights(a, b, atol, components=("unet",)):
    """The components (by default the UNet) saved in two pipeline folders agree to atol."""
    for component in components:
        wa, wb = load_weights(a, component), load_weights(b, component)
        assert wa.keys() == wb.keys()
        worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
        assert worst <= atol, f"{component}: largest weight difference {worst}"


def logged_scalars(output_dir, tag, logging_dir="logs"):
    """{step: value} of a scalar the trainer logged to VisualDL under output_dir/logging_dir."""
    from visualdl import LogReader

    folder = os.path.join(output_dir, logging_dir)
    values = {}
    for name in sorted(os.listdir(folder)):
        reader = LogReader(file_path=os.path.join(folder, name))
        if tag in reader.get_tags().get("scalar", []):
            values.update({r.id: r.value for r in reader.get_data("scalar", tag)})
    return values
