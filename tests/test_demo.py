"""The README's two commands and the demo they start."""
import os
import re

from PIL import Image

from conftest import ROOT, run_cli


def readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_starts_with_the_demo_and_the_test_command_and_both_exist():
    commands = readme_commands()
    assert commands[:2] == ["bash run_demo.sh", "bash run_tests.sh"]
    for command in commands[:2]:
        script = os.path.join(ROOT, command.split()[1])
        assert os.access(script, os.X_OK), f"{script} is not executable"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "bash run_tests.sh" in f.read(), ".ci/run must run the README's test command"


def test_the_demo_trains_from_the_shipped_base_and_writes_the_before_after_grid(tmp_path):
    """The demo exactly as README runs it, with fewer steps and class images."""
    demo = tmp_path / "demo"
    result = run_cli(["bash", "run_demo.sh"], env={"DEMO_DIR": str(demo), "DEMO_STEPS": "6",
                                                   "DEMO_CLASS_IMAGES": "3"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    grid = Image.open(demo / "samples_grid.png")
    # three labelled rows of 4 base-model and 4 trained 64x64 samples
    assert grid.width >= 8 * 64 and 3 * 64 < grid.height < 4 * 64 + 60
    assert len(os.listdir(demo / "class_images")) == 3
    assert os.path.samefile(demo / "base-model", os.path.join(ROOT, "models", "drawn-world"))
    from ppdiffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(demo / "dreambooth-model")
    for prefix in ("base_", ""):  # the single images of both models, same seeds
        for i in range(4):
            assert os.path.isfile(demo / f"samples_grid_{prefix}a_photo_of_sks_toy_on_the_beach_{i}.png")
    assert str(demo / "samples_grid.png") in result.stdout
