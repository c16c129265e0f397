"""Check the GPU-only paths on a machine that has a GPU: one command, one table to send back.

    bash tools/gpu_check.sh                 # every combination the machine can run
    bash tools/gpu_check.sh --only fp16     # runs whose name contains "fp16"
    bash tools/gpu_check.sh --cpu_smoke     # this script's own logic on a CPU (precision "no" only)

On a tiny model built locally (no download), for fp16 and bf16 x full fine-tune and LoRA x one and
two GPUs x memory-efficient attention on (ppdiffusers' default where the build has it) and off
(USE_PPXFORMERS=0), it trains 4 updates and checks:
- loads: the output loads into the family's pipeline (LoRA: onto the base) and samples finite images;
- peak: the peak GPU memory the trainer reports;
- resume: the largest weight difference between 4 uninterrupted updates and 2 + a resume to 4
  (GPU kernels are not bit-reproducible, so small differences are expected; large ones are a bug).
Nothing here runs in CI: CI has no GPU. The table is printed and written to gpu_check.md in --work_dir.
"""
import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SAMPLE_CODE = """
import sys, numpy as np, paddle
from ppdiffusers import StableDiffusionPipeline
sys.path.insert(0, {root!r})
model, output, lora = sys.argv[1:4]
pipe = StableDiffusionPipeline.from_pretrained(output if lora == "0" else model, safety_checker=None,
                                               requires_safety_checker=False)
if lora == "1":
    from train_dreambooth import load_lora
    load_lora(pipe, output)
pipe.set_progress_bar_config(disable=True)
images = pipe("a photo of sks toy", height=64, width=64, num_inference_steps=3, output_type="np",
              generator=paddle.Generator().manual_seed(0)).images
assert np.isfinite(images).all(), "non-finite pixels"
print("SAMPLED", images.shape)
"""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--only", default=None, help="run only the combinations whose name contains this")
    p.add_argument("--cpu_smoke", action="store_true",
                   help="check this script on a CPU: precision no, full on 1 process and LoRA on 2")
    return p.parse_args()


def combinations(gpus, cpu_smoke):
    if cpu_smoke:
        return [dict(precision="no", mode=mode, procs=procs, attention="plain") for mode, procs in (("full", 1),
                                                                                                   ("lora", 2))]
    runs = []
    for precision, mode, procs, attention in itertools.product(("fp16", "bf16"), ("full", "lora"), (1, 2),
                                                               ("efficient", "plain")):
        if procs <= gpus:
            runs.append(dict(precision=precision, mode=mode, procs=procs, attention=attention))
    return runs


def name_of(run):
    return f"{run['precision']}-{run['mode']}-{run['procs']}gpu-{run['attention']}"


def train(run, model, instance_dir, out, steps, cpu_smoke, extra=()):
    argv = ["train_dreambooth.py", "--pretrained_model_name_or_path", model, "--instance_data_dir", instance_dir,
            "--instance_prompt", "a photo of sks toy", "--output_dir", out, "--resolution", "64",
            "--train_batch_size", "1", "--learning_rate", "1e-4", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--max_train_steps", str(steps), "--save_steps", "2", "--seed", "0",
            "--diagnostics_steps", "0", "--mixed_precision", run["precision"], *extra]
    if run["mode"] == "lora":
        argv.append("--use_lora")
    if run["procs"] > 1:
        launch = [sys.executable, "-m", "paddle.distributed.launch", "--log_dir", out + "-launch-logs"]
        launch += ["--nproc_per_node", str(run["procs"])] if cpu_smoke else \
            ["--gpus", ",".join(map(str, range(run["procs"])))]
        command = launch + argv
    else:
        command = [sys.executable] + argv
    env = dict(os.environ)
    if run["attention"] == "plain":
        env["USE_PPXFORMERS"] = "0"
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if os.path.isdir(out + "-launch-logs"):
        log += "".join(open(os.path.join(out + "-launch-logs", f), errors="replace").read()
                       for f in sorted(os.listdir(out + "-launch-logs")))
    return done.returncode, log, time.time() - started


def trained_weights(out, lora):
    from safetensors.numpy import load_file

    if lora:
        return load_file(os.path.join(out, "paddle_lora_weights.safetensors"))
    folder = os.path.join(out, "unet")
    return load_file(os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".safetensors"))))


def check(run, model, instance_dir, work, cpu_smoke):
    row = dict(name=name_of(run), loads="-", peak="-", resume="-", seconds=0.0, note="")
    out = os.path.join(work, row["name"])
    code, log, seconds = train(run, model, instance_dir, out, 4, cpu_smoke)
    row["seconds"] = seconds
    if code:
        lines = [ln for ln in log.splitlines() if "error" in ln.lower()] or log.splitlines()[-1:]
        row["note"] = f"training failed: {lines[-1][:120] if lines else code}"
        return row
    peaks = re.findall(r"Peak GPU memory allocated: (\d+) MiB", log)
    row["peak"] = f"{max(map(int, peaks))} MiB" if peaks else "-"
    sampled = subprocess.run([sys.executable, "-c", SAMPLE_CODE.format(root=ROOT), model, out,
                              "1" if run["mode"] == "lora" else "0"], cwd=ROOT, capture_output=True, text=True)
    row["loads"] = "yes" if "SAMPLED" in sampled.stdout else "NO"
    if row["loads"] == "NO":
        row["note"] = (sampled.stderr.strip().splitlines() or ["?"])[-1][:120]
    resumed = out + "-resumed"
    code, log, _ = train(run, model, instance_dir, resumed, 2, cpu_smoke)
    if not code:
        code, log, _ = train(run, model, instance_dir, resumed, 4, cpu_smoke,
                             ["--resume_from_checkpoint", "latest"])
    if code:
        row["note"] = (row["note"] + "; " if row["note"] else "") + "resume failed"
        return row
    a, b = trained_weights(out, run["mode"] == "lora"), trained_weights(resumed, run["mode"] == "lora")
    row["resume"] = f"{max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a):.2e}"
    return row


def main():
    args = parse_args()
    import paddle

    gpus = paddle.device.cuda.device_count() if paddle.device.is_compiled_with_cuda() else 0
    if not gpus and not args.cpu_smoke:
        sys.exit("gpu_check: this Paddle sees no GPU (install paddlepaddle-gpu and check nvidia-smi); "
                 "--cpu_smoke checks the script itself on a CPU")
    work = args.work_dir or tempfile.mkdtemp(prefix="gpu_check-")
    os.makedirs(work, exist_ok=True)
    from tiny_sd import save_tiny_pipeline

    model = os.path.join(work, "tiny-sd")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        save_tiny_pipeline(model)
    instance_dir = os.path.join(ROOT, "examples", "sks_toy")
    runs = [r for r in combinations(gpus, args.cpu_smoke) if not args.only or args.only in name_of(r)]
    header = ["run", "loads and samples", "peak GPU memory", "resume: max weight difference", "seconds", "note"]
    lines = [f"GPU check: {paddle.__version__}, {gpus} GPU(s)"
             + (f", {paddle.device.cuda.get_device_name()}" if gpus else " (CPU smoke run)"),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print("\n".join(lines), flush=True)
    for run in runs:
        row = check(run, model, instance_dir, work, args.cpu_smoke)
        line = f"| {row['name']} | {row['loads']} | {row['peak']} | {row['resume']} | {row['seconds']:.0f} | {row['note']} |"
        lines.append(line)
        print(line, flush=True)
    with open(os.path.join(work, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nTable written to {os.path.join(work, 'gpu_check.md')}; the run folders and their logs are beside it.")
    if not args.work_dir:
        shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
