"""How far is the trainer from the floor? Seconds per optimizer update, peak RSS and wall time.

    python bench/benchmark.py                 # full: "small" model, 128x128; table in bench/out/benchmark
    python bench/benchmark.py --update_results   # the same, written into bench/RESULTS.md
    python bench/benchmark.py --quick         # tiny model, 3 updates, plain + floor (run by the tests)
    python bench/benchmark.py --family sdxl   # the same for SDXL: full and --use_lora, each against its floor;
                                              # table in bench/out/benchmark-sdxl

With --family sdxl the model is tiny_sd.py's small SDXL (two text encoders, "text_time" added
conditioning); the variants are the full fine-tune and --use_lora, whose floor trains the same LoRA
adapters on the frozen UNet, and --compare_script is PaddleMIX's train_dreambooth_lora_sdxl.py on the
LoRA variant. That script logs nothing this environment can read (its VisualDL tracker fails on boolean
hyperparameters), so its period is timed from its "Steps" progress bar: the moment each step count
first appears on its output.

Builds the benchmark's "small" SD-shaped model with tiny_sd.py (35 M UNet parameters), then runs
train_dreambooth.py as a user runs it (a subprocess, batch 1, OMP_NUM_THREADS fixed, default 1)
for several variants, and in the same run the FLOOR: the same UNet forward + backward + AdamW
update on tensors of the same shapes and nothing else, in a subprocess with the same threads.

Per variant: the median of the trainer's own `train/update_seconds` scalar over the updates
after --warmup, the median period between consecutive updates (VisualDL timestamps: everything
the loop does, logging included), the median and minimum process CPU seconds per update
(`train/update_cpu_seconds`: on a shared machine other load only adds, so the minimum is the
steadiest figure), the peak RSS of the whole process tree (psutil polling) and the end-to-end
wall time of the command (start-up, caching and saving included). The floor runs right before
each variant, so both see the same load.
Also measures class-image generation (images/s, --class_rounds rounds): the trainer's default sampler against 50 PNDM
steps at equal batch size (with --compare_script: that script's own generation, timed by its progress
bar). On AMD processors the trainer makes MKL run its AVX2 code (train_dreambooth.choose_mkl_code_path), and
the floor does the same; there the benchmark also measures the floor once per batch on MKL's own code path, and
runs --compare_script both as its users run it and with MKL_DEBUG_CPU_TYPE=5, the trainer's kernels.
--repeats N measures every variant N times, alternating, and adds the median of each ratio over
the repeats: this machine's speed drifts by 10-20% within minutes, so one run's ratio can land on
either side of a target. Writes the table into RESULTS.md in the --work folder (--results FILE elsewhere; --quick writes
none unless asked); --update_results writes it between the markers of the committed bench/RESULTS.md.
"""
import argparse
import json
import os
import platform
import re
import statistics
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from train_dreambooth import choose_mkl_code_path  # noqa: E402
SUBJECT_DIR = os.path.join(ROOT, "examples", "sks_toy")
PROMPT, CLASS_PROMPT = "a photo of sks toy", "a photo of toy"
LORA_RANK = 4
# name -> (extra trainer flags, floor batch it compares to, processes)
VARIANTS = {
    "plain": ([], 1, 1),
    "prior preservation": (["--with_prior_preservation"], 2, 1),
    "gradient checkpointing": (["--gradient_checkpointing"], 1, 1),
    "text encoder trained": (["--train_text_encoder"], 1, 1),
    "2 processes": ([], 1, 2),
}
SDXL_VARIANTS = {
    "full": ([], 1, 1),
    "LoRA": (["--use_lora", "--lora_rank", str(LORA_RANK)], 1, 1),
}
# Per family: its variants; the ones --compare_script runs, with that script's own flags for them; the
# flags it gets beyond the common ones; the results markers; the model (size, resolution); --quick's.
FAMILIES = {
    "sd": dict(variants=VARIANTS, compared={"plain": [], "prior preservation": ["--with_prior_preservation"]},
               compare_only=["--noise_offset", "0", "--max_grad_norm", "0", "--report_to", "visualdl"],
               markers=("<!-- benchmark:begin -->", "<!-- benchmark:end -->"), model=("small", 128),
               quick=("tiny", 64, "plain")),
    "sdxl": dict(variants=SDXL_VARIANTS, compared={"LoRA": ["--rank", str(LORA_RANK)]},
                 compare_only=["--max_grad_norm", "0"],
                 markers=("<!-- benchmark-sdxl:begin -->", "<!-- benchmark-sdxl:end -->"), model=("small", 128),
                 quick=("tiny", 64, "full,LoRA")),
}


