"""What a user meets around the trainer: a model that has to be downloaded, the benchmark and efficacy
scripts' output, run_multi.sh's device choice. (run_single.sh and run_multi.sh themselves run in a fresh
clone in test_readme.py, and run_single.sh from another folder in test_run_single.py.)"""
import argparse
import os
import sys

import pytest

from conftest import ROOT, run_cli, run_train, train_args


def test_a_model_not_on_disk_says_where_it_downloads_and_a_failed_download_is_one_line(
        instance_dir, tmp_path, capsys):
    import train_dreambooth
    from ppdiffusers.utils import constants

    model = "no-such-org/no-such-model"  # not a folder: a model id, which no server has
    with pytest.raises(train_dreambooth.DreamBoothError) as caught:
        run_train(*train_args(model, instance_dir, tmp_path / "out"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot download the model_index.json of {model} from"), message
    assert "--pretrained_model_name_or_path" in message and "licence" in message, message
    log = capsys.readouterr()
    said = [line for line in (log.out + log.err).splitlines() if "downloading it from" in line]
    assert len(said) == 1 and model in said[0] and constants.PPDIFFUSERS_CACHE in said[0], log.err[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_local_model_folder_is_not_announced_as_a_download(tiny_model, instance_dir, tmp_path, capsys):
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--max_train_steps", 1,
                          "--diagnostics_steps", 0))
    log = capsys.readouterr()
    assert "downloading" not in log.out + log.err


def bench_module(name):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_benchmark_writes_the_committed_results_only_when_asked(tmp_path):
    benchmark = bench_module("benchmark")
    work = str(tmp_path)
    ns = dict(results=None, quick=False, update_results=False)
    assert benchmark.results_file(argparse.Namespace(**ns), work) == os.path.join(work, "RESULTS.md")
    assert benchmark.results_file(argparse.Namespace(**dict(ns, quick=True)), work) is None
    assert benchmark.results_file(argparse.Namespace(**dict(ns, results="x.md")), work) == "x.md"
    assert benchmark.results_file(argparse.Namespace(**dict(ns, update_results=True)), work) == \
        os.path.join(ROOT, "bench", "RESULTS.md")


def test_efficacy_plots_into_its_work_folder_unless_asked(tmp_path):
    efficacy = bench_module("efficacy")
    out = str(tmp_path)
    ns = dict(out=out, plot=None, update_results=False)
    assert efficacy.plot_file(argparse.Namespace(**ns)) == os.path.join(out, "efficacy.png")
    assert efficacy.plot_file(argparse.Namespace(**dict(ns, update_results=True))) == \
        os.path.join(ROOT, "bench", "efficacy.png")


def venv_env():
    """Make the scripts use the venv running these tests, activated or not, and install nothing."""
    if sys.prefix != sys.base_prefix:
        return {"DREAMBOOTH_VENV": sys.prefix}
    return {"DREAMBOOTH_VENV": "none", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}


def test_dreambooth_venv_none_without_paddle_is_one_line(tmp_path):
    """DREAMBOOTH_VENV=none with a python that has no paddle: one line, before anything runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to("/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    env = {"DREAMBOOTH_VENV": "none", "PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": "", "PYTHONHOME": ""}
    probe = run_cli(["python", "-c", "import paddle"], env=env)
    if probe.returncode == 0:
        pytest.skip("the system python has paddle")
    proc = run_cli(["bash", os.path.join(ROOT, "run_single.sh")], env=dict(env, OUTPUT_DIR=str(tmp_path / "out")),
                   cwd=str(tmp_path))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "DREAMBOOTH_VENV=none" in proc.stderr and "no paddle" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_run_multi_with_gpus_on_a_cpu_only_machine_is_one_line(tiny_model, instance_dir, tmp_path):
    import paddle

    if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    env = dict(venv_env(), MODEL_NAME=tiny_model, INSTANCE_DIR=instance_dir, OUTPUT_DIR=str(out),
               LAUNCH_ARGS="--gpus 0,1")
    proc = run_cli(["bash", os.path.join(ROOT, "run_multi.sh")], env=env, cwd=str(tmp_path))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "LAUNCH_ARGS" in lines[0] and "GPU" in lines[0], proc.stderr
    assert not out.exists() and not (tmp_path / "log").exists()


def deliberate_bugs_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("deliberate_bugs", os.path.join(ROOT, "tools", "deliberate_bugs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_deliberate_bug_still_applies_and_its_tests_collect():
    """A refactor that moves a bug's snippet, or renames the tests meant to catch it, fails here instead of
    leaving tools/deliberate_bugs.py silently testing nothing."""
    proc = run_cli([sys.executable, os.path.join(ROOT, "tools", "deliberate_bugs.py"), "--check"])
    assert proc.returncode == 0, proc.stderr


def test_deliberate_bugs_check_names_each_stale_bug_on_one_line():
    import dataclasses

    bugs = deliberate_bugs_module()
    first, second, third = bugs.BUGS[:3]
    stale = [dataclasses.replace(first, original=first.original + "  # moved"),
             second,
             dataclasses.replace(third, tests=[third.tests[0], "-k", "no_such_test_name"])]
    problems = bugs.check(stale)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{first.name}: its snippet no longer occurs in {first.file}"), problems
    assert problems[1].startswith(f"{third.name}: its tests") and "collects no test" in problems[1], problems


def test_deliberate_bugs_report_updates_only_the_rows_run(tmp_path):
    """--only NAME --write: the named rows get the new result and date, the others keep theirs, a bug
    whose tests changed since, or never run, says "not run", a bug no longer in the script is dropped, and
    the summary counts only what ran."""
    bugs = deliberate_bugs_module()
    a, b, c, d = bugs.BUGS[:4]
    report = tmp_path / "report.md"
    # An earlier report in the old layout (no date column): rows for a, for c with other tests, for a bug since removed
    report.write_text("Generated by `python tools/deliberate_bugs.py --write` on 2026-01-02 03:04 UTC. ...\n\n"
                      "| bug | what it breaks | tests run | caught? | seconds |\n|---|---|---|---|---|\n"
                      f"| `removed_bug` | gone | `tests/x.py` | caught | 5 |\n"
                      f"| `{c.name}` | {c.what} | `tests/other.py -k x` | caught | 7 |\n"
                      f"| `{a.name}` | {a.what} | `{a.selection()}` | caught | 12 |\n")
    earlier = bugs.read_report(str(report))
    assert earlier[a.name] == (a.selection(), "caught", "12", "2026-01-02 03:04 UTC")
    rows = bugs.report_rows([a, b, c, d], {b.name: ("NOT CAUGHT", "9", "2026-02-03 04:05 UTC")}, earlier)
    text = bugs.markdown(rows)
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert table == [f"| `{a.name}` | {a.what} | `{a.selection()}` | caught | 12 | 2026-01-02 03:04 UTC |",
                     f"| `{b.name}` | {b.what} | `{b.selection()}` | NOT CAUGHT | 9 | 2026-02-03 04:05 UTC |",
                     f"| `{c.name}` | {c.what} | `{c.selection()}` | not run |  |  |",
                     f"| `{d.name}` | {d.what} | `{d.selection()}` | not run |  |  |"]
    assert "1 of 2 run bugs caught; 2 not run." in text
    # The new layout reads back as written
    report.write_text(text)
    again = bugs.read_report(str(report))
    assert again[b.name] == (b.selection(), "NOT CAUGHT", "9", "2026-02-03 04:05 UTC") and c.name not in again
    assert "2 of 2 bugs caught." in bugs.markdown(bugs.report_rows([a, b], {b.name: ("caught", "9", "x")}, earlier))
