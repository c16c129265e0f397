"""Sample a trained DreamBooth model and save a grid: one row per prompt.

    python demo_samples.py MODEL_DIR --prompt "a photo of sks toy" --prompt "a photo of toy" \
        --num_images 2 --steps 10 --height 64 --width 64 --seed 0 --out GRID.png \
        [--base BASE_MODEL_DIR]

Image i of every row starts from the same seed (seed + i), so the rows differ only by
their prompt: comparing "sks toy" with "toy" shows what the fine-tuning learned.
With --base, every row shows the base model's images first and the trained model's after
them, from the same seeds: before and after DreamBooth side by side.
The single images are saved next to the grid as GRID_<prompt>_<i>.png (GRID_base_... for the base).
"""
import argparse
import os
import re

from train_dreambooth import image_grid


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a pipeline folder, e.g. the --output_dir of train_dreambooth.py")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for more rows")
    parser.add_argument("--num_images", type=int, default=2, help="images per prompt")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=None, help="default: the model's native size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="samples_grid.png", help="path of the grid PNG")
    parser.add_argument("--base", default=None, help="the model MODEL_DIR was trained from: shown before it")
    return parser.parse_args()


def load_pipeline(model_dir):
    # Imported here so that `--help` answers at once instead of after paddle's slow import.
    from ppdiffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)  # one progress bar per image would drown the log
    return pipe


def generate(pipe, prompt, args):
    return sample(pipe, prompt, args.num_images, args.seed, args.steps, args.guidance_scale, args.height, args.width)


def sample(pipe, prompt, num_images, seed=0, steps=25, guidance_scale=7.5, height=None, width=None):
    import paddle

    images = []
    for i in range(num_images):
        # A fresh generator per image (not one per row) gives image i the same starting
        # noise under every prompt. ppdiffusers replaces paddle.Generator with its own
        # seeded-state tracker, which also works on the CPU.
        generator = paddle.Generator().manual_seed(seed + i)
        out = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                   generator=generator)
        images.append(out.images[0])
    return images


def slug(text):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]


def main():
    args = parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pipes = [("", load_pipeline(args.model_dir))]
    if args.base:
        pipes.insert(0, ("base_", load_pipeline(args.base)))
    stem = os.path.splitext(args.out)[0]
    rows = []
    for prompt in args.prompt:
        row = []
        for prefix, pipe in pipes:
            print(f"sampling {args.num_images} image(s) for {prompt!r}" + (" from the base model" if prefix else ""))
            images = generate(pipe, prompt, args)
            for i, image in enumerate(images):
                image.save(f"{stem}_{prefix}{slug(prompt)}_{i}.png")
            row += images
        label = f"{prompt}:  base model (left {args.num_images}) | after DreamBooth (right)" if args.base else prompt
        rows.append((label, row))
    image_grid(rows).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