# ----------------------------------------------------------------------------------------------
# The floor: UNet forward + backward + AdamW, nothing else (run as `benchmark.py --floor ...`)


def floor_inputs(unet, model, batch, height, width, rng):
    """Random tensors of the shapes the trainer feeds the UNet: noisy latents, timesteps, the text
    conditioning (for SDXL also the pooled prompt and the six size/crop numbers) and the target."""
    import numpy as np
    import paddle
    from ppdiffusers.transformers import PretrainedConfig

    def normal(*shape):
        return paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32))

    text, _ = PretrainedConfig.get_config_dict(model, subfolder="text_encoder")
    vae, _ = PretrainedConfig.get_config_dict(model, subfolder="vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    latent = (batch, vae.get("latent_channels", 4), height // factor, width // factor)
    inputs = dict(noisy=normal(*latent), target=normal(*latent),
                  timesteps=paddle.to_tensor(rng.integers(0, 1000, batch), dtype="int64"),
                  states=normal(batch, text["max_position_embeddings"], unet.config.cross_attention_dim))
    if unet.config.addition_embed_type == "text_time":  # SDXL
        pooled, _ = PretrainedConfig.get_config_dict(model, subfolder="text_encoder_2")
        inputs["text_embeds"] = normal(batch, pooled["projection_dim"])
        inputs["time_ids"] = paddle.to_tensor([[height, width, 0, 0, height, width]] * batch, dtype="float32")
    return inputs


def floor_loss(unet, inputs):
    """One update's loss and nothing else: the UNet's prediction against the target, mean squared."""
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs}
    pred = unet(inputs["noisy"], inputs["timesteps"], inputs["states"],
                **({"added_cond_kwargs": added} if added else {})).sample
    return ((pred - inputs["target"]) ** 2).mean()


def floor_lora(unet, rank):
    """Freeze the UNet and give q, k, v and out of every attention layer a LoRA of this rank (what
    `--use_lora` trains); returns the trainable parameters."""
    from ppdiffusers.models.attention_processor import Attention
    from ppdiffusers.models.lora import LoRALinearLayer

    for p in unet.parameters():
        p.stop_gradient = True
    for layer in unet.sublayers():
        if isinstance(layer, Attention):
            for linear in (layer.to_q, layer.to_k, layer.to_v, layer.to_out[0]):
                linear.set_lora_layer(LoRALinearLayer(linear.weight.shape[0], linear.weight.shape[1], rank=rank))
    return [p for p in unet.parameters() if not p.stop_gradient]


def floor(model, batch, height, width, steps, warmup, lora_rank=0):
    choose_mkl_code_path()  # the trainer's CPU kernels, unless MKL_DEBUG_CPU_TYPE says otherwise
    import numpy as np
    import paddle
    from ppdiffusers import UNet2DConditionModel

    paddle.seed(0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.train()
    trained = floor_lora(unet, lora_rank) if lora_rank else unet.parameters()
    inputs = floor_inputs(unet, model, batch, height, width, np.random.default_rng(0))
    optimizer = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=trained, weight_decay=0.02)
    seconds, cpu = [], []
    for _ in range(warmup + steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = floor_loss(unet, inputs)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        float(loss)  # the update is finished when its loss is known
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    print(json.dumps(dict(batch=batch, median=statistics.median(seconds[warmup:]),
                          cpu_median=statistics.median(cpu[warmup:]), cpu_min=min(cpu[warmup:]), seconds=seconds,
                          cpu=cpu)))


# ----------------------------------------------------------------------------------------------
# Running and measuring a command


def with_kernels(env, kernels):
    """env plus the assignment a kernels label shows ("MKL_DEBUG_CPU_TYPE=5"; "" adds nothing). The trainer
    (and the floor, which calls the same function) makes MKL use its AVX2 code on AMD processors; an empty
    MKL_DEBUG_CPU_TYPE keeps MKL's own choice, which is what a bare Paddle loop or another script gets."""
    return dict(env, **dict([kernels.split("=", 1)])) if kernels else env


def child_env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore",
                PYTHONUNBUFFERED="1")


