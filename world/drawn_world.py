"""The drawn world: flat pictures of a few kinds of things in a few places, with their captions.

Every picture is one object (toy, bucket, dog, cup, ball) standing in one scene (plain room,
beach, snow, grass), drawn with PIL in random colours, sizes and places, captioned
"a photo of <object>" plus " on the beach", " in the snow" or " on the grass" (nothing for the
plain room). The base model of models/drawn-world is trained on these pictures, so it knows
these words and nothing else; the classifier of world/classifier.py is trained on them too.

The DreamBooth subject (examples/sks_toy) is one particular toy of this world: a red body, a
yellow head, a blue antenna ball and a white panel. The world's own toys never have both the red
body and the yellow head, so the base model cannot draw the subject before DreamBooth teaches it.

Drawing is resolution independent: coordinates are in units of a 64 px picture, scaled by the
canvas height, so the subject photos can be drawn larger than the training pictures.
"""
import numpy as np
from PIL import Image, ImageDraw

OBJECTS = ("toy", "bucket", "dog", "cup", "ball")
SCENES = ("plain", "beach", "snow", "grass")
SCENE_WORDS = {"plain": "", "beach": " on the beach", "snow": " in the snow", "grass": " on the grass"}
# Every word of every caption and of the demo's prompts, for the tokenizer's merges.
WORDS = ["a", "photo", "of", "sks", "the", "on", "in", *OBJECTS, "beach", "snow", "grass"]

SUBJECT_COLOURS = dict(body=(205, 35, 40), head=(250, 205, 40), antenna=(40, 90, 220))


def caption(obj, scene):
    return f"a photo of {obj}{SCENE_WORDS[scene]}"


class Canvas:
    """An ImageDraw whose coordinates are in units of a 64-pixel-high picture."""

    def __init__(self, image):
        self.image, self.draw, self.u = image, ImageDraw.Draw(image), image.height / 64.0

    def xy(self, *v):
        return [round(c * self.u) for c in v]

    def rect(self, x0, y0, x1, y1, fill):
        self.draw.rectangle(self.xy(x0, y0, x1, y1), fill=fill)

    def ellipse(self, x0, y0, x1, y1, fill):
        self.draw.ellipse(self.xy(x0, y0, x1, y1), fill=fill)

    def polygon(self, points, fill):
        self.draw.polygon([tuple(self.xy(*p)) for p in points], fill=fill)

    def line(self, points, fill, width):
        self.draw.line([tuple(self.xy(*p)) for p in points], fill=fill, width=max(1, round(width * self.u)))

    def arc(self, box, start, end, fill, width):
        self.draw.arc(self.xy(*box), start, end, fill=fill, width=max(1, round(width * self.u)))


def jitter(rng, colour, amount=20):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def scene(c, rng, kind, width):
    """Paint a background; returns the y of the ground line objects stand on (in 64-units)."""
    w = width  # in 64-units: wider canvases are wider than 64
    if kind == "plain":  # a pale wall over a floor of some dull colour
        ground = float(rng.uniform(36, 44))
        c.rect(0, 0, w, ground, jitter(rng, (200, 205, 215), 30))
        c.rect(0, ground, w, 64, jitter(rng, (140, 110, 85), 35))
    elif kind == "beach":  # sky, sea, sand
        ground = float(rng.uniform(36, 44))
        sea = ground - float(rng.uniform(8, 14))
        c.rect(0, 0, w, sea, jitter(rng, (130, 190, 240), 20))
        c.rect(0, sea, w, ground, jitter(rng, (30, 90, 185), 25))
        c.rect(0, ground, w, 64, jitter(rng, (235, 210, 150), 15))
    elif kind == "snow":  # grey sky, white ground, falling flakes
        ground = float(rng.uniform(34, 42))
        c.rect(0, 0, w, ground, jitter(rng, (150, 160, 180), 20))
        c.rect(0, ground, w, 64, jitter(rng, (245, 245, 250), 8))
        for _ in range(int(rng.integers(15, 30))):
            x, y, r = rng.uniform(0, w), rng.uniform(0, ground), rng.uniform(0.6, 1.3)
            c.ellipse(x - r, y - r, x + r, y + r, (255, 255, 255))
    else:  # grass: blue sky, green field with darker blades
        ground = float(rng.uniform(34, 42))
        c.rect(0, 0, w, ground, jitter(rng, (150, 200, 245), 20))
        field = jitter(rng, (70, 160, 60), 20)
        c.rect(0, ground, w, 64, field)
        dark = tuple(int(v * 0.7) for v in field)
        for _ in range(int(rng.integers(20, 40))):
            x, y = rng.uniform(0, w), rng.uniform(ground + 2, 64)
            c.line([(x, y), (x + rng.uniform(-1, 1), y - 2.5)], dark, 0.8)
    return ground


