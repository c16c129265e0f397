"""DreamBooth's claims, measured at toy scale on the demo: subject fidelity, recontextualisation and
prior preservation (the paper's PRES and DIV), with the judge of world/classifier.py.

    python bench/efficacy.py [--samples 16] [--out bench/out/efficacy] [--update_results]
    python bench/efficacy.py --page_only   # rewrite EFFICACY.md from efficacy.json, measuring nothing

1. The base model (models/drawn-world): SAMPLES samples of every "a photo of <object><scene>"
   prompt of the drawn world, judged: does the base draw what the words say?
2. The demo (bash run_demo.sh) from that base: as shipped, with two other training seeds
   (DEMO_SEED), and once without each of its choices (DEMO_PRIOR=0: no prior preservation;
   DEMO_CAPTIONS=0: no caption files; DEMO_MASKED=0: no --masked_loss); the grid of the first is
   kept as demo_grid.png.
3. SAMPLES samples of each demo prompt from the base and every trained model, the same seeds for
   all, judged and compared with the subject photos.
4. Writes EFFICACY.md and efficacy.json (every number of the page, for the README), the demo's grid
   demo_grid.png and every run's --diagnostics_steps curves efficacy.png into OUT; with
   --update_results into bench/, over the committed ones.
"""
import argparse
import csv
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "world"))

import drawn_world  # noqa: E402

SUBJECT_DIR = os.path.join(ROOT, "examples", "sks_toy")
BASE = os.path.join(ROOT, "models", "drawn-world")
INSTANCE, BEACH, CLASS = "a photo of sks toy", "a photo of sks toy on the beach", "a photo of toy"
# Each run: the demo with these environment settings (run_demo.sh reads them); the first is the demo as shipped.
RUNS = {"the demo": {}, "training seed 1": {"DEMO_SEED": "1"}, "training seed 2": {"DEMO_SEED": "2"},
        "without prior preservation": {"DEMO_PRIOR": "0"}, "without caption files": {"DEMO_CAPTIONS": "0"},
        "without --masked_loss": {"DEMO_MASKED": "0"}}
SAMPLING = dict(steps=10, guidance_scale=6.0, height=64, width=64)  # as the demo's grid


def subject_photos():
    """The subject photos as the trainer sees them: resized to cover 64x64, center-cropped (colours as
    stored, scene included, as --masked_loss trains them)."""
    from PIL import Image

    photos = []
    for name in sorted(n for n in os.listdir(SUBJECT_DIR) if n.endswith(".png")):
        image = Image.open(os.path.join(SUBJECT_DIR, name)).convert("RGB")
        scale = 64 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        left, top = (image.width - 64) // 2, (image.height - 64) // 2
        photos.append(image.crop((left, top, left + 64, top + 64)))
    return photos


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def pixel_diversity(images):
    """Mean distance between two samples of the set: RMS pixel difference at 32x32, in [0, 1] units.
    The paper's DIV uses LPIPS; on flat drawings plain pixels say the same: colours and places."""
    from PIL import Image

    x = np.stack([np.asarray(im.resize((32, 32), Image.BILINEAR), np.float32) / 255 for im in images])
    pairs = list(itertools.combinations(range(len(x)), 2))
    return float(np.mean([np.sqrt(((x[i] - x[j]) ** 2).mean()) for i, j in pairs]))


def judge_samples(judge, images, photos_features):
    """The numbers of one set of samples of one prompt."""
    answer = judge(images)
    return dict(
        subject=float(np.mean(answer["subject"] > 0.5)),  # share judged to be the subject
        subject_probability=float(np.mean(answer["subject"])),
        similarity=float(cosine(answer["features"], photos_features).mean()),  # to the subject photos
        diversity=pixel_diversity(images),
        objects={o: float(np.mean([a == o for a in answer["object"]])) for o in drawn_world.OBJECTS},
        scenes={s: float(np.mean([a == s for a in answer["scene"]])) for s in drawn_world.SCENES},
        beach_and_subject=float(np.mean([(s == "beach") and (p > 0.5)
                                         for s, p in zip(answer["scene"], answer["subject"])])),
    )


def sample_prompts(model, prompts, n, seed=0):
    from demo_samples import load_pipeline, sample

    pipe = load_pipeline(model)
    return {p: sample(pipe, p, n, seed, **SAMPLING) for p in prompts}


def base_knows_the_world(judge, n):
    """Share of the base's samples of every object and scene prompt judged that object and scene."""
    prompts = {drawn_world.caption(o, s): (o, s) for o in drawn_world.OBJECTS for s in drawn_world.SCENES}
    samples = sample_prompts(BASE, list(prompts), n, seed=1000)
    rows = {}
    for prompt, images in samples.items():
        obj, scene = prompts[prompt]
        answer = judge(images)
        rows[prompt] = dict(object=float(np.mean([a == obj for a in answer["object"]])),
                            scene=float(np.mean([a == scene for a in answer["scene"]])))
    return rows, samples


