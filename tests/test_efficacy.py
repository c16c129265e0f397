"""On the shipped base model of the drawn world (models/drawn-world), the demo's DreamBooth run must do
what the DreamBooth paper claims: the instance prompt draws the subject, also in a scene the photos do
not show when the prompt names it, and with prior preservation the class prompt stays varied and does not
turn into the subject.
A training bug that leaves every run consistent but wrong (a latent scale, a loss target, a sign)
breaks these, and the judge of world/classifier.py sees it; the equivalence tests elsewhere compare runs
with each other and cannot. bench/EFFICACY.md has the same measurements with more samples and the runs
without each of the demo's choices; the thresholds below sit well inside what it measured for the demo's
seed (0; its runs with other training seeds do less, which no test claims)."""
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, run_cli

sys.path.insert(0, os.path.join(ROOT, "world"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
BASE = os.path.join(ROOT, "models", "drawn-world")
SAMPLES = 8  # per prompt and model, seeds 0-7 (bench/efficacy.py uses 0-15)


@pytest.fixture(scope="module")
def judge():
    from classifier import Judge

    return Judge()


def samples(model, prompt, n, seed=0):
    from efficacy import sample_prompts

    return sample_prompts(model, [prompt], n, seed)[prompt]


def test_the_judge_knows_fresh_drawn_pictures(judge):
    import drawn_world
    from classifier import drawn_set

    data = drawn_set(2, seed=4321)  # a seed neither the judge nor the base model was trained on
    answer = judge([d[0] for d in data])
    assert np.mean([drawn_world.OBJECTS.index(a) == d[1] for a, d in zip(answer["object"], data)]) >= 0.9
    assert np.mean([drawn_world.SCENES.index(a) == d[2] for a, d in zip(answer["scene"], data)]) >= 0.9
    assert np.mean((answer["subject"] > 0.5) == np.array([d[3] > 0.5 for d in data])) >= 0.9


def test_the_judge_can_learn_from_blurred_copies_too():
    """world/classifier.py --max_blur: each training picture also comes blurred, with its own labels, the
    blurred copy smoother than the picture (a small base's samples are blurrier than its VAE's decodes)."""
    from classifier import drawn_set, labelled

    data = drawn_set(1, seed=5)
    images, labels = labelled(data, None)
    blurred, blurred_labels = labelled(data, None, max_blur=3.0)
    assert len(blurred) == 2 * len(images) and np.array_equal(blurred_labels, np.concatenate([labels, labels]))
    assert all(a is b for a, b in zip(images, blurred))

    def roughness(im):  # mean absolute difference of neighbouring pixels
        return np.abs(np.diff(np.asarray(im, np.float32), axis=1)).mean()

    smoother = [roughness(copy) < roughness(im) for im, copy in zip(images, blurred[len(images):])]
    assert np.mean(smoother) >= 0.9, smoother


def test_the_object_masks_belong_to_the_pictures_the_base_is_trained_on():
    """world/build_base.py --objects_steps weighs the object's latent pixels by these masks: drawing with a
    mask must give the very pictures (and random draws) of world/drawn_world.samples, and each mask must
    cover the object, not the scene: the pixels where the picture differs from its scene alone."""
    import drawn_world

    plain, masked = drawn_world.samples(2, seed=7), drawn_world.samples(2, seed=7, with_mask=True)
    assert len(plain) == len(masked) == 40
    for (image, obj, kind), ((same, mask), obj2, kind2) in zip(plain, masked):
        assert (obj, kind) == (obj2, kind2) and np.array_equal(np.asarray(image), np.asarray(same))
        assert 0.02 < mask.mean() < 0.4, (obj, kind, mask.mean())
    # independent of draw(): the scene alone, from the same random state, differs from the picture exactly
    # inside the mask
    from PIL import Image

    rng, again = np.random.default_rng(3), np.random.default_rng(3)
    (image, mask) = drawn_world.draw("cup", "beach", rng, with_mask=True)
    background = Image.new("RGB", (64, 64))
    drawn_world.scene(drawn_world.Canvas(background), again, "beach", 64.0)
    assert np.array_equal((np.asarray(image) != np.asarray(background)).any(axis=2), mask)


def test_the_example_photos_are_what_draw_subject_makes(tmp_path):
    """examples/draw_subject.py rebuilds examples/sks_toy: every photo's pixels and alpha, and its caption."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import draw_subject
    from PIL import Image

    draw_subject.main(str(tmp_path))
    shipped = os.path.join(ROOT, "examples", "sks_toy")
    for name in sorted(os.listdir(tmp_path)):
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / name)),
                                  np.asarray(Image.open(os.path.join(shipped, name)))), name
        else:
            assert (tmp_path / name).read_text() == open(os.path.join(shipped, name)).read(), name
    assert len(os.listdir(tmp_path)) == 10


@pytest.mark.parametrize("factor", [8, 4])
def test_the_base_builder_makes_latents_and_object_weights_of_its_latent_factor(factor):
    """world/build_base.py --latent_factor: the VAE turns a 64x64 picture into a (64/factor)^2 latent the UNet
    denoises, and the object weights have that shape, heavier exactly where a latent pixel sees the object."""
    import paddle

    import drawn_world
    from build_base import Settings, build_models, object_weights

    _, _, vae, unet = build_models(0, factor)
    side = 64 // factor
    with paddle.no_grad():
        latent = vae.encode(paddle.zeros([1, 3, 64, 64])).latent_dist.mean
        out = unet(latent, paddle.to_tensor([10]), paddle.zeros([1, 4, 64])).sample
    assert latent.shape == out.shape == [1, 4, side, side]
    settings = Settings(images_per_pair=1, latent_factor=factor)
    weights = object_weights(settings, 20)
    assert weights.shape == (40, side, side)
    (_, mask), _, _ = drawn_world.samples(1, seed=settings.seed + 100, with_mask=True)[0]
    seen = mask.reshape(side, factor, side, factor).any(axis=(1, 3))
    assert weights[0][seen].min() > weights[0][~seen].max()


@pytest.mark.parametrize("obj,scene", [("bucket", "beach"), ("dog", "snow"), ("ball", "grass")])
def test_the_base_model_draws_the_prompted_object_and_scene(judge, obj, scene):
    """bench/EFFICACY.md measures all 20 prompts of the world; three of them here."""
    import drawn_world

    answer = judge(samples(BASE, drawn_world.caption(obj, scene), 4))
    assert sum(a == obj for a in answer["object"]) >= 3, answer["object"]
    assert sum(a == scene for a in answer["scene"]) >= 3, answer["scene"]


@pytest.fixture(scope="module")
def measured(judge, tmp_path_factory):
    """The demo exactly as the README runs it (bash run_demo.sh: prior preservation, text encoder,
    every update), then the base model and the result judged on the demo's three prompts."""
    from efficacy import BEACH, CLASS, INSTANCE, judge_samples, subject_photos

    demo = tmp_path_factory.mktemp("efficacy") / "demo"
    result = run_cli(["bash", "run_demo.sh"], env={"DEMO_DIR": str(demo)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    photos = judge(subject_photos())["features"]
    out = {}
    for name, model in (("base", BASE), ("trained", demo / "dreambooth-model")):
        out[name] = {prompt: judge_samples(judge, samples(model, prompt, SAMPLES), photos)
                     for prompt in (INSTANCE, BEACH, CLASS)}
    return out, INSTANCE, BEACH, CLASS


def test_the_demo_teaches_the_subject(measured):
    """Subject fidelity: none of the base's samples of "a photo of sks toy" is the subject, many of the
    trained model's are (half in bench/EFFICACY.md), and they are closer to the subject photos in the
    judge's features."""
    m, instance, _, _ = measured
    base, trained = m["base"][instance], m["trained"][instance]
    assert base["subject"] <= 1 / SAMPLES, base
    assert trained["subject"] >= 0.25, trained
    assert trained["similarity"] > base["similarity"] + 0.03, (base["similarity"], trained["similarity"])


def test_the_demo_draws_the_subject_on_the_beach_because_the_prompt_says_so(measured):
    """Recontextualisation: "a photo of sks toy on the beach" draws the subject on the beach, a scene
    none of the photos shows, where the base model never draws the subject; and without the words "on
    the beach" the trained model keeps off the beach, so it is the words that put the subject there."""
    m, instance, beach, _ = measured
    base, trained = m["base"][beach], m["trained"][beach]
    assert trained["beach_and_subject"] >= 0.375, trained
    assert base["beach_and_subject"] <= 1 / SAMPLES, base
    assert m["trained"][instance]["scenes"]["beach"] <= 1 / SAMPLES, m["trained"][instance]


def test_the_demo_keeps_the_class_varied_and_apart_from_the_subject(measured):
    """PRES and DIV: with prior preservation "a photo of toy" rarely draws the subject and its samples
    stay about as varied as the base model's."""
    m, _, _, cls = measured
    base, trained = m["base"][cls], m["trained"][cls]
    assert trained["subject"] <= 0.25, trained
    assert trained["diversity"] >= 0.8 * base["diversity"], (base["diversity"], trained["diversity"])