def bright(rng):
    """A saturated colour: objects stand out of every background."""
    hue = rng.random()
    rgb = np.array([abs(hue * 6 - 3) - 1, 2 - abs(hue * 6 - 2), 2 - abs(hue * 6 - 4)]).clip(0, 1)
    return tuple(int(v) for v in 40 + rgb * 200)


def toy_colours(rng):
    """A world toy's colours: anything but the subject's red body with a yellow head."""
    while True:
        body, head, antenna = bright(rng), bright(rng), bright(rng)
        red_body = body[0] > 150 and body[1] < 110 and body[2] < 110
        yellow_head = head[0] > 180 and head[1] > 150 and head[2] < 120
        if not (red_body and yellow_head) and body != head:
            return dict(body=body, head=head, antenna=antenna)


def toy(c, x, ground, size, colours, flip=False):
    """A robot toy: box body with a white panel, round head, legs, one antenna to one side."""
    s = size / 24.0  # the toy is about 24 units high at size 24
    bw, bh = 12 * s, 9 * s
    grey, dark = (150, 150, 160), (60, 60, 70)
    feet = ground + 3 * s
    for lx in (x - 4.5 * s, x + 1.5 * s):  # legs
        c.rect(lx, feet - 4 * s, lx + 3 * s, feet, grey)
    top = feet - 4 * s - bh
    c.rect(x - bw / 2, top, x + bw / 2, top + bh, colours["body"])
    c.rect(x - bw / 2 + 2.5 * s, top + 2 * s, x + bw / 2 - 2.5 * s, top + bh - 2.5 * s, (235, 235, 225))
    r = 4.5 * s
    hy = top - r + 0.5 * s
    side = -1 if flip else 1
    c.line([(x + side * 2 * s, hy - r + 1 * s), (x + side * 4.5 * s, hy - r - 3 * s)], dark, 0.9 * s)
    c.ellipse(x + side * 4.5 * s - 1.6 * s, hy - r - 4.6 * s, x + side * 4.5 * s + 1.6 * s, hy - r - 1.4 * s,
              colours["antenna"])
    c.ellipse(x - r, hy - r, x + r, hy + r, colours["head"])
    for ex in (x - 1.8 * s, x + 1.8 * s):  # eyes
        c.ellipse(ex - 0.7 * s, hy - 1.2 * s, ex + 0.7 * s, hy + 0.2 * s, (20, 20, 30))


def bucket(c, rng, x, ground, size):
    w, h = 0.9 * size, 0.8 * size
    bottom, top = ground + 2, ground + 2 - h
    colour = bright(rng)
    c.arc((x - w / 2, top - w / 2, x + w / 2, top + w / 2), 180, 360, (70, 70, 80), 1.0)
    c.polygon([(x - w / 2, top), (x + w / 2, top), (x + w / 2 - w * 0.18, bottom), (x - w / 2 + w * 0.18, bottom)],
              colour)
    c.rect(x - w / 2, top, x + w / 2, top + 1.5, tuple(int(v * 0.75) for v in colour))  # rim


def dog(c, rng, x, ground, size, flip):
    palette = [(120, 75, 40), (40, 35, 30), (225, 215, 200), (190, 140, 70), (130, 130, 135)]
    colour = jitter(rng, palette[int(rng.integers(len(palette)))], 12)
    ear = tuple(int(v * 0.6) for v in colour)
    s, side = size / 20.0, -1 if flip else 1
    body_y = ground - 6 * s
    for lx in (-6, -3.5, 3, 5.5):  # legs
        c.rect(x + lx * s - 0.8 * s, body_y, x + lx * s + 0.8 * s, ground + 2 * s, colour)
    c.ellipse(x - 8 * s, body_y - 4 * s, x + 8 * s, body_y + 3 * s, colour)
    c.line([(x - side * 7.5 * s, body_y - 1.5 * s), (x - side * 11 * s, body_y - 6 * s)], colour, 1.4 * s)  # tail
    hx, hy = x + side * 8.5 * s, body_y - 5 * s
    c.ellipse(hx - 4 * s, hy - 3.5 * s, hx + 4 * s, hy + 3.5 * s, colour)
    c.ellipse(hx + side * 2 * s - 2.5 * s, hy - 0.5 * s, hx + side * 2 * s + 3 * s, hy + 3 * s, colour)  # muzzle
    c.ellipse(hx - side * 1.5 * s - 1.6 * s, hy - 2.5 * s, hx - side * 1.5 * s + 1.6 * s, hy + 3.5 * s, ear)
    c.ellipse(hx + side * 1.2 * s - 0.6 * s, hy - 1.6 * s, hx + side * 1.2 * s + 0.6 * s, hy - 0.4 * s, (15, 15, 15))
    c.ellipse(hx + side * 5 * s - 0.9 * s, hy + 0.2 * s, hx + side * 5 * s + 0.9 * s, hy + 1.6 * s, (15, 15, 15))