def run_demo(out, settings):
    env = dict(os.environ, DEMO_DIR=out, **settings)
    started = time.time()
    subprocess.run(["bash", os.path.join(ROOT, "run_demo.sh")], env=env, check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.time() - started


def diagnostics_rows(output_dir):
    with open(os.path.join(output_dir, "diagnostics.csv"), newline="") as f:
        return [dict(step=int(r["step"]), subject_fit=float(r["subject_fit"]), class_drift=float(r["class_drift"]))
                for r in csv.DictReader(f)]


def pct(x):
    return f"{100 * x:.0f}%"


def page(results):
    """bench/EFFICACY.md, every figure from results (also saved as efficacy.json)."""
    models = list(results["demo"].values())
    n, world = results["samples"], results["world"]
    obj_acc = np.mean([v["object"] for v in world.values()])
    scene_acc = np.mean([v["scene"] for v in world.values()])
    judge_acc = results["judge"]["held_out_accuracy"]
    lines = [
        "# Efficacy: DreamBooth's claims at toy scale",
        "",
        "Generated by `python bench/efficacy.py --update_results` (do not edit; numbers also in `bench/efficacy.json`). "
        f"It took {results['seconds'] / 60:.0f} minutes on a shared 2-core CPU.",
        "",
        "The demo (`bash run_demo.sh`) teaches the toy robot of `examples/sks_toy` (5 drawn photos: in the "
        "room, in the snow, on the grass, never on the beach; each with a caption file naming its scene and an "
        "alpha channel that makes the scene faint) to `models/drawn-world`, a small Stable Diffusion model "
        "trained on a drawn world (`world/build_base.py`, `models/drawn-world/BUILD.md`). Every sample below is "
        "judged by `world/classifier.py`, a small CNN trained on drawn pictures, their VAE decodes and blurred "
        "copies (held out, drawn: "
        f"object {pct(judge_acc['drawn']['object'])}, scene {pct(judge_acc['drawn']['scene'])}, subject "
        f"{pct(judge_acc['drawn']['subject'])}; through the VAE: object "
        f"{pct(judge_acc['through the VAE']['object'])}, scene {pct(judge_acc['through the VAE']['scene'])}, "
        f"subject {pct(judge_acc['through the VAE']['subject'])}; blurred: object "
        f"{pct(judge_acc['drawn, blurred (radius 2)']['object'])}, subject "
        f"{pct(judge_acc['drawn, blurred (radius 2)']['subject'])}). Samples are drawn with 10 steps at "
        f"guidance {SAMPLING['guidance_scale']:g}, as the demo's grid.",
        "",
        "![before and after DreamBooth](demo_grid.png)",
        "",
        "Each row: four samples of the base model, then the same four seeds after the demo's DreamBooth run "
        "(as shipped).",
        "",
        "## The base model draws what the words say",
        "",
        f"{n} samples of each of the {len(world)} prompts \"a photo of <object>[ on the beach | in the snow | on "
        f"the grass]\": the judge finds the prompt's object in {pct(obj_acc)} of them and its scene in "
        f"{pct(scene_acc)} (chance: 20% and 25%).",
        "",
        "| prompt | object as prompted | scene as prompted |",
        "|---|---|---|",
        *[f"| {p} | {pct(v['object'])} | {pct(v['scene'])} |" for p, v in world.items()],
        "",
        f"## DreamBooth: {n} samples per prompt, seeds 0-{n - 1} for every model",
        "",
        "| measure | " + " | ".join(results["demo"]) + " |",
        "|---" * (len(models) + 1) + "|",
    ]

    def row(label, prompt, key, fmt=pct):
        return f"| {label} | " + " | ".join(fmt(m[prompt][key]) for m in models) + " |"

    f3 = "{:.3f}".format
    lines += [
        row(f'subject fidelity: "{INSTANCE}" judged the subject', INSTANCE, "subject"),
        row(f'subject fidelity: "{INSTANCE}", feature similarity to the photos', INSTANCE, "similarity", f3),
        row(f'recontextualisation: "{BEACH}" judged the subject', BEACH, "subject"),
        row(f'recontextualisation: "{BEACH}" judged on the beach', BEACH, "beach"),
        row(f'recontextualisation: "{BEACH}" judged both', BEACH, "beach_and_subject"),
        row(f'control: "{INSTANCE}" (no beach in the prompt) judged on the beach', INSTANCE, "beach"),
        row(f'control: "{INSTANCE}" (no beach in the prompt) judged both', INSTANCE, "beach_and_subject"),
        row(f'PRES: "{CLASS}" judged the subject (lower is better)', CLASS, "subject"),
        row(f'PRES: "{CLASS}", feature similarity to the photos (lower is better)', CLASS, "similarity", f3),
        row(f'DIV: "{CLASS}", mean pixel distance between samples (higher is better)', CLASS, "diversity", f3),
        row(f'"{CLASS}" judged a toy', CLASS, "toy"),
        row(f'"{CLASS}" judged in the room (where the base draws it)', CLASS, "plain"),
        "",
        "The training seed columns are the demo as shipped with `--seed` 1 and 2 instead of 0 (other class "
        "images, noise and order): how much of the demo's result a run of this size owes to its seed.",
        "",
        "The control rows tell what the words \"on the beach\" add: a trained model whose samples the judge "
        "finds on the beach as often without those words has not put the subject on the beach; its colours "
        "have only drifted towards the beach's.",
        "",
        "Feature similarity is the mean cosine similarity of the judge's features of a sample and of a "
        "subject photo (the paper's DINO score, with the judge in DINO's place); pixel distance is the RMS "
        "difference of two samples at 32x32 in [0, 1] units (the paper's DIV uses LPIPS).",
        "",
        "## What the trainer's diagnostics saw (`--diagnostics_steps 20`)",
        "",
        "![subject fit and class drift of every run](efficacy.png)",
        "",
        "| run | subject fit at start | at end | class drift at end | mean class drift |",
        "|---|---|---|---|---|",
    ]
    for name in RUNS:
        d = results["diagnostics"][name]
        lines.append(f"| {name} | {d[0]['subject_fit']:.4f} | {d[-1]['subject_fit']:.4f} | "
                     f"{d[-1]['class_drift']:.4f} | {np.mean([x['class_drift'] for x in d[1:]]):.4f} |")
    lines += ["", "Demo wall clock on this machine: " + ", ".join(
        f"{name} {seconds:.0f} s" for name, seconds in results["demo_seconds"].items()) + ".", ""]
    return "\n".join(lines)


def flatten(m):
    """The per-prompt numbers of page(): scene and object shares lifted to the top level."""
    out = {k: v for k, v in m.items() if k not in ("objects", "scenes")}
    out.update(m["objects"])
    out.update(m["scenes"])
    return out


def plot_file(args):
    """Trying the script must not overwrite the committed results: only --update_results does."""
    if args.update_results:
        return os.path.join(HERE, "efficacy.png")
    return args.plot or os.path.join(args.out, "efficacy.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16, help="samples per prompt and model")
    p.add_argument("--out", default=os.path.join(HERE, "out", "efficacy"), help="work folder (emptied first)")
    p.add_argument("--plot", default=None, help="where the diagnostics plot goes (default: OUT/efficacy.png)")
    p.add_argument("--update_results", action="store_true",
                   help="write EFFICACY.md, efficacy.json and both pictures into bench/ (a results commit)")
    p.add_argument("--page_only", action="store_true",
                   help="only rewrite bench/EFFICACY.md from bench/efficacy.json (after a change to the page)")
    args = p.parse_args()
    if args.page_only:
        with open(os.path.join(HERE, "efficacy.json")) as f:
            results = json.load(f)
        with open(os.path.join(HERE, "EFFICACY.md"), "w") as f:
            f.write(page(results))
        return
    results_dir = HERE if args.update_results else args.out
    from classifier import DEFAULT_DIR, Judge

    started = time.time()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    judge = Judge()
    photos = judge(subject_photos())["features"]
    with open(os.path.join(DEFAULT_DIR, "judge.json")) as f:
        results = dict(samples=args.samples, judge=json.load(f), demo={}, diagnostics={}, demo_seconds={})
    results["world"], _ = base_knows_the_world(judge, args.samples)
    models = {"base model": BASE}
    for name, settings in RUNS.items():
        demo_dir = os.path.join(args.out, name.replace(" ", "_").replace("-", ""))
        results["demo_seconds"][name] = run_demo(demo_dir, settings)
        models[name] = os.path.join(demo_dir, "dreambooth-model")
        results["diagnostics"][name] = diagnostics_rows(models[name])
        if not settings:
            shutil.copy(os.path.join(demo_dir, "samples_grid.png"), os.path.join(results_dir, "demo_grid.png"))
    for name, model in models.items():
        samples = sample_prompts(model, [INSTANCE, BEACH, CLASS], args.samples)
        results["demo"][name] = {prompt: flatten(judge_samples(judge, images, photos))
                                 for prompt, images in samples.items()}
    results["seconds"] = time.time() - started
    import diagnostics

    diagnostics.plot(plot_file(args), {
        name: [(r["step"], r["subject_fit"], r["class_drift"]) for r in rows]
        for name, rows in results["diagnostics"].items()})
    with open(os.path.join(results_dir, "efficacy.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(results_dir, "EFFICACY.md"), "w") as f:
        f.write(page(results))
    print(page(results))


if __name__ == "__main__":
    main()
