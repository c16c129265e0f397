"""README.md's code blocks, run in order in a fresh clone on the tiny model, as a new user runs them.

Every ```bash and ```python block runs, in one shell, from the clone's root, with no environment
activated (the blocks activate .venv where the README says so), unless the line before it says
  <!-- readme-test: skip (why) -->            not run (a GPU install, two machines, the test suite itself)
  <!-- readme-test: no-gpu-error -->          on a machine without a GPU it must stop with a one-line error.
The only changes are the SUBSTITUTIONS below: tiny models for the model ids, and small sizes and step counts.
The clone's .venv is the venv running these tests, so nothing is installed.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
MARKER = re.compile(r"<!-- readme-test: (skip|no-gpu-error)\b[^>]*-->")
# Tiny model, 64x64, 2 updates, a checkpoint per update, validation and diagnostics on the way, 2 class images.
SHRINK = ("--height=64 --width=64 --max_train_steps=2 --save_steps=1 --seed=0 --validation_steps=2 "
          "--num_validation_images=1 --validation_num_inference_steps=2 --diagnostics_steps=1 "
          "--num_class_images=2 --class_inference_steps=2 --sample_batch_size=2")
SUBSTITUTIONS = [  # (pattern, replacement); each must match at least once, so none goes stale unnoticed
    (r"CompVis/stable-diffusion-v1-4", "{model}"),
    (r"bash run_single\.sh", "bash run_single.sh " + SHRINK),
    (r"bash run_multi\.sh", "bash run_multi.sh " + SHRINK),
    (r"--height=512", "--height=64"),
    (r"--width=512", "--width=64"),
    (r"--max_train_steps=400", "--max_train_steps=2 --diagnostics_steps=1"),
    (r"stabilityai/stable-diffusion-xl-base-1\.0", "{sdxl}"),
    (r"madebyollin/sdxl-vae-fp16-fix", "{sdxl}/vae"),  # a VAE folder, as the fixed VAE's id is
    (r"--height 1024 --width 1024", "--height 64 --width 64"),
    # the pipelines' default 50 sampling steps: what the generated image shows is not checked here
    (r"""(\(["']a photo of sks dog [^"']*["'])\)\.images""", r"\1, num_inference_steps=2).images"),
]


def readme_blocks(path=README):
    """[(kind, language, code, line)] of the fenced code blocks; kind is run, skip or no-gpu-error."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        blocks.append((marker.group(1) if marker else "run", m.group(1), m.group(2),
                       text.count("\n", 0, m.start()) + 1))
    return blocks


def substituted(code, models, used):
    """models: {"model": the tiny SD, "sdxl": the tiny SDXL}."""
    for i, (pattern, replacement) in enumerate(SUBSTITUTIONS):
        code, n = re.subn(pattern, replacement.format(**models), code)
        used[i] += n
    return code


def script_of(blocks, models, scratch):
    """One bash script running the blocks in order; returns (script, {block line: stderr file of a
    no-gpu-error block})."""
    used, lines, errors = [0] * len(SUBSTITUTIONS), ["set -euo pipefail"], {}
    for kind, language, code, line in blocks:
        if kind == "skip" or language not in ("bash", "python"):
            continue
        code = substituted(code, models, used)
        lines.append(f'echo "@@ README.md line {line}"')
        if language == "python":
            code = f"python - <<'README_PYTHON'\n{code}README_PYTHON\n"
        if kind == "no-gpu-error":
            errors[line] = os.path.join(scratch, f"no-gpu-error-{line}.txt")
            code = f'if ( {code.strip()} ) 2> "{errors[line]}"; then echo "ran without a GPU" >&2; exit 1; fi\n'
        lines.append(code)
    unused = [SUBSTITUTIONS[i][0] for i, n in enumerate(used) if n == 0]
    assert not unused, f"substitutions that no README block needs any more: {unused}"
    return "\n".join(lines), errors


def git(*args, cwd=ROOT):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def fresh_clone(dest):
    """A clone of this checkout as it is now: its committed files, uncommitted changes (git stash create)
    and new files not yet added (so that the test checks the code being worked on)."""
    commit = git("stash", "create").strip() or git("rev-parse", "HEAD").strip()
    git("clone", "-q", "--shared", "--no-checkout", ROOT, str(dest))
    git("checkout", "-q", commit, cwd=dest)
    for name in git("ls-files", "--others", "--exclude-standard", "-z").split("\0"):
        if name:
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            with open(os.path.join(ROOT, name), "rb") as src, open(os.path.join(dest, name), "wb") as dst:
                dst.write(src.read())
    return str(dest)


def has_gpu():
    import paddle

    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


@pytest.fixture(scope="module")
def readme_run(tiny_model, tiny_sdxl, tmp_path_factory):
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's `source .venv/bin/activate` needs the tests to run in a venv (run_tests.sh's)")
    try:
        git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the README's commands run in a fresh clone of one")
    clone = fresh_clone(tmp_path_factory.mktemp("readme") / "clone")
    with open(os.path.join(clone, "requirements.txt"), "rb") as f, \
            open(os.path.join(sys.prefix, ".requirements.installed"), "rb") as g:
        if f.read() != g.read():
            pytest.skip(f"{sys.prefix} was not installed from this requirements.txt: the scripts would install")
    os.symlink(sys.prefix, os.path.join(clone, ".venv"))
    status_before = git("status", "--porcelain", cwd=clone)
    scratch = str(tmp_path_factory.mktemp("readme_scratch"))
    script, errors = script_of(readme_blocks(), dict(model=tiny_model, sdxl=tiny_sdxl), scratch)
    # A new user's shell: no venv active, no python of ours on PATH, no DREAMBOOTH_VENV.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DREAMBOOTH_VENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(sys.prefix) and p != os.path.dirname(sys.executable))
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=1200)
    return dict(proc=proc, clone=clone, errors=errors, status_before=status_before)


