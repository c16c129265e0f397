"""The loss, gradient accumulation, the lr schedule and data parallel, each against an
independent computation."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import (CLASS_PROMPT, GRADIENT_LIKE, ROOT, TWO_PROCESS_TRAINING, assert_same_weights, logged_scalars,
                      make_images, run_train, train_args)


def test_compute_loss_is_instance_mse_plus_weighted_prior_mse():
    import paddle
    from train_dreambooth import compute_loss, parse_args

    args = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt", "x",
                       "--prior_loss_weight", "0.3"])
    args.prediction_type = "epsilon"
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 4, 4, 8, 8)).astype(np.float32)
    loss = compute_loss(paddle.to_tensor(pred), paddle.to_tensor(target), 2, args)
    by_hand = ((pred[:2] - target[:2]) ** 2).mean() + 0.3 * ((pred[2:] - target[2:]) ** 2).mean()
    assert float(loss) == pytest.approx(by_hand, rel=1e-6)
    # Without class samples it is the plain MSE.
    loss = compute_loss(paddle.to_tensor(pred), paddle.to_tensor(target), 4, args)
    assert float(loss) == pytest.approx(((pred - target) ** 2).mean(), rel=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_split_with_the_prior_batch(prediction_type):
    import paddle
    from train_dreambooth import compute_loss, parse_args

    args = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt", "x",
                       "--prior_loss_weight", "0.5", "--snr_gamma", "5"])
    args.prediction_type = prediction_type
    rng = np.random.default_rng(1)
    pred, target = rng.standard_normal((2, 4, 4, 8, 8)).astype(np.float32)
    snr = np.array([0.5, 20.0, 3.0, 100.0], dtype=np.float32)
    loss = compute_loss(paddle.to_tensor(pred), paddle.to_tensor(target), 2, args, paddle.to_tensor(snr))
    mse = ((pred - target) ** 2).mean(axis=(1, 2, 3))
    denominator = snr + 1 if prediction_type == "v_prediction" else snr
    weighted = mse * np.minimum(snr, 5.0) / denominator
    assert float(loss) == pytest.approx(weighted[:2].mean() + 0.5 * weighted[2:].mean(), rel=1e-5)


def caption_draw(kind):
    """The uniform number that decides whether update 1's instance (kind 0) or class (kind 1) sample
    loses its prompt to --caption_dropout_rate."""
    import train_dreambooth as tdb

    return np.random.default_rng([0, tdb.CAPTION_STREAM, 0, 0, kind]).random()


def first_update_loss_by_hand(model, instance_dir, class_dir, prior_weight, caption_dropout_rate=0.0, masked=False):
    """Rebuild update 1's batch from the trainer's documented randomness (streams keyed by seed,
    epoch and sample) and recompute its loss with numpy and the base models. masked: the instance
    images' alpha weights their squared error, averaged over each 8x8 pixel block of a latent pixel, and
    their colours are used as stored (a transparent part is not whitened)."""
    import paddle
    from ppdiffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel, CLIPTokenizer

    import train_dreambooth as tdb

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    alphas_cumprod = scheduler.alphas_cumprod.numpy().astype(np.float64)

    def image_array(path):  # resize to cover 64x64, center crop, scale to [-1, 1]; and the crop's alpha
        im = Image.open(path)
        alpha = np.asarray(im.getchannel("A"), np.float32) / 255 if im.mode == "RGBA" else None
        im = im.convert("RGB")
        scale = max(64 / im.height, 64 / im.width)
        assert scale == 1 or alpha is None, "the masked case is checked on images that need no resize"
        im = im.resize((max(64, round(im.width * scale)), max(64, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - 64) // 2, (im.height - 64) // 2
        rgb = np.asarray(im.crop((left, top, left + 64, top + 64)), np.float32)
        if alpha is not None:
            alpha = alpha[top:top + 64, left:left + 64]
        return rgb.transpose(2, 0, 1) / 127.5 - 1, alpha

    inst = sorted(os.listdir(instance_dir))
    cls = sorted(os.listdir(class_dir)) if class_dir else []
    item = np.random.default_rng([0, tdb.ORDER_STREAM, 0]).permutation(max(len(inst), len(cls)))[0]
    samples = [(os.path.join(instance_dir, inst[item % len(inst)]), "a photo of sks dog", 0)]
    if cls:
        samples.append((os.path.join(class_dir, cls[item % len(cls)]), CLASS_PROMPT, 1))
    errors = []
    with paddle.no_grad():
        for path, prompt, kind in samples:
            rng = np.random.default_rng([0, tdb.NOISE_STREAM, 0, 0, kind])
            eps = rng.standard_normal((4, 8, 8), dtype=np.float32)
            noise = rng.standard_normal((4, 8, 8), dtype=np.float32)
            t = int(rng.integers(0, 1000))
            pixels, alpha = image_array(path)
            posterior = vae.encode(paddle.to_tensor(pixels[None])).latent_dist
            latent = (posterior.mean.numpy()[0] + posterior.std.numpy()[0] * eps) * vae.config.scaling_factor
            a, b = np.sqrt(alphas_cumprod[t]), np.sqrt(1 - alphas_cumprod[t])
            noisy = a * latent + b * noise
            target = a * noise - b * latent if scheduler.config.prediction_type == "v_prediction" else noise
            if caption_draw(kind) < caption_dropout_rate:
                prompt = ""
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length)["input_ids"]
            states = text_encoder(paddle.to_tensor([ids]))[0]
            pred = unet(paddle.to_tensor(noisy[None].astype(np.float32)), paddle.to_tensor([t]), states).sample
            squared = (pred.numpy()[0].astype(np.float64) - target) ** 2
            if masked and kind == 0:
                weight = alpha.reshape(8, 8, 8, 8).mean(axis=(1, 3))  # one weight per latent pixel
                errors.append(float((squared * weight).sum() / (squared.shape[0] * weight.sum())))
            else:
                errors.append(float(squared.mean()))
    return errors[0] + prior_weight * sum(errors[1:])


def test_logged_loss_of_first_update_matches_an_independent_computation(tiny_model, instance_dir, tmp_path):
    """instance MSE + w x prior MSE, by hand."""
    class_dir = make_images(tmp_path / "class", n=3, size=(64, 64), seed=5)
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--with_prior_preservation", "--class_prompt",
                          CLASS_PROMPT, "--class_data_dir", class_dir, "--num_class_images", 3,
                          "--prior_loss_weight", 0.7, "--max_train_steps", 1, "--center_crop"))
    logged = logged_scalars(out, "train/loss")[1]
    assert logged == pytest.approx(first_update_loss_by_hand(tiny_model, instance_dir, class_dir, 0.7), rel=1e-4)


def test_caption_dropout_trains_the_dropped_sample_on_the_empty_prompt(tiny_model, instance_dir, tmp_path):
    """A rate between the two samples' draws drops exactly one of them: the by-hand loss with its prompt
    emptied matches, the loss with both prompts kept does not."""
    class_dir = make_images(tmp_path / "class", n=3, size=(64, 64), seed=5)
    draws = sorted(caption_draw(kind) for kind in (0, 1))
    assert draws[1] - draws[0] > 0.1  # so that the rate below separates them
    rate = (draws[0] + draws[1]) / 2
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--with_prior_preservation", "--class_prompt",
                          CLASS_PROMPT, "--class_data_dir", class_dir, "--num_class_images", 3,
                          "--max_train_steps", 1, "--center_crop", "--caption_dropout_rate", rate))
    logged = logged_scalars(out, "train/loss")[1]
    assert logged == pytest.approx(first_update_loss_by_hand(tiny_model, instance_dir, class_dir, 1.0, rate),
                                   rel=1e-4)
    assert logged != pytest.approx(first_update_loss_by_hand(tiny_model, instance_dir, class_dir, 1.0), rel=1e-3)


def test_masked_loss_weights_each_latent_pixel_by_the_opacity_it_covers(tiny_model, tmp_path):
    """--masked_loss: a subject photo's alpha channel, averaged over each latent pixel's 8x8 pixels,
    weights its squared error, normalised by the weights' sum; class images count everywhere."""
    rng = np.random.default_rng(3)
    instance = tmp_path / "cut_out"
    instance.mkdir()
    for i in range(4):  # 72x64: the center crop drops 4 columns a side; opaque boxes off the 8-pixel grid
        rgba = (rng.random((64, 72, 4)) * 255).astype(np.uint8)
        x0, y0 = 9 + 3 * i, 11 + 2 * i
        rgba[..., 3] = 0
        rgba[y0:y0 + 30, x0:x0 + 37, 3] = 255
        rgba[y0 + 30:y0 + 35, x0:x0 + 37, 3] = 64  # a soft edge
        Image.fromarray(rgba, "RGBA").save(instance / f"img{i}.png")
    class_dir = make_images(tmp_path / "class", n=3, size=(64, 64), seed=5)
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance, out, "--with_prior_preservation", "--class_prompt",
                          CLASS_PROMPT, "--class_data_dir", class_dir, "--num_class_images", 3,
                          "--max_train_steps", 1, "--center_crop", "--masked_loss"))
    logged = logged_scalars(out, "train/loss")[1]
    assert logged == pytest.approx(first_update_loss_by_hand(tiny_model, instance, class_dir, 1.0, masked=True),
                                   rel=1e-4)
    assert logged != pytest.approx(first_update_loss_by_hand(tiny_model, instance, class_dir, 1.0), rel=1e-3)


