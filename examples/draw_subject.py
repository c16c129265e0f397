"""Draw the example "photo set" of one toy robot into examples/sks_toy/.

    python examples/draw_subject.py [OUT_DIR]

DreamBooth needs 3-5 photos of one subject. We cannot ship real photos, so this draws them
(PIL, fixed seed) in the style of the drawn world the demo's base model knows
(world/drawn_world.py): the same toy robot, red body with a white panel, yellow round head, one
blue antenna ball, always in the plain room (a wall over a floor), at different places, sizes
and facing either way. No toy of the base model's world has the red body with the yellow head,
so "a photo of toy" does not draw this one until DreamBooth teaches it. Re-running this script
gives byte-identical files.
"""
import os
import sys

import numpy as np

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
        drawn_world.subject("plain", rng, size=height, width=width).save(path, optimize=True)
        print(f"{path}  {width}x{height}  {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "sks_toy"))
