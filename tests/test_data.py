"""Odd image files load upright as 8-bit RGB, and are resized and cropped without squashing."""
import logging
import os

import numpy as np
import pytest
from PIL import Image

from conftest import load_weights, logged_scalars, run_train, train_args


def _noise(height, width, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return (rng.random(shape) * 255).astype(np.uint8)


def make_odd_images(folder):
    """One file of every awkward kind; returns {kind: path}."""
    os.makedirs(folder, exist_ok=True)
    paths = {}

    def save(kind, name, image, **kw):
        paths[kind] = os.path.join(folder, name)
        image.save(paths[kind], **kw)

    save("grey", "grey.png", Image.fromarray(_noise(60, 80, 1), "L"))
    rgba = _noise(64, 72, 4, seed=1)
    rgba[:, :36, 3] = 0  # left half fully transparent
    rgba[:, 36:, 3] = 255
    save("rgba", "rgba.png", Image.fromarray(rgba, "RGBA"))
    save("cmyk", "cmyk.jpg", Image.new("CMYK", (90, 50), (0, 255, 0, 0)))  # pure magenta
    save("palette", "palette.png", Image.fromarray(_noise(50, 70, seed=2)).convert("P"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("exif", "rotated.jpg", Image.fromarray(_noise(40, 80, seed=3)), exif=exif.tobytes())
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    save("grey16", "grey16.png", Image.fromarray(ramp))
    save("upper_png", "UPPER.PNG", Image.fromarray(_noise(64, 64, seed=4)))
    save("upper_jpg", "UPPER2.JPG", Image.fromarray(_noise(100, 64, seed=5)))
    return paths


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return make_odd_images(str(tmp_path_factory.mktemp("odd")))


def args_for(*extra):
    import train_dreambooth

    return train_dreambooth.parse_args(["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                        "--instance_prompt", "p", *map(str, extra)])


# ----------------------------------------------------------------------------------------------
# open_rgb


@pytest.mark.parametrize("kind", ["grey", "rgba", "cmyk", "palette", "exif", "grey16", "upper_png", "upper_jpg"])
def test_every_kind_opens_as_8bit_rgb(odd, kind):
    from train_dreambooth import open_rgb

    image = open_rgb(odd[kind])
    assert image.mode == "RGB"
    assert np.asarray(image).dtype == np.uint8


def test_grey_keeps_its_values_in_all_three_channels(odd):
    from train_dreambooth import open_rgb

    pixels = np.asarray(open_rgb(odd["grey"]))
    assert np.array_equal(pixels[..., 0], np.asarray(Image.open(odd["grey"])))
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_transparent_parts_become_white_and_opaque_parts_keep_their_colour(odd):
    from train_dreambooth import open_rgb

    pixels = np.asarray(open_rgb(odd["rgba"]))
    source = np.asarray(Image.open(odd["rgba"]))
    assert (pixels[:, :36] == 255).all(), "transparent pixels are not white"
    assert np.array_equal(pixels[:, 36:], source[:, 36:, :3])


def test_palette_with_transparency_becomes_white(tmp_path):
    from train_dreambooth import open_rgb

    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    image.paste(1, (8, 0, 16, 16))
    image.save(tmp_path / "p.png", transparency=0)
    pixels = np.asarray(open_rgb(tmp_path / "p.png"))
    assert (pixels[:, :8] == 255).all() and (pixels[:, 8:] == [0, 0, 255]).all()


def test_palette_colours_are_kept(odd):
    from train_dreambooth import open_rgb

    assert np.array_equal(np.asarray(open_rgb(odd["palette"])), np.asarray(Image.open(odd["palette"]).convert("RGB")))


def test_cmyk_jpeg_keeps_its_colour(odd):
    from train_dreambooth import open_rgb

    r, g, b = np.asarray(open_rgb(odd["cmyk"])).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b > 200, (r, g, b)  # magenta, not inverted or grey


def test_exif_orientation_is_applied(odd):
    from train_dreambooth import open_rgb

    stored = Image.open(odd["exif"])
    assert stored.size == (80, 40)
    upright = open_rgb(odd["exif"])
    assert upright.size == (40, 80), "EXIF orientation 6 ignored: width and height not swapped"
    # orientation 6 means: rotate the stored pixels 90 degrees clockwise
    expected = np.asarray(stored.convert("RGB").transpose(Image.ROTATE_270), dtype=float)
    assert np.abs(np.asarray(upright, dtype=float) - expected).mean() < 1


def test_16bit_grey_is_rescaled_not_clipped(odd):
    from train_dreambooth import open_rgb

    assert Image.open(odd["grey16"]).mode.startswith("I")
    pixels = np.asarray(open_rgb(odd["grey16"]))[..., 0].astype(float)
    ramp = np.asarray(Image.open(odd["grey16"]), dtype=float) / 257.0
    assert (pixels == 255).mean() < 0.05, "16-bit values were clipped to white"
    assert np.abs(pixels - ramp).max() <= 2 and pixels.min() == 0


def test_16bit_mid_grey_stays_mid_grey(tmp_path):
    from train_dreambooth import open_rgb

    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(tmp_path / "mid.png")
    assert Image.open(tmp_path / "mid.png").mode == "I;16"
    assert np.abs(np.asarray(open_rgb(tmp_path / "mid.png")).astype(int) - 128).max() <= 1


# ----------------------------------------------------------------------------------------------
# list_images


def test_list_images_takes_any_case_skips_others_with_one_warning_and_ignores_hidden(tmp_path, caplog):
    from train_dreambooth import list_images

    for name in ["a.png", "B.JPG", "c.PNG", "d.jpeg", "e.Webp", ".hidden.png", "._a.png"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    for name in ["notes.md", "data.json", ".DS_Store", "a.txt"]:
        (tmp_path / name).write_text("x")
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        found = list_images(str(tmp_path), "--instance_data_dir")
    assert [os.path.basename(p) for p in found] == ["B.JPG", "a.png", "c.PNG", "d.jpeg", "e.Webp"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "notes.md" in warnings[0] and "data.json" in warnings[0]
    assert ".DS_Store" not in warnings[0] and ".hidden" not in warnings[0]


def test_list_images_of_only_images_warns_nothing(tmp_path, caplog):
    from train_dreambooth import list_images

    for name in ["x.png", "y.PNG"]:
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    with caplog.at_level(logging.WARNING, logger="dreambooth"):
        assert len(list_images(str(tmp_path), "--instance_data_dir")) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ----------------------------------------------------------------------------------------------
# resize_to_cover, crop_box, to_pixels


@pytest.mark.parametrize("size", [(200, 100), (100, 200), (64, 64), (30, 20), (97, 61), (1000, 999)])
@pytest.mark.parametrize("height,width", [(64, 64), (64, 96), (96, 64)])
def test_resize_covers_keeps_aspect_and_crops_exactly(size, height, width):
    from train_dreambooth import crop_box, resize_to_cover

    image = Image.new("RGB", size)
    resized = resize_to_cover(image, height, width)
    w, h = resized.size
    assert w >= width and h >= height
    assert w == width or h == height, "scaled more than needed to cover"
    scale = max(height / size[1], width / size[0])
    assert abs(w - size[0] * scale) <= 1 and abs(h - size[1] * scale) <= 1, "aspect ratio changed (squashed)"
    center = crop_box(resized, height, width, True, None)
    assert center == ((w - width) // 2, (h - height) // 2, (w - width) // 2 + width, (h - height) // 2 + height)
    for seed in range(20):
        box = crop_box(resized, height, width, False, np.random.default_rng(seed))
        assert 0 <= box[0] and 0 <= box[1] and box[2] <= w and box[3] <= h
        assert resized.crop(box).size == (width, height)


def test_random_crops_vary_and_stay_inside():
    from train_dreambooth import crop_box, resize_to_cover

    resized = resize_to_cover(Image.new("RGB", (300, 100)), 64, 64)
    boxes = {crop_box(resized, 64, 64, False, np.random.default_rng(s)) for s in range(30)}
    assert len(boxes) > 5 and all(b[1] == 0 and b[3] == 64 for b in boxes)
    assert min(b[0] for b in boxes) >= 0 and max(b[2] for b in boxes) <= resized.width


def test_a_circle_stays_round():
    """No squashing, checked on content: a centred disc in a wide image is still round after the crop."""
    from train_dreambooth import crop_box, resize_to_cover

    yy, xx = np.mgrid[:100, :300]
    disc = ((xx - 150) ** 2 + (yy - 50) ** 2 < 40 ** 2).astype(np.uint8) * 255
    resized = resize_to_cover(Image.fromarray(disc).convert("RGB"), 64, 96)
    crop = np.asarray(resized.crop(crop_box(resized, 64, 96, True, None)))[..., 0] > 127
    rows, cols = np.nonzero(crop)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 2


def test_to_pixels_range_layout_and_flip():
    from train_dreambooth import to_pixels

    assert (to_pixels(Image.new("RGB", (5, 3), "black"), False) == -1).all()
    assert (to_pixels(Image.new("RGB", (5, 3), "white"), False) == 1).all()
    image = Image.fromarray(_noise(3, 5))
    pixels = to_pixels(image, False)
    assert pixels.shape == (3, 3, 5) and pixels.dtype == np.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    marked = Image.new("RGB", (5, 3), "black")
    marked.putpixel((1, 2), (255, 0, 0))  # x=1, y=2 red
    out = to_pixels(marked, False)
    assert out[0, 2, 1] == 1 and out[1, 2, 1] == -1 and out[2, 2, 1] == -1  # CHW, channel 0 is red
    assert np.array_equal(to_pixels(marked, True), out[:, :, ::-1])


@pytest.mark.parametrize("center", [False, True])
def test_train_image_samples_are_height_by_width(odd, center):
    from train_dreambooth import TrainImage, open_rgb

    args = args_for("--height", 64, "--width", 96, *(["--center_crop"] if center else []))
    for path in odd.values():
        item = TrainImage(open_rgb(path), "p", args)
        for seed in range(3):
            pixels, flip = item.pixels(np.random.default_rng(seed), args)
            assert pixels.shape == (3, 64, 96) and not flip
            assert -1 <= pixels.min() and pixels.max() <= 1


# ----------------------------------------------------------------------------------------------
# Training on all of them


def test_training_on_odd_images_at_64x96(tiny_model, odd, tmp_path, monkeypatch):
    import train_dreambooth

    shapes = []
    real = train_dreambooth.to_pixels

    def recording(image, flip):
        pixels = real(image, flip)
        shapes.append(pixels.shape)
        return pixels

    monkeypatch.setattr(train_dreambooth, "to_pixels", recording)
    folder = os.path.dirname(next(iter(odd.values())))
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, folder, out, "--resolution", None, "--height", 64, "--width", 96,
                          "--max_train_steps", 4, "--train_batch_size", 2))
    assert len(shapes) == 4 * 2, shapes  # one epoch of the 8 images; random crops: every sample is cut fresh
    assert set(shapes) == {(3, 64, 96)}
    losses = logged_scalars(out, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4] and np.isfinite(list(losses.values())).all()
    base, trained = load_weights(tiny_model), load_weights(out)
    assert any(not np.array_equal(base[k], trained[k]) for k in base)