def run(cmd, env, log_path, cwd=ROOT, stamps=None):
    """(exit code, wall seconds, peak RSS of the process tree in bytes); output goes to log_path. With a
    list as stamps, the output passes through this process, which appends (arrival time, text) to it."""
    import threading

    import psutil

    started, peak = time.perf_counter(), 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log if stamps is None else subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        if stamps is not None:
            def copy():
                for chunk in iter(lambda: os.read(proc.stdout.fileno(), 1 << 16), b""):
                    stamps.append((time.perf_counter(), chunk.decode(errors="replace")))
                    log.write(stamps[-1][1])
            reader = threading.Thread(target=copy, daemon=True)
            reader.start()
        parent = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in [parent] + parent.children(recursive=True):
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.05)
        if stamps is not None:
            reader.join()
    return proc.returncode, time.perf_counter() - started, peak


def progress_bar_period(stamps, desc, warmup):
    """Median time between consecutive steps of a tqdm bar called desc, from the arrival time of the output
    in which each step count first appears (steps after warmup)."""
    text, ends, seen = "", [], {}
    for at, chunk in stamps:
        text += chunk
        ends.append((len(text), at))
    for match in re.finditer(re.escape(desc) + r":\s*\d+%\|[^|\r\n]*\|\s*(\d+)/\d+", text):
        seen.setdefault(int(match.group(1)), next(at for end, at in ends if end >= match.end()))
    periods = [seen[k] - seen[k - 1] for k in sorted(seen) if k > warmup and k - 1 in seen]
    return statistics.median(periods) if periods else None


def scalar_records(logdir, tag):
    """{step: (value, timestamp ms)} of a VisualDL scalar."""
    from visualdl import LogReader

    found = {}
    for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
        reader = LogReader(file_path=os.path.join(logdir, name))
        if tag in reader.get_tags().get("scalar", []):
            found.update({r.id: (r.value, r.timestamp) for r in reader.get_data("scalar", tag)})
    return found


def step_times(logdir, tag, warmup, with_values=True):
    """(median logged value, median period between consecutive steps, smallest logged value) over the
    steps after warmup."""
    records = scalar_records(logdir, tag)
    after = sorted(s for s in records if s > warmup)
    values = statistics.median(records[s][0] for s in after) if with_values and after else None
    smallest = min(records[s][0] for s in after) if with_values and after else None
    periods = [(records[s][1] - records[s - 1][1]) / 1000 for s in after if s - 1 in records]
    return values, (statistics.median(periods) if periods else None), smallest


def fail(what, log_path):
    with open(log_path) as f:
        tail = f.read()[-3000:]
    sys.exit(f"benchmark: {what} failed; the end of {log_path}:\n{tail}")


# ----------------------------------------------------------------------------------------------
# The benchmark


def trainer_flags(model, out, resolution, steps, help_text, subject_dir=SUBJECT_DIR):
    flags = ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
             "--output_dir", out, "--overwrite_output_dir", "--resolution", resolution, "--center_crop",
             "--train_batch_size", 1, "--learning_rate", 1e-4, "--lr_scheduler", "constant", "--lr_warmup_steps", 0,
             "--max_train_steps", steps, "--seed", 0, "--save_steps", 10**9, "--logging_steps", 1]
    if "--diagnostics_steps" in help_text:  # measurements of the subject, not training: off
        flags += ["--diagnostics_steps", 0]
    return [str(f) for f in flags]


def class_flags(class_dir, num):
    return ["--class_prompt", CLASS_PROMPT, "--class_data_dir", class_dir, "--num_class_images", str(num)]


def compare_flags(model, out, resolution, steps, family="sd", subject_dir=SUBJECT_DIR):
    """The --compare_script's command line for the run trainer_flags() describes."""
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
            "--output_dir", out, "--resolution", str(resolution), "--center_crop", "--train_batch_size", "1",
            "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--max_train_steps",
            str(steps), "--seed", "0", "--checkpointing_steps", str(10**9)] + FAMILIES[family]["compare_only"]


