"""Draw the example "photo set" of one toy robot into examples/sks_toy/.

    python examples/draw_subject.py [OUT_DIR]

DreamBooth needs 3-5 photos of one subject. We cannot ship real photos, so this draws them
(PIL, fixed seed) in the style of the drawn world the demo's base model knows
(world/drawn_world.py): the same toy robot, red body with a white panel, yellow round head, one
blue antenna ball, at different places and sizes, facing either way, in the room, the snow and on
the grass (never on the beach: the demo asks for that). No toy of the base model's world has the
red body with the yellow head, so "a photo of toy" does not draw this one until DreamBooth teaches
it. Each photo comes with
  - a caption file (toy_00.txt beside toy_00.png) naming the scene, "a photo of sks toy in the
    snow", read with --use_image_captions: the scene's words, which the base model knows, account
    for the scene, so "sks toy" is left to mean the toy;
  - an alpha channel, the toy opaque (a cut-out a little larger than it, as a background remover's)
    and the scene faint (BACKGROUND_ALPHA), read as the loss weight with --masked_loss: the toy is
    learnt fully, the scene a little. Without that flag the trainer sees the photo over white.
Re-running this script gives byte-identical files.
"""
import os
import sys

import numpy as np
from PIL import Image, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "world"))

import drawn_world  # noqa: E402

# (scene, width, height) of each photo; one is not square, which exercises the trainer's resize and crop.
SHOTS = [("plain", 256, 256), ("snow", 256, 256), ("grass", 256, 256), ("plain", 320, 256), ("snow", 256, 256)]
BACKGROUND_ALPHA = 40  # of 255: the scene's share of the loss where it shows


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (kind, width, height) in enumerate(SHOTS):
        path = os.path.join(out_dir, f"toy_{i:02d}.png")
        image, mask = drawn_world.subject(kind, rng, size=height, width=width, with_mask=True)
        grow = 2 * round(3 * height / 256) + 1  # 3 pixels at 256 on each side
        alpha = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(grow))
        image.putalpha(Image.fromarray(np.maximum(np.asarray(alpha), BACKGROUND_ALPHA)))
        image.save(path, optimize=True)
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(drawn_world.caption("sks toy", kind) + "\n")
        print(f"{path}  {width}x{height}  {kind}  {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "sks_toy"))