@pytest.mark.parametrize("flip", [False, True])
def test_the_loss_mask_follows_the_crop_and_flip_of_the_pixels(flip):
    """Where the picture is red (the opaque part) the latent mask is 1, elsewhere 0, partly red blocks in
    between: on a crop of a wider photo, mirrored or not."""
    from train_dreambooth import TrainImage, parse_args

    args = parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt", "x",
                       "--resolution", "64", "--random_flip"])
    rgb = np.zeros((64, 80, 3), np.uint8)
    alpha = np.zeros((64, 80), np.uint8)
    rgb[13:45, 11:35, 0] = alpha[13:45, 11:35] = 255  # off-centre: a mirror image puts it elsewhere
    item = TrainImage(Image.fromarray(rgb), "x", args, Image.fromarray(alpha))
    box = (5, 0, 69, 64)
    red = to_pixels_block_mean(item.image.crop(box), flip)
    assert red.max() == 1.0 and red.min() == 0.0
    np.testing.assert_allclose(item.loss_mask(box, flip, (8, 8)), red, atol=1e-6)


def to_pixels_block_mean(image, flip):
    """The red channel of the trainer's pixels, 0..1, averaged over each latent pixel's 8x8 block."""
    from train_dreambooth import to_pixels

    red = (to_pixels(image, flip)[0] + 1) / 2
    return red.reshape(8, 8, 8, 8).mean(axis=(1, 3))