def tqdm_seconds(log_path, desc):
    """Elapsed seconds of the last finished tqdm bar called desc in a log (whole seconds)."""
    with open(log_path, errors="replace") as f:
        found = re.findall(re.escape(desc) + r": 100%[^\[]*\[([0-9:]+)<", f.read())
    if not found:
        fail(f"reading the '{desc}' progress bar", log_path)
    seconds = 0
    for part in found[-1].split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="sd",
                   help="sd: SD 1.x-shaped model and its variants; sdxl: a small SDXL, full fine-tune and --use_lora.")
    p.add_argument("--quick", action="store_true",
                   help="Tiny model, 64x64, 3 updates, plain (SDXL: full and LoRA; or --variants) + floor only.")
    p.add_argument("--steps", type=int, default=30, help="Measured updates per variant (after --warmup).")
    p.add_argument("--warmup", type=int, default=3, help="Updates not measured.")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run.")
    p.add_argument("--variants", default=None, help="Comma-separated subset of: " + ", ".join(VARIANTS) +
                   " (--family sdxl: " + ", ".join(SDXL_VARIANTS) + "); default: all of the family's.")
    p.add_argument("--repeats", type=int, default=1,
                   help="Measure every variant (each with its floor and --compare_script run) this many times, "
                        "alternating; ratios are also reported as their median over the repeats.")
    p.add_argument("--class_images", type=int, default=16, help="Class images generated per sampler and round.")
    p.add_argument("--class_rounds", type=int, default=2,
                   help="Rounds of class-image generation, the two samplers alternating (load drifts; this evens it).")
    p.add_argument("--work", default=None, help="Scratch folder (default: bench/out/benchmark, "
                   "bench/out/benchmark-sdxl for --family sdxl).")
    p.add_argument("--results", default=None, help="Markdown file to write the table into (default: "
                   "RESULTS.md in the --work folder; none with --quick).")
    p.add_argument("--update_results", action="store_true",
                   help="Write the table into the committed bench/RESULTS.md instead (what a results commit does; "
                        "--family sdxl writes its own section).")
    p.add_argument("--compare_script", default=None,
                   help="Another DreamBooth train script to time with the same flags (e.g. PaddleMIX's "
                        "ppdiffusers/examples/dreambooth/train_dreambooth.py, run with --noise_offset 0; for "
                        "--family sdxl its train_dreambooth_lora_sdxl.py).")
    p.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--lora_rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor:
        return floor(args.model, args.batch, args.resolution, args.resolution, args.steps, args.warmup, args.lora_rank)
    family = FAMILIES[args.family]
    known = family["variants"]
    if args.quick:
        args.steps, args.warmup = 2, 1
        size, resolution, quick_variants = family["quick"]
        args.variants = args.variants or quick_variants
    else:
        size, resolution = family["model"]
    variants = [v.strip() for v in (args.variants or ",".join(known)).split(",") if v.strip()]
    unknown = [v for v in variants if v not in known]
    if unknown:
        sys.exit(f"benchmark: unknown variants {unknown} for --family {args.family}; choose from {list(known)}")
    if args.work is None:
        args.work = os.path.join(HERE, "out", "benchmark" + ("-sdxl" if args.family == "sdxl" else ""))
    work = os.path.abspath(args.work + ("-quick" if args.quick else ""))
    results = results_file(args, work)
    os.makedirs(work, exist_ok=True)
    env, py = child_env(args.threads), sys.executable
    total = args.warmup + args.steps
    load_before = os.getloadavg()
    commands = []
    # Where the trainer changes MKL's code path (AMD), also measure what the others get without it: the
    # floor once per batch, and --compare_script both as its users run it and on the trainer's kernels.
    other_kernels = ["MKL_DEBUG_CPU_TYPE=5"] if choose_mkl_code_path(dict(env)) else []

    model = os.path.join(work, f"{size}-{args.family}")
    family_flag = [] if args.family == "sd" else ["--family", args.family]
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        cmd = [py, "tiny_sd.py", model, "--size", size] + family_flag
        if subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode:
            sys.exit(f"benchmark: {' '.join(cmd)} failed")
    commands.append(" ".join(["python tiny_sd.py MODEL --size", size] + family_flag))
    subject_dir = SUBJECT_DIR
    if args.family == "sdxl":
        # PaddleMIX's SDXL script opens every file of the instance folder as an image (the subject's
        # HOW_MADE.txt stops it): both scripts get a folder of the same images and nothing else.
        subject_dir = os.path.join(work, "instance_images")
        os.makedirs(subject_dir, exist_ok=True)
        for name in sorted(os.listdir(SUBJECT_DIR)):
            if name.endswith(".png"):
                shutil.copyfile(os.path.join(SUBJECT_DIR, name), os.path.join(subject_dir, name))
    help_text = subprocess.run([py, "train_dreambooth.py", "--help"], cwd=ROOT, env=env, capture_output=True,
                               text=True).stdout

    def floor_of(key, kernels=""):
        batch, lora_rank = key
        log = os.path.join(work, f"floor-b{batch}{f'-lora{lora_rank}' if lora_rank else ''}.log")
        lora = ["--lora_rank", str(lora_rank)] if lora_rank else []
        cmd = [py, os.path.join(HERE, "benchmark.py"), "--floor", "--model", model, "--batch", str(batch),
               "--resolution", str(resolution), "--steps", str(args.steps), "--warmup", str(args.warmup)] + lora
        rc, wall, rss = run(cmd, with_kernels(env, kernels), log)
        if rc:
            fail(f"the floor ({floor_label(key)})", log)
        with open(log) as f:
            line = [ln for ln in f if ln.startswith("{")][-1]
        command = (f"{kernels} python bench/benchmark.py --floor --model MODEL --batch {batch} "
                   f"--resolution {resolution} --steps {args.steps} --warmup {args.warmup} {' '.join(lora)}").strip()
        if command not in commands:
            commands.append(command)
        found = json.loads(line)
        return dict(median=found["median"], cpu=found["cpu_median"], cpu_min=found["cpu_min"], rss=rss, wall=wall)

    # floors: (batch, LoRA rank or 0) -> its runs; reference_floors: the same key -> floor on MKL's own code path
    rows, floors, reference_floors = [], {}, {}
    class_dir = os.path.join(work, "class_images")
    gen_runs = []  # (sampler, round, images, seconds, CPU seconds)
    if "prior preservation" in variants:
        # Class images by the trainer's default sampler against the 50 PNDM steps of PaddleMIX's example
        # (its `pipeline(prompts)` call with the model's own scheduler and defaults): that script's own
        # generation with --compare_script, else the trainer's generation with that sampler.
        baselines = [("compare", 50, k) for k in [""] + other_kernels] if args.compare_script else [("model", 50, "")]
        for round_ in range(args.class_rounds):
            for sampler, sampler_steps, kernels in [("dpm_solver", 25, "")] + baselines:
                folder = class_dir if sampler == "dpm_solver" else os.path.join(work, "class_images_pndm")
                for name in os.listdir(folder) if os.path.isdir(folder) else []:
                    os.remove(os.path.join(folder, name))
                out = os.path.join(work, f"gen-{sampler}")
                if sampler == "compare":
                    log = os.path.join(work, "gen-compare.log")
                    flags = compare_flags(model, out, resolution, 1) + ["--with_prior_preservation"] + \
                        class_flags(folder, args.class_images) + ["--sample_batch_size", "4"]
                    rc, wall, rss = run([py, os.path.abspath(args.compare_script)] + flags,
                                        with_kernels(env, kernels), log)
                    if rc:
                        fail("--compare_script's class-image generation", log)
                    seconds = tqdm_seconds(log, "Generating class images")
                    gen_runs.append((f"--compare_script, {sampler_steps} steps{with_label(kernels)}", round_ + 1,
                                     args.class_images, seconds, None))
                    if round_ == 0:
                        commands.append((f"{kernels} python {args.compare_script} [same flags] "
                                         f"--with_prior_preservation --num_class_images {args.class_images} "
                                         "--sample_batch_size 4 --max_train_steps 1").strip())
                    continue
                flags = trainer_flags(model, out, resolution, 1, help_text) + ["--with_prior_preservation"] + \
                    class_flags(folder, args.class_images) + ["--class_sampler", sampler, "--class_inference_steps",
                                                              str(sampler_steps), "--sample_batch_size", "4"]
                log = os.path.join(work, f"gen-{sampler}.log")
                rc, wall, rss = run([py, "train_dreambooth.py"] + flags, env, log)
                if rc:
                    fail(f"class-image generation ({sampler})", log)
                with open(log) as f:
                    found = re.findall(r"Class images: [0-9.]+ images/s .*\((\d+) in ([0-9.]+) s, ([0-9.]+) CPU s",
                                       f.read())[-1]
                gen_runs.append((f"{sampler} {sampler_steps} steps", round_ + 1, *map(float, found)))
                if round_ == 0:
                    commands.append(f"python train_dreambooth.py ... --with_prior_preservation --num_class_images "
                                    f"{args.class_images} --sample_batch_size 4 --class_sampler {sampler} "
                                    f"--class_inference_steps {sampler_steps}")

    def floor_key(extra, batch):
        return batch, LORA_RANK if "--use_lora" in extra else 0

    def measure_trainer(name, suffix):
        extra, batch, procs = known[name]
        key = floor_key(extra, batch)
        # The floor runs right before each variant, so that both see the same load on a shared machine.
        floors.setdefault(key, []).append(floor_of(key))
        if other_kernels and key not in reference_floors:  # what a bare Paddle loop gets, once per floor
            reference_floors[key] = floor_of(key, "MKL_DEBUG_CPU_TYPE=")
        out = os.path.join(work, "run-" + name.replace(" ", "_"))
        flags = trainer_flags(model, out, resolution, total, help_text, subject_dir) + extra
        if "--with_prior_preservation" in extra:
            flags += class_flags(class_dir, args.class_images)
        launch = [py, "-m", "paddle.distributed.launch", "--nproc_per_node", str(procs), "--log_dir",
                  os.path.join(work, "launch-logs")] if procs > 1 else [py]
        log = os.path.join(work, f"run-{name.replace(' ', '_')}.log")
        rc, wall, rss = run(launch + ["train_dreambooth.py"] + flags, env, log)
        if rc:
            fail(f"the trainer ({name})", log)
        update, period, _ = step_times(os.path.join(out, "logs"), "train/update_seconds", args.warmup)
        cpu, _, cpu_min = step_times(os.path.join(out, "logs"), "train/update_cpu_seconds", args.warmup)
        rows.append(dict(name=name + suffix, variant=name, update=update, period=period, cpu=cpu, cpu_min=cpu_min,
                         rss=rss, wall=wall, floor_key=key, floor=floors[key][-1]))
        shown = " ".join(f'"{f}"' if " " in f else f for f in extra)
        command = (("python -m paddle.distributed.launch --nproc_per_node 2 " if procs > 1 else "python ") +
                   f"train_dreambooth.py [common flags] {shown}".rstrip())
        if command not in commands:
            commands.append(command)

    def measure_compare_script(name, suffix, kernels):
        """The other script on the same model, data and flags (with prior preservation on the class
        images generated above, so that it generates none)."""
        extra, batch, _ = known[name]
        key = floor_key(extra, batch)
        floors.setdefault(key, []).append(floor_of(key))
        out = os.path.join(work, "run-compare-" + name.replace(" ", "_"))
        own = family["compared"][name]
        flags = compare_flags(model, out, resolution, total, args.family, subject_dir) + own
        if "--with_prior_preservation" in extra:
            flags += class_flags(class_dir, args.class_images)
        log = os.path.join(work, f"run-compare-{name.replace(' ', '_')}.log")
        stamps = None if args.family == "sd" else []  # SD: PaddleMIX's example logs to VisualDL; SDXL's cannot
        rc, wall, rss = run([py, os.path.abspath(args.compare_script)] + flags, with_kernels(env, kernels), log,
                            stamps=stamps)
        if rc:
            fail(f"--compare_script ({name})", log)
        if stamps is None:
            _, period, _ = step_times(os.path.join(out, "logs"), "train/step_loss", args.warmup, with_values=False)
        else:
            period = progress_bar_period(stamps, "Steps", args.warmup)
        if period is None:
            fail(f"timing --compare_script's steps ({name})", log)
        rows.append(dict(name=f"--compare_script, {name}{suffix}{with_label(kernels)}", variant=name, update=None,
                         period=period, cpu=None, cpu_min=None, rss=rss, wall=wall, floor_key=key,
                         floor=floors[key][-1], compares=name + suffix, kernels=kernels))
        shown = " ".join(own + [f for f in family["compare_only"] if f not in ("--report_to", "visualdl")])
        command = f"{kernels} python {args.compare_script} [same flags] {shown}".strip()
        if command not in commands:
            commands.append(command)

    # Each repeat measures every variant again, each right before the other script's run it is compared
    # with: on a machine whose speed drifts, the ratio within a repeat is steadier than any single time.
    for repeat in range(args.repeats):
        suffix = f" #{repeat + 1}" if args.repeats > 1 else ""
        for name in variants:
            measure_trainer(name, suffix)
            if args.compare_script and name in family["compared"]:
                for kernels in [""] + other_kernels:
                    measure_compare_script(name, suffix, kernels)

    table = render(rows, floors, reference_floors, gen_runs, args, resolution)
    print(table)
    if results:
        write_results(results, table, commands, args, size, resolution, load_before, os.getloadavg(), subject_dir)
        print(f"written to {results}")