def test_every_readme_block_runs_in_order_in_a_fresh_clone(readme_run):
    proc = readme_run["proc"]
    ran = re.findall(r"@@ (README.md line \d+)", proc.stdout)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "it/s]" not in line and "s/it]" not in line)
    assert proc.returncode == 0, f"failed in the block at {ran[-1] if ran else '?'}:\n" + errors[-4000:]
    runnable = [b for b in readme_blocks() if b[0] != "skip" and b[1] in ("bash", "python")]
    assert len(ran) == len(runnable) >= 10, ran


def test_the_readme_leaves_the_checkout_clean(readme_run):
    assert readme_run["proc"].returncode == 0, readme_run["proc"].stderr[-3000:]
    assert git("status", "--porcelain", cwd=readme_run["clone"]) == readme_run["status_before"]


def test_a_gpu_launch_without_a_gpu_is_one_line_and_writes_nothing(readme_run):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    assert readme_run["errors"], "the README shows no GPU-only line"
    for line, path in readme_run["errors"].items():
        with open(path) as f:
            err = f.read().strip().splitlines()
        assert len(err) == 1 and "GPU" in err[0] and "Traceback" not in err[0], (line, err)
    assert not os.path.exists(os.path.join(readme_run["clone"], "my_model_4gpus"))


def test_what_the_readme_says_is_there_is_there(readme_run):
    """The files the README points the user at, in the folders its blocks wrote."""
    assert readme_run["proc"].returncode == 0, readme_run["proc"].stderr[-3000:]
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    clone = readme_run["clone"]
    for said, path in [("my_model/validation/step-<update>.png", "my_model/validation/step-000002.png"),
                       ("my_model/diagnostics.png", "my_model/diagnostics.png"),
                       ("<output_dir>/launch_logs/workerlog.<local rank>", "my_model_2procs/launch_logs/workerlog.0"),
                       ("<output_dir>/launch_logs/workerlog.<local rank>", "my_model_2procs/launch_logs/workerlog.1"),
                       ("my_lora_te/my_lora_te.safetensors", "my_lora_te/my_lora_te.safetensors"),
                       ("checkpoint-200/", "my_model/checkpoint-2/training_state.json")]:
        assert said in readme, said
        assert os.path.isfile(os.path.join(clone, path)), (path, sorted(os.listdir(os.path.dirname(
            os.path.join(clone, path))) if os.path.isdir(os.path.dirname(os.path.join(clone, path))) else []))
    assert os.path.isdir(os.path.join(clone, "class_images", "dog"))
    assert os.path.isfile(os.path.join(clone, "sdxl_lora", "paddle_lora_weights.safetensors"))  # the SDXL LoRA
    assert not os.path.exists(os.path.join(clone, "log")), "the launcher's logs belong in the output folder"


def test_exported_and_saved_weights_get_the_usual_file_mode(readme_run):
    """safetensors writes 0600; a file for another account's WebUI needs what the umask gives (0644)."""
    assert readme_run["proc"].returncode == 0, readme_run["proc"].stderr[-3000:]
    mask = os.umask(0)
    os.umask(mask)
    clone = readme_run["clone"]
    for path in ["my_lora_te/my_lora_te.safetensors", "my_lora_te/paddle_lora_weights.safetensors",
                 "my_lora_te/text_encoder_lora_weights.safetensors", "my_model/unet/diffusion_paddle_model.safetensors",
                 "my_model/checkpoint-1/unet/diffusion_paddle_model.safetensors"]:
        mode = os.stat(os.path.join(clone, path)).st_mode & 0o777
        assert mode == 0o666 & ~mask, f"{path}: {oct(mode)}"


def test_the_text_encoder_lora_snippet_equals_the_trainers_loader(readme_run, tiny_model, monkeypatch):
    """The README's self-contained snippet loads what train_dreambooth.load_lora loads, and the
    text encoder it gives differs from the base one (the adapters arrived)."""
    import paddle
    from ppdiffusers import StableDiffusionPipeline

    from train_dreambooth import load_lora

    assert readme_run["proc"].returncode == 0, readme_run["proc"].stderr[-3000:]
    snippet = [code for kind, language, code, _ in readme_blocks()
               if language == "python" and "text_encoder_lora_weights.safetensors" in code]
    assert len(snippet) == 1
    code = substituted(snippet[0], dict(model=tiny_model, sdxl=None), [0] * len(SUBSTITUTIONS))
    code = "\n".join(line for line in code.splitlines() if not line.startswith("pipe(\""))  # no sampling
    monkeypatch.chdir(readme_run["clone"])
    namespace = {}
    exec(code, namespace)  # noqa: S102 - the README's own code
    ours = load_lora(StableDiffusionPipeline.from_pretrained(tiny_model), "my_lora_te")
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    ids = paddle.to_tensor([base.tokenizer("a photo of sks dog", padding="max_length",
                                           max_length=base.tokenizer.model_max_length)["input_ids"]])
    with paddle.no_grad():
        snippet_out, ours_out, base_out = (p.text_encoder(ids)[0].numpy() for p in (namespace["pipe"], ours, base))
    assert np.array_equal(snippet_out, ours_out), f"differs from load_lora by {np.abs(snippet_out - ours_out).max()}"
    assert np.abs(snippet_out - base_out).max() > 1e-6, "the text encoder's adapters changed nothing"