def test_v_prediction_models_train_against_the_velocity(instance_dir, tmp_path):
    from tiny_sd import save_tiny_pipeline

    model = tmp_path / "v_model"
    save_tiny_pipeline(str(model), prediction_type="v_prediction")
    run_train(*train_args(model, instance_dir, tmp_path / "out", "--max_train_steps", 1, "--center_crop"))
    logged = logged_scalars(tmp_path / "out", "train/loss")[1]
    assert logged == pytest.approx(first_update_loss_by_hand(str(model), instance_dir, None, 0.0), rel=1e-4)


def test_accumulation_equals_the_larger_batch(tiny_model, instance_dir, tmp_path):
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "b2", "--train_batch_size", 2,
                          "--max_train_steps", 1, *GRADIENT_LIKE))
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "acc2", "--train_batch_size", 1,
                          "--gradient_accumulation_steps", 2, "--max_train_steps", 1, *GRADIENT_LIKE))
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "b1", "--train_batch_size", 1,
                          "--max_train_steps", 1, *GRADIENT_LIKE))
    assert_same_weights(tmp_path / "b2", tmp_path / "acc2", atol=1e-5)
    # and the comparison can fail: one micro-batch alone is a different update
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "b2", tmp_path / "b1", atol=1e-5)


def test_warmup_is_counted_in_optimizer_updates(tiny_model, instance_dir, tmp_path):
    common = ["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", 2, "--max_train_steps", 4,
              "--learning_rate", 1e-3]
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "a", *common))
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "b", *common, "--gradient_accumulation_steps", 2))
    plain, accumulated = logged_scalars(tmp_path / "a", "train/lr"), logged_scalars(tmp_path / "b", "train/lr")
    expected = {1: 0.0, 2: 0.5e-3, 3: 1e-3, 4: 1e-3}  # linear warmup over updates 1-2, then the full rate
    for step, lr in expected.items():
        assert plain[step] == pytest.approx(lr) and accumulated[step] == pytest.approx(lr), (plain, accumulated)


def test_two_processes_equal_one_process_on_the_union_of_their_batches(tiny_model, instance_dir, two_process_run,
                                                                     tmp_path):
    """Rank r of 2 (batch 1) trains on the r-th sample of the global batch the one-process run
    (batch 2) sees whole: after two updates their weights agree within float tolerance. The 2-process
    run measures diagnostics too (conftest.two_process_run), which must change no weight; this one does not."""
    two, logs = two_process_run
    assert "Weights identical on all 2 ranks" in logs
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "one", "--train_batch_size", 2, *TWO_PROCESS_TRAINING))
    assert_same_weights(two, tmp_path / "one", atol=1e-5)