def results_file(args, work):
    """Where the table is written (None: printed only). Trying the benchmark must not rewrite the
    committed results: only --update_results does."""
    if args.update_results:
        return os.path.join(HERE, "RESULTS.md")
    return args.results or (None if args.quick else os.path.join(work, "RESULTS.md"))


def fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def with_label(kernels):
    return f", {kernels}" if kernels else ""


def floor_label(key):
    batch, lora_rank = key
    return f"batch {batch}" + (f", LoRA rank {lora_rank}" if lora_rank else "")


def render(rows, floors, reference_floors, gen_runs, args, resolution):
    mib = 2**20
    lines = [f"Seconds per optimizer update over {args.steps} updates after {args.warmup} warm-up updates; "
             f"{resolution}x{resolution}, batch 1 per process, OMP_NUM_THREADS={args.threads}. update: median of the "
             "trainer's `train/update_seconds`; period: median time between consecutive updates (all of the loop); "
             "CPU: process CPU seconds per update (`train/update_cpu_seconds`), median and minimum. Other load on "
             "the machine only ever adds time, so the minimum is the steadiest figure there. Each ratio divides by "
             "the floor in brackets (its batch, and for a LoRA variant the same LoRA on the frozen UNet), measured just "
             "before the variant.", "",
             "| variant | update s | period s | CPU s median / min | floor: s, CPU median / min (batch) | "
             "period / floor | CPU / floor CPU, median | CPU / floor CPU, min | peak RSS MiB | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, runs in sorted(floors.items()):
        for i, f in enumerate(runs):
            lines.append(f"| floor, {floor_label(key)}, run {i + 1} | {f['median']:.3f} | | {f['cpu']:.3f} / "
                         f"{f['cpu_min']:.3f} | | | | | {f['rss'] / mib:.0f} | {f['wall']:.1f} |")
    for key, f in sorted(reference_floors.items()):
        lines.append(f"| floor, {floor_label(key)}, MKL_DEBUG_CPU_TYPE= (MKL's own code path, for reference) | "
                     f"{f['median']:.3f} | | {f['cpu']:.3f} / {f['cpu_min']:.3f} | | | | | {f['rss'] / mib:.0f} | "
                     f"{f['wall']:.1f} |")
    for r in rows:
        f = r["floor"]

        def ratio(x, key):
            return "n/a" if x is None else f"{x / f[key]:.2f}"

        cpu = "n/a" if r["cpu"] is None else f"{r['cpu']:.3f} / {r['cpu_min']:.3f}"
        lines.append(f"| {r['name']} | {fmt(r['update'])} | {fmt(r['period'])} | {cpu} | {f['median']:.3f}, "
                     f"{f['cpu']:.3f} / {f['cpu_min']:.3f} ({floor_label(r['floor_key'])}) | {ratio(r['period'], 'median')} | "
                     f"{ratio(r['cpu'], 'cpu')} | {ratio(r['cpu_min'], 'cpu_min')} | {r['rss'] / mib:.0f} | "
                     f"{r['wall']:.1f} |")
    compared = [(r, mine) for r in rows if r.get("compares") for mine in rows if mine["name"] == r["compares"]]
    if compared:
        lines += ["", "| against --compare_script | trainer period s | its period s | trainer / it | trainer peak RSS "
                  "MiB | its peak RSS MiB |", "|---|---|---|---|---|---|"]
        lines += [f"| {mine['name']}{with_label(r['kernels'])} | {mine['period']:.3f} | {r['period']:.3f} | "
                  f"{mine['period'] / r['period']:.2f} | {mine['rss'] / mib:.0f} | {r['rss'] / mib:.0f} |"
                  for r, mine in compared]
    if args.repeats > 1:
        lines += ["", f"Median over the {args.repeats} repeats of each ratio (the ratios of every repeat in brackets):",
                  "", "| variant | period / floor | CPU / floor CPU, min | trainer / --compare_script |", "|---|---|---|---|"]
        for name in dict.fromkeys(r["variant"] for r in rows if not r.get("compares")):
            mine = [r for r in rows if r["variant"] == name and not r.get("compares")]
            theirs = [(r, m) for r in rows if r.get("compares") and not r["kernels"]
                      for m in mine if m["name"] == r["compares"]]
            cells = [[r["period"] / r["floor"]["median"] for r in mine],
                     [r["cpu_min"] / r["floor"]["cpu_min"] for r in mine],
                     [m["period"] / r["period"] for r, m in theirs]]
            lines.append(f"| {name} | " + " | ".join(
                f"{statistics.median(c):.2f} ({', '.join(f'{x:.2f}' for x in c)})" if c else "" for c in cells) + " |")
    if gen_runs:
        def per_cpu(n, cpu):  # --compare_script's CPU time is not known (its progress bar gives wall time)
            return "n/a" if cpu is None else f"{n / cpu:.4f}"

        lines += ["", "| class-image generation, batch 4 | round | images | images/s (wall) | images per CPU second |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {r} | {n:.0f} | {n / s:.4f} | {per_cpu(n, cpu)} |" for name, r, n, s, cpu in gen_runs]
        pooled = {}
        for name, _, n, s, cpu in gen_runs:
            total = pooled.setdefault(name, [0.0, 0.0, 0.0])
            total[0], total[1] = total[0] + n, total[1] + s
            total[2] = None if cpu is None or total[2] is None else total[2] + cpu
        lines += [f"| {name} | all | {n:.0f} | {n / s:.4f} | {per_cpu(n, cpu)} |" for name, (n, s, cpu) in pooled.items()]
        (fast, (nf, sf, cf)), *baselines = pooled.items()
        lines.append("")
        for slow, (ns, ss, cs) in baselines:
            per_cpu_ratio = "" if cs is None else f", {(nf / cf) / (ns / cs):.2f}x per CPU second"
            lines.append(f"Class images, {fast} against {slow}, all rounds: {(nf / sf) / (ns / ss):.2f}x the images "
                         f"per second (wall){per_cpu_ratio}.")
    return "\n".join(lines)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor()


def versions():
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("paddlepaddle", "ppdiffusers", "paddlenlp", "numpy", "visualdl"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}, " + ", ".join(found)


def write_results(path, table, commands, args, size, resolution, load_before, load_after, subject_dir=SUBJECT_DIR):
    begin, end = FAMILIES[args.family]["markers"]
    family = "" if args.family == "sd" else f" --family {args.family}"
    subject = os.path.relpath(SUBJECT_DIR, ROOT) + ("" if subject_dir == SUBJECT_DIR else " (its PNG files only)")
    block = "\n".join([
        begin,
        f"Generated by `python bench/benchmark.py{family}{' --quick' if args.quick else ''}"
        f"{f' --repeats {args.repeats}' if args.repeats > 1 else ''}` on {time.strftime('%Y-%m-%d %H:%M')}.", "",
        f"- Machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after the run",
        f"- Versions: {versions()}",
        f"- Model: tiny_sd.py --size {size}{family}, {resolution}x{resolution}, OMP_NUM_THREADS={args.threads}",
        f"- Common trainer flags: --instance_data_dir {subject} --center_crop --train_batch_size 1 "
        f"--learning_rate 1e-4 --lr_warmup_steps 0 --max_train_steps {args.warmup + args.steps} --seed 0 "
        "--save_steps 1000000000 --logging_steps 1 --diagnostics_steps 0", "",
        "Commands:", "", "```", *commands, "```", "", table, end])
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    elif args.family == "sd":
        text = "# Benchmark results\n\n" + block + "\n" + text
    else:
        text = (text or "# Benchmark results\n") + f"\n## {args.family.upper()}\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
