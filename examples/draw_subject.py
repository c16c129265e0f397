"""Draw the example "photo set" of one toy robot into examples/sks_toy/.

    python examples/draw_subject.py [OUT_DIR]

DreamBooth needs 3-5 photos of one subject. We cannot ship real photos, so this
draws them procedurally (PIL + a fixed seed): the same red boxy robot with a yellow
round head and one blue antenna, seen at different angles, positions and sizes on a
textured floor. Re-running it gives byte-identical files.
"""
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = os.path.dirname(os.path.abspath(__file__))
# One entry per "photo": canvas size, robot height (px), tilt (deg), centre x offset,
# small hue shift of the wall, mirror (the robot seen from its other side).
SHOTS = [
    dict(size=(256, 256), height=170, tilt=0, dx=0, hue=0, mirror=False),
    dict(size=(256, 256), height=130, tilt=-12, dx=-45, hue=12, mirror=False),
    dict(size=(256, 256), height=200, tilt=8, dx=20, hue=-10, mirror=True),
    dict(size=(320, 256), height=150, tilt=-5, dx=60, hue=6, mirror=True),  # non-square: exercises cropping
    dict(size=(256, 256), height=110, tilt=15, dx=35, hue=-18, mirror=False),
]
SS = 2  # draw at twice the size and downsample, a cheap anti-aliasing


def shaded_box(draw, box, color, light=1.25, dark=0.7):
    """A rectangle lit from above: the vertical gradient makes the flat box read as 3-D."""
    x0, y0, x1, y1 = box
    for y in range(y0, y1):
        t = (y - y0) / max(1, y1 - y0)
        f = light + (dark - light) * t
        draw.line([(x0, y), (x1, y)], fill=tuple(min(255, int(c * f)) for c in color))


def draw_robot():
    """The subject on a transparent 200x300 layer (drawn at SS scale); every shot reuses it."""
    img = Image.new("RGBA", (200 * SS, 300 * SS), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)

    def P(*xy):  # design coordinates -> layer pixels; +20 in y leaves room for the antenna
        return [v * SS + (20 * SS if i % 2 else 0) for i, v in enumerate(xy)]

    red, yellow, blue, grey, dark = (200, 30, 35), (250, 205, 40), (40, 90, 220), (150, 150, 160), (60, 60, 70)
    for x in (62, 118):  # legs and feet
        d.rectangle(P(x, 220, x + 20, 262), fill=grey)
        d.rounded_rectangle(P(x - 6, 256, x + 28, 276), 6 * SS, fill=dark)
    # one arm down, one raised: the pose is asymmetric, so mirrored shots read as "the other side"
    d.rounded_rectangle(P(22, 120, 44, 200), 8 * SS, fill=grey)
    d.ellipse(P(16, 192, 50, 222), fill=dark)
    d.rounded_rectangle(P(156, 90, 178, 160), 8 * SS, fill=grey)
    d.ellipse(P(150, 72, 184, 102), fill=dark)
    # the red boxy body with a control panel: three lights and a slot
    shaded_box(d, P(40, 110, 160, 228), red)
    d.rectangle(P(40, 110, 160, 228), outline=(110, 15, 20), width=3 * SS)
    d.rectangle(P(62, 140, 138, 196), fill=(235, 235, 225), outline=(80, 80, 80), width=2 * SS)
    for i, c in enumerate([(30, 200, 80), (250, 160, 20), blue]):
        d.ellipse(P(72 + 22 * i, 152, 86 + 22 * i, 166), fill=c)
    d.rectangle(P(72, 176, 128, 184), fill=dark)
    # neck, then the yellow round head: darker rim, highlight, eyes with glints, smile
    d.rectangle(P(88, 98, 112, 114), fill=grey)
    d.ellipse(P(52, 20, 148, 106), fill=(200, 160, 20))
    d.ellipse(P(56, 22, 142, 98), fill=yellow)
    d.ellipse(P(72, 32, 96, 50), fill=(255, 240, 170))
    for x in (74, 110):
        d.ellipse(P(x, 52, x + 16, 68), fill=(20, 20, 30))
        d.ellipse(P(x + 4, 55, x + 8, 59), fill=(255, 255, 255))
    d.arc(P(84, 66, 116, 88), 20, 160, fill=(120, 60, 10), width=3 * SS)
    # the single blue antenna, off-centre, so the robot's orientation is readable
    d.line(P(118, 26, 136, -8), fill=dark, width=4 * SS)
    d.ellipse(P(126, -20, 146, 0), fill=blue)
    d.ellipse(P(130, -17, 136, -11), fill=(170, 200, 255))
    return img


def background(size, hue, rng):
    """Wall with a light gradient over a wooden plank floor, both with some texture."""
    w, h = size
    horizon = int(h * 0.62)
    y = np.arange(h, dtype=np.float32)[:, None, None]
    wall = np.array([200 + hue, 215, 230 - hue], np.float32) * (0.8 + 0.25 * (1 - y / h))
    img = np.broadcast_to(wall, (h, w, 3)).copy()
    fy, xs = np.mgrid[0:h - horizon, 0:w].astype(np.float32)
    u = xs + fy * 0.4  # planks lean a little, as if seen in perspective
    plank = (u // 40) % 2
    grain = np.sin(u * 0.9 + 3 * np.sin(fy * 0.15 + plank * 2)) * 6  # streaks along the boards
    wood = np.where(plank[..., None] == 1, [150, 100, 60], [135, 88, 52]) + grain[..., None]
    img[horizon:] = wood * (0.75 + 0.35 * fy[..., None] / (h - horizon))
    # Smooth blotches instead of per-pixel noise: photo-like unevenness that still compresses well.
    blotch = rng.normal(0, 1, (h // 16 + 2, w // 16 + 2)).astype(np.float32)
    blotch = np.array(Image.fromarray(blotch).resize((w, h), Image.BICUBIC))
    img += blotch[..., None] * 3
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), horizon


def render(shot, robot, rng):
    w, h = shot["size"]
    bg, horizon = background((w, h), shot["hue"], rng)
    bg = bg.resize((w * SS, h * SS), Image.BILINEAR)
    r = robot.transpose(Image.FLIP_LEFT_RIGHT) if shot["mirror"] else robot
    scale = shot["height"] * SS / r.height
    r = r.resize((int(r.width * scale), int(r.height * scale)), Image.LANCZOS)
    r = r.rotate(shot["tilt"], resample=Image.BICUBIC, expand=True)
    r = r.crop(r.getbbox())  # drop the empty margin, so the feet (and shadow) sit at feet_y
    cx = w * SS // 2 + shot["dx"] * SS
    feet_y = min(h * SS - 8 * SS, horizon * SS + r.height // 3)
    x0, y0 = cx - r.width // 2, feet_y - r.height
    # a soft contact shadow grounds the toy on the floor
    shadow = Image.new("L", bg.size, 0)
    ImageDraw.Draw(shadow).ellipse([x0 + r.width * 0.15, feet_y - 10 * SS, x0 + r.width * 0.85, feet_y + 8 * SS], 110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(6 * SS))
    bg.paste((30, 20, 15), mask=shadow)
    bg.paste(r, (x0, y0), r)
    return bg.resize((w, h), Image.LANCZOS)


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    robot = draw_robot()
    for i, shot in enumerate(SHOTS):
        path = os.path.join(out_dir, f"toy_{i:02d}.png")
        render(shot, robot, rng).save(path, optimize=True)
        print(f"{path}  {shot['size'][0]}x{shot['size'][1]}  {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "sks_toy"))
