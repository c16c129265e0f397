"""Draw the example "photo set" of one toy robot into examples/sks_toy/.

    python examples/draw_subject.py [OUT_DIR]

DreamBooth needs 3-5 photos of one subject. We cannot ship real photos, so this draws them
(PIL, fixed seed) in the style of the drawn world the demo's base model knows
(world/drawn_world.py): the same toy robot, red body with a white panel, yellow round head, one
blue antenna ball, always in the plain room (a wall over a floor), at different places, sizes
and facing either way. No toy of the base model's world has the red body with the yellow head,
so "a photo of toy" does not draw this one until DreamBooth teaches it. Each photo is a PNG whose
room is transparent (alpha 0) and the toy opaque, as a background remover leaves a real photo;
the room's colours stay in the file. The demo trains with --masked_loss, which reads the alpha as
the loss weight; without it the trainer sees the toy over white. Re-running this script gives
byte-identical files.
"""
import os
import sys

import numpy as np
from PIL import Image, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "world"))

import drawn_world  # noqa: E402

# (width, height) of each photo; one is not square, which exercises the trainer's resize and crop.
SHOTS = [(256, 256), (256, 256), (256, 256), (320, 256), (256, 256)]


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(SHOTS):
        path = os.path.join(out_dir, f"toy_{i:02d}.png")
        image, mask = drawn_world.draw("toy", "plain", rng, size=height, colours=drawn_world.SUBJECT_COLOURS,
                                       width=width, with_mask=True)
        # A cut-out a little larger than the toy (one 64th of the height), as a background remover's is.
        grow = 2 * round(height / 64) + 1
        image.putalpha(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(grow)))
        image.save(path, optimize=True)
        print(f"{path}  {width}x{height}  {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "sks_toy"))
