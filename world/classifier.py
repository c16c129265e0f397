"""The judge: a small CNN that says what a 64x64 picture of the drawn world shows.

    python world/classifier.py [--vae models/drawn-world/vae] [--out models/drawn-world-judge] [--max_blur 3]

Three answers per picture: its object (toy, bucket, dog, cup, ball), its scene (plain, beach,
snow, grass), and whether it is the DreamBooth subject (the red-bodied, yellow-headed toy of
examples/sks_toy), as a probability. The features before these heads (a 64-vector) measure how
alike two pictures are, the role DINO features play in the DreamBooth paper's metrics.

It is trained on pictures drawn by world/drawn_world.py (a seed the base model never saw), half
of them passed through the base model's VAE, so it also knows what the VAE's decodes of the
world look like, which is how every sample of the base model looks. The subject is one toy in
three (in every scene); every other toy has other colours. --max_blur R adds a copy of every
picture blurred by a radius of up to R pixels: a small base model's samples are blurrier than its
VAE's decodes, and a judge that never saw blur stops recognising the subject at a radius of 2.
Held-out accuracy (drawn, through the VAE, drawn and blurred by radius 2) is written to OUT/judge.json.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import drawn_world  # noqa: E402

DEFAULT_DIR = os.path.join(ROOT, "models", "drawn-world-judge")
VAE_DIR = os.path.join(ROOT, "models", "drawn-world", "vae")
SIZE = 32  # pictures are judged at 32x32: colours and coarse shapes are what tell things apart here


def network():
    import paddle.nn as nn

    def block(cin, cout):
        return [nn.Conv2D(cin, cout, 3, padding=1), nn.BatchNorm2D(cout), nn.ReLU(), nn.MaxPool2D(2)]

    features = nn.Sequential(*block(3, 24), *block(24, 48), *block(48, 64), nn.AdaptiveAvgPool2D(1), nn.Flatten())
    heads = nn.Linear(64, len(drawn_world.OBJECTS) + len(drawn_world.SCENES) + 1)
    return nn.Sequential(features, heads)


def as_input(images):
    import paddle
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) for im in images]
    return paddle.to_tensor(np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1)


class Judge:
    """Load the trained judge; judge(images) answers for a list of PIL images."""

    def __init__(self, folder=DEFAULT_DIR):
        import paddle
        from safetensors.numpy import load_file

        self.model = network()
        state = load_file(os.path.join(folder, "judge.safetensors"))
        self.model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        self.model.eval()

    def __call__(self, images):
        import paddle

        with paddle.no_grad():
            x = as_input(images)
            features = self.model[0](x)
            logits = self.model[1](features).numpy()
        n_obj, n_scene = len(drawn_world.OBJECTS), len(drawn_world.SCENES)
        return dict(object=[drawn_world.OBJECTS[i] for i in logits[:, :n_obj].argmax(1)],
                    scene=[drawn_world.SCENES[i] for i in logits[:, n_obj:n_obj + n_scene].argmax(1)],
                    subject=1 / (1 + np.exp(-logits[:, -1])), features=features.numpy())


def drawn_set(n_per_pair, seed, subject_share=1 / 3):
    """[(image, object index, scene index, is subject)] of every pair; a third of the toys are the subject."""
    rng = np.random.default_rng(seed)
    out = []
    for o, obj in enumerate(drawn_world.OBJECTS):
        for s, kind in enumerate(drawn_world.SCENES):
            for _ in range(n_per_pair):
                is_subject = obj == "toy" and rng.random() < subject_share
                colours = drawn_world.SUBJECT_COLOURS if is_subject else None
                out.append((drawn_world.draw(obj, kind, rng, colours=colours), o, s, float(is_subject)))
    return out


def through_vae(vae, images):
    """The VAE's decode of each picture's posterior mean: how the base model's samples look."""
    import paddle
    from PIL import Image

    out = []
    with paddle.no_grad():
        for start in range(0, len(images), 64):
            x = paddle.to_tensor(np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1
                                           for im in images[start:start + 64]]))
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.numpy()
            out += [Image.fromarray(((v.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)) for v in y]
    return out


def labelled(data, vae, max_blur=0.0, seed=0):
    """The drawn pictures, and when a VAE is given, their VAE decodes too, with the same labels; with
    max_blur, a copy of each blurred by a Gaussian of radius up to max_blur pixels, too."""
    from PIL import ImageFilter

    images = [d[0] for d in data]
    labels = np.array([d[1:] for d in data], np.float32)
    if vae is not None:
        images, labels = images + through_vae(vae, images), np.concatenate([labels, labels])
    if max_blur:
        radii = np.random.default_rng([seed, 7]).uniform(0, max_blur, len(images))
        images = images + [im.filter(ImageFilter.GaussianBlur(float(r))) for im, r in zip(images, radii)]
        labels = np.concatenate([labels, labels])
    return images, labels


def losses(logits, labels):
    import paddle
    import paddle.nn.functional as F

    n_obj, n_scene = len(drawn_world.OBJECTS), len(drawn_world.SCENES)
    obj = F.cross_entropy(logits[:, :n_obj], paddle.to_tensor(labels[:, 0].astype(np.int64)))
    scene = F.cross_entropy(logits[:, n_obj:n_obj + n_scene], paddle.to_tensor(labels[:, 1].astype(np.int64)))
    subject = F.binary_cross_entropy_with_logits(logits[:, -1], paddle.to_tensor(labels[:, 2]))
    return obj + scene + subject


def train(vae_dir, out, seed=0, n_per_pair=40, steps=600, batch=64, max_blur=0.0):
    import paddle
    from ppdiffusers import AutoencoderKL
    from safetensors.numpy import save_file

    started = time.time()
    paddle.seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir) if vae_dir else None
    images, labels = labelled(drawn_set(n_per_pair, seed=1000 + seed), vae, max_blur, seed)
    x_all = as_input(images)
    model = network()
    optimizer = paddle.optimizer.Adam(learning_rate=paddle.optimizer.lr.CosineAnnealingDecay(3e-3, steps),
                                      parameters=model.parameters())
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        pick = rng.integers(0, len(images), batch)
        x = paddle.gather(x_all, paddle.to_tensor(pick))
        if rng.random() < 0.5:  # every object is drawn facing both ways
            x = x.flip([3])
        loss = losses(model(x), labels[pick])
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        optimizer._learning_rate.step()
        if step % 100 == 0:
            print(f"judge step {step}: loss {float(loss):.4f}", flush=True)
    model.eval()
    os.makedirs(out, exist_ok=True)
    save_file({k: v.numpy() for k, v in model.state_dict().items()}, os.path.join(out, "judge.safetensors"))
    # Held out: pictures of another seed, drawn, through the VAE, and drawn then blurred (radius 2).
    from PIL import ImageFilter

    judge = Judge(out)
    test_images, test_labels = labelled(drawn_set(10, seed=2000 + seed), vae)
    n = len(test_images) // (2 if vae else 1)
    test_images += [im.filter(ImageFilter.GaussianBlur(2)) for im in test_images[:n]]
    test_labels = np.concatenate([test_labels, test_labels[:n]])
    answer = judge(test_images)
    report = {}
    parts = [("drawn", slice(0, n))] + ([("through the VAE", slice(n, 2 * n))] if vae else []) + \
        [("drawn, blurred (radius 2)", slice(len(test_images) - n, None))]
    for part, sl in parts:
        lab = test_labels[sl]
        report[part] = dict(
            pictures=int(len(lab)),
            object=float(np.mean([drawn_world.OBJECTS.index(a) == b for a, b in zip(answer["object"][sl], lab[:, 0])])),
            scene=float(np.mean([drawn_world.SCENES.index(a) == b for a, b in zip(answer["scene"][sl], lab[:, 1])])),
            subject=float(np.mean((answer["subject"][sl] > 0.5) == (lab[:, 2] > 0.5))))
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    with open(os.path.join(out, "judge.json"), "w") as f:
        json.dump(dict(command=command, seed=seed, vae=os.path.relpath(vae_dir, ROOT) if vae_dir else None,
                       training_pictures=len(images), steps=steps, seconds=round(time.time() - started, 1),
                       held_out_accuracy=report), f, indent=1)
    print(json.dumps(report, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default=VAE_DIR, help="the VAE whose decodes join the training pictures")
    parser.add_argument("--out", default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--max_blur", type=float, default=0.0,
                        help="also train on copies blurred by up to this radius (pixels of a 64x64 picture): "
                             "a small base model's samples are blurrier than its VAE's decodes")
    args = parser.parse_args()
    train(args.vae, args.out, args.seed, steps=args.steps, max_blur=args.max_blur)


if __name__ == "__main__":
    main()