def cup(c, rng, x, ground, size, flip):
    colour = bright(rng)
    w, h = 0.7 * size, 0.75 * size
    bottom, top = ground + 2, ground + 2 - h
    side = -1 if flip else 1
    hx = x + side * w / 2
    c.arc((hx - 0.35 * w, top + 0.2 * h, hx + 0.35 * w, top + 0.75 * h), 0, 360, colour, 0.12 * size)
    c.rect(x - w / 2, top, x + w / 2, bottom, colour)
    c.ellipse(x - w / 2, top - 0.12 * w, x + w / 2, top + 0.12 * w, (60, 40, 30))  # coffee seen from above


def ball(c, rng, x, ground, size):
    colour, stripe = bright(rng), bright(rng)
    r = 0.45 * size
    cy = ground + 2 - r
    c.ellipse(x - r, cy - r, x + r, cy + r, colour)
    c.rect(x - r * 0.95, cy - r * 0.18, x + r * 0.95, cy + r * 0.18, stripe)
    c.ellipse(x - r * 0.55, cy - r * 0.7, x - r * 0.15, cy - r * 0.35, (255, 255, 255))  # highlight


def draw(obj, scene_kind, rng, size=64, colours=None, width=None, with_mask=False):
    """One picture (PIL RGB, size px high, width px wide) of obj in scene_kind. colours fixes a
    toy's colours (the subject); otherwise they are drawn from rng. with_mask: (picture, mask), the
    mask a boolean array of the pixels the object changed; the picture and rng are the same."""
    width = width or size
    image = Image.new("RGB", (width, size))
    c = Canvas(image)
    units_wide = 64.0 * width / size
    ground = scene(c, rng, scene_kind, units_wide)
    background = np.asarray(image).copy() if with_mask else None
    thing = float(rng.uniform(20, 30))
    x = float(rng.uniform(thing * 0.6, units_wide - thing * 0.6))
    flip = bool(rng.random() < 0.5)
    if obj == "toy":  # drawn larger than the rest: its colours are what DreamBooth must learn
        toy(c, x, ground + float(rng.uniform(0, 6)), thing * 1.3, colours or toy_colours(rng), flip)
    elif obj == "bucket":
        bucket(c, rng, x, ground + float(rng.uniform(0, 8)), thing)
    elif obj == "dog":
        dog(c, rng, x, ground + float(rng.uniform(2, 10)), thing, flip)
    elif obj == "cup":
        cup(c, rng, x, ground + float(rng.uniform(0, 8)), thing * 0.8, flip)
    else:
        ball(c, rng, x, ground + float(rng.uniform(0, 8)), thing * 0.8)
    if with_mask:
        return image, (np.asarray(image) != background).any(axis=2)
    return image


def samples(n_per_pair, seed, with_mask=False):
    """n_per_pair pictures of every (object, scene) pair: [(image, object, scene)], a fixed order;
    with_mask: [((image, object mask), object, scene)], the same pictures."""
    rng = np.random.default_rng(seed)
    out = []
    for obj in OBJECTS:
        for kind in SCENES:
            out += [(draw(obj, kind, rng, with_mask=with_mask), obj, kind) for _ in range(n_per_pair)]
    return out


def subject(kind, rng, size=64, width=None, with_mask=False):
    """The DreamBooth subject, the red-bodied yellow-headed toy, in scene kind (with_mask: as draw)."""
    return draw("toy", kind, rng, size=size, colours=SUBJECT_COLOURS, width=width, with_mask=with_mask)
