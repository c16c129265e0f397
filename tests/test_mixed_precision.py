"""Mixed precision: the GPU paths, driven on the CPU through the state a GPU run would have.

No GPU runs here. Each test builds what --mixed_precision fp16/bf16 leaves behind on a GPU (frozen
models cast to half, an fp16 GradScaler with its own state, a device that lacks a dtype) and drives
the trainer's own code through it. tools/gpu_check.sh runs the real thing on a GPU.
"""
import contextlib
import json
import math
import os
import pickle

import numpy as np
import pytest
from conftest import CLASS_PROMPT, load_weights, logged_scalars, run_train, train_args


def fake_gpu(monkeypatch, capability, name="Tesla T4"):
    import paddle

    monkeypatch.setattr(paddle.device, "get_device", lambda: "gpu:0")
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(paddle.device.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(paddle, "is_compiled_with_rocm", lambda: False)


@pytest.mark.parametrize("flag,capability,verdict", [
    ("bf16", (7, 5), "has no bfloat16 support .*needs 8.0.*use --mixed_precision fp16"),
    ("fp16", (6, 1), "has no float16 support .*needs 7.0.*use --mixed_precision no"),
    ("bf16", (6, 1), "use --mixed_precision no"),
    ("bf16", (8, 0), "bfloat16"),
    ("fp16", (7, 0), "float16"),
])
def test_a_gpu_without_the_dtype_is_refused_in_one_line(monkeypatch, flag, capability, verdict):
    """Paddle itself only warns and trains in fp32 there, after the frozen models were cast: the
    first step would fail. The trainer checks the device before anything is loaded."""
    import train_dreambooth

    fake_gpu(monkeypatch, capability)
    if verdict in ("bfloat16", "float16"):
        assert train_dreambooth.amp_dtype(flag) == verdict
        return
    with pytest.raises(train_dreambooth.DreamBoothError, match=verdict) as error:
        train_dreambooth.amp_dtype(flag)
    assert "\n" not in str(error.value) and "Tesla T4" in str(error.value)


@pytest.mark.parametrize("flag", ["fp16", "bf16"])
def test_mixed_precision_on_a_cpu_is_refused_before_anything_is_written(tiny_model, instance_dir, tmp_path, flag):
    """Paddle's AMP turns itself off on a CPU, so bf16 there trained in fp32 while claiming otherwise."""
    import train_dreambooth

    out, classes = tmp_path / "out", tmp_path / "class"
    with pytest.raises(train_dreambooth.DreamBoothError, match=f"--mixed_precision {flag}: .*GPU only"):
        run_train(*train_args(tiny_model, instance_dir, out, "--mixed_precision", flag, "--with_prior_preservation",
                              "--class_prompt", CLASS_PROMPT, "--class_data_dir", classes, "--num_class_images", 1))
    assert not out.exists() and not classes.exists()


def test_a_save_next_to_half_frozen_models_holds_the_base_fp32_weights_and_samples(tiny_model, tmp_path, monkeypatch):
    """On a GPU the frozen VAE and text encoder are held in half. The saved pipeline (final and every
    checkpoint) must hold the base's exact fp32 weights, load in fp32 and sample, and the base
    components must be loaded in host memory, not on the training device."""
    import paddle
    from ppdiffusers import StableDiffusionPipeline

    import train_dreambooth

    import families

    args = train_dreambooth.parse_args(train_args(tiny_model, "unused", str(tmp_path / "unused")))
    family = families.for_model(tiny_model)
    parts = family.load(args)
    for model in (parts.vae, parts.text_encoders["text_encoder"]):
        model.to(dtype="float16")
    device = {"now": "gpu:0"}  # a stand-in for the device's state, so the host switch can be seen
    monkeypatch.setattr(paddle.device, "get_device", lambda: device["now"])
    monkeypatch.setattr(paddle.device, "set_device", lambda d: device.update(now=d))
    real_load, loaded_on = StableDiffusionPipeline.from_pretrained, []

    def recording_load(*a, **k):
        loaded_on.append(device["now"])
        return real_load(*a, **k)
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", recording_load)
    folder = str(tmp_path / "saved")
    train_dreambooth.save_pipeline(args, family, dict(unet=parts.denoiser, **parts.text_encoders), parts.tokenizers,
                                   folder)
    monkeypatch.undo()
    assert loaded_on == ["cpu"] and device["now"] == "gpu:0"
    for component in ("text_encoder", "vae"):
        saved, base = load_weights(folder, component), load_weights(tiny_model, component)
        assert saved.keys() == base.keys()
        assert all(saved[k].dtype == np.float32 and np.array_equal(saved[k], base[k]) for k in base), component
    with open(os.path.join(folder, "text_encoder", "config.json")) as f:
        assert json.load(f).get("dtype", "float32") == "float32"
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", height=64, width=64, num_inference_steps=2, output_type="np",
                 generator=paddle.Generator().manual_seed(0)).images
    assert np.isfinite(image).all()


def recording_autocast(entered):
    @contextlib.contextmanager
    def autocast():
        entered.append(1)
        try:
            yield
        finally:
            entered.pop()
    return lambda dtype: autocast


def test_every_unet_call_runs_under_the_training_precision(tiny_model, instance_dir, tmp_path, monkeypatch):
    """Class images, training, validation and diagnostics all call the UNet inside the run's
    autocast context: outside it, half frozen models next to fp32 ones fail (on a GPU)."""
    from ppdiffusers import UNet2DConditionModel

    import train_dreambooth

    inside = []
    monkeypatch.setattr(train_dreambooth, "autocast_factory", recording_autocast(inside))
    calls = []
    real_forward = UNet2DConditionModel.forward

    def forward(self, *a, **k):
        calls.append(bool(inside))
        return real_forward(self, *a, **k)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    out = tmp_path / "out"
    run_train(*train_args(tiny_model, instance_dir, out, "--with_prior_preservation", "--class_prompt", CLASS_PROMPT,
                          "--class_data_dir", tmp_path / "class", "--num_class_images", 1,
                          "--class_inference_steps", 2, "--validation_prompt", CLASS_PROMPT,
                          "--num_validation_images", 1, "--validation_num_inference_steps", 2,
                          "--diagnostics_steps", 1))
    assert os.path.isfile(out / "validation" / "step-000002.png") and os.path.isfile(out / "diagnostics.csv")
    assert len(calls) > 10 and all(calls), f"{calls.count(False)} of {len(calls)} UNet calls ran outside autocast"


class OverflowingScaler:
    """The parts of paddle.amp.GradScaler the trainer uses, reporting an fp16 overflow (and skipping
    the optimizer step, as Paddle's does) on the steps named; its state counts the steps."""

    def __init__(self, overflow_on):
        self.overflow_on, self.steps, self.loaded = overflow_on, 0, None
        self._cache_found_inf = False

    def scale(self, loss):
        return loss

    def step(self, optimizer):
        self.steps += 1
        self._cache_found_inf = self.steps in self.overflow_on
        if not self._cache_found_inf:
            optimizer.step()

    def update(self):
        pass

    def state_dict(self):
        return {"scale": np.array([2.0 ** (15 - self.steps)], dtype=np.float32), "steps": self.steps}

    def load_state_dict(self, state):
        self.loaded, self.steps = state, state["steps"]


def test_an_fp16_overflow_is_no_update_and_is_logged(tiny_model, instance_dir, tmp_path, monkeypatch):
    """A skipped update consumes its batch but not the schedule: the run still makes every update it
    was asked for, the lr schedule advances only on real updates, and train/skipped_updates counts."""
    import train_dreambooth

    scalers = []
    monkeypatch.setattr(train_dreambooth, "grad_scaler",
                        lambda dtype: scalers.append(OverflowingScaler({2})) or scalers[-1])
    out = tmp_path / "out"
    argv = train_args(tiny_model, instance_dir, out, "--max_train_steps", 4, "--save_steps", 2,
                      "--lr_scheduler", "linear", "--lr_warmup_steps", 0, "--learning_rate", 1e-3)
    run_train(*argv)
    lrs = logged_scalars(out, "train/lr")
    assert sorted(lrs) == [1, 2, 3, 4]
    assert np.allclose([lrs[s] for s in (1, 2, 3, 4)], [1e-3 * (1 - k / 4) for k in range(4)])
    assert logged_scalars(out, "train/skipped_updates") == {1: 0, 2: 1, 3: 1, 4: 1}
    with open(out / "checkpoint-2" / "training_state.json") as f:
        state = json.load(f)
    # update 2 came from the third batch; the scaler's own state is in the checkpoint
    assert (state["global_step"], state["batch"], state["skipped_updates"]) == (2, 3, 1)
    assert state["grad_scaler"] == {"scale": [2.0 ** 12], "steps": 3}
    run_train(*argv, "--resume_from_checkpoint", out / "checkpoint-2", "--overwrite_output_dir")
    assert scalers[-1].loaded["steps"] == 3 and scalers[-1].loaded["scale"].tolist() == [2.0 ** 12]


def enabled_grad_scaler(monkeypatch):
    """A real fp16 GradScaler, as on a GPU: Paddle disables it on a CPU place at construction."""
    import paddle
    import paddle.amp.grad_scaler as grad_scaler_module

    class GpuPlace:
        is_gpu_place, is_xpu_place, is_custom_place = (lambda self: True), (lambda self: False), (lambda self: False)

    class Tracer:
        _expected_place = GpuPlace()

    with monkeypatch.context() as m:
        m.setattr(grad_scaler_module, "_dygraph_tracer", lambda: Tracer())
        return paddle.amp.GradScaler(init_loss_scaling=2.0**15)


def test_the_grad_scaler_state_survives_a_checkpoint(monkeypatch):
    """Without its state a resumed fp16 run restarts at 2^15 and skips updates the uninterrupted run
    did not: the scale and counters go through the checkpoint's JSON and back."""
    import train_dreambooth

    trained = enabled_grad_scaler(monkeypatch)
    trained.load_state_dict(dict(trained.state_dict(), scale=np.array([1024.0], dtype=np.float32), incr_count=7,
                                 decr_count=1))
    saved = json.loads(json.dumps(train_dreambooth.scaler_state(trained)))
    resumed = enabled_grad_scaler(monkeypatch)
    assert resumed.state_dict()["scale"].tolist() == [2.0**15]
    train_dreambooth.restore_scaler(resumed, saved)
    a, b = trained.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert train_dreambooth.scaler_state(None) is None


def test_a_checkpoint_holds_the_random_state_of_this_device_only(tmp_path, monkeypatch):
    """paddle.get_rng_state() holds one state per visible GPU; a resume with another number of GPUs
    could not set it back. A checkpoint keeps the host's and this process's own device's."""
    import paddle

    import train_dreambooth

    path = str(tmp_path / "rng.pkl")
    paddle.seed(5)
    train_dreambooth.save_rng_state(path)
    with open(path, "rb") as f:
        assert set(pickle.load(f)["paddle"]) == {"cpu"}
    expected = paddle.rand([3]).numpy()
    train_dreambooth.load_rng_state(path)
    assert np.array_equal(paddle.rand([3]).numpy(), expected)
    # A GPU run's checkpoint resumed on a CPU: the host state is restored, the GPU's is reported.
    with open(path, "rb") as f:
        state = pickle.load(f)
    state["paddle"]["gpu"] = state["paddle"]["cpu"]
    with open(path, "wb") as f:
        pickle.dump(state, f)
    warnings = []
    monkeypatch.setattr(train_dreambooth.logger, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    train_dreambooth.load_rng_state(path)
    assert np.array_equal(paddle.rand([3]).numpy(), expected)
    assert len(warnings) == 1 and "no gpu here" in warnings[0]


def test_the_memory_estimate_reads_the_attention_kernel_the_unet_really_runs(tiny_model):
    """ppdiffusers uses its memory-efficient kernel by default wherever the build has it, with or
    without the flag; the estimate follows the layers, not the flag."""
    from ppdiffusers import UNet2DConditionModel
    from ppdiffusers.models.attention_processor import Attention, AttnProcessor

    from memory_estimate import efficient_attention_in_use

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    assert not efficient_attention_in_use(unet)

    class FusedKernel(AttnProcessor):  # any processor but the plain one computes scores in a kernel
        pass
    next(layer for layer in unet.sublayers() if isinstance(layer, Attention)).processor = FusedKernel()
    assert efficient_attention_in_use(unet)


class DeviceLedger:
    """A stand-in GPU for the CPU: paddle's current device is a name (set_device / get_device, as
    train_dreambooth.on_host switches it), and every parameter created while that name is a GPU, or moved
    there by Layer.to, is counted as GPU memory in its dtype at that moment. Casts are real; the moves
    only change the ledger. Records each parameter's dtype when it arrived, and the peak bytes."""

    def __init__(self, monkeypatch):
        import paddle

        self.now, self.params, self.on_device, self.arrived, self.peak = "gpu:0", [], {}, {}, 0
        real_create, real_to = paddle.nn.Layer.create_parameter, paddle.nn.Layer.to
        ledger = self

        def create_parameter(layer, *a, **k):
            p = real_create(layer, *a, **k)
            ledger.params.append(p)  # kept alive: ids stay unique
            if p is not None and ledger.now.startswith("gpu"):
                ledger.arrive(p)
            return p

        def to(layer, device=None, dtype=None, *a, **k):
            ledger.measure()
            if dtype is not None:
                real_to(layer, dtype=dtype)
            if device is not None:
                for p in layer.parameters():
                    if str(device).startswith("gpu"):
                        ledger.arrive(p)
                    else:
                        ledger.on_device.pop(id(p), None)
            ledger.measure()
            return layer

        for module in (paddle, paddle.device):  # paddlenlp's loader switches with paddle.set_device
            monkeypatch.setattr(module, "get_device", lambda: self.now)
            monkeypatch.setattr(module, "set_device", lambda device: setattr(self, "now", device))
        monkeypatch.setattr(paddle.device.cuda, "get_device_capability", lambda *a: (8, 0))
        monkeypatch.setattr(paddle, "is_compiled_with_rocm", lambda: False)
        monkeypatch.setattr(paddle.nn.Layer, "create_parameter", create_parameter)
        monkeypatch.setattr(paddle.nn.Layer, "to", to)

    def arrive(self, p):
        if id(p) not in self.on_device:
            self.arrived.setdefault(id(p), str(p.dtype).replace("paddle.", ""))
        self.on_device[id(p)] = p

    def measure(self):
        sizes = {"float32": 4, "float16": 2, "bfloat16": 2}
        self.peak = max(self.peak, sum(math.prod(p.shape) * sizes[str(p.dtype).replace("paddle.", "")]
                                       for p in self.on_device.values()))


class Stop(Exception):
    pass


@pytest.mark.parametrize("model,flags,half_vae", [
    ("tiny_sd3", ["--mixed_precision", "fp16"], True),
    ("tiny_sdxl", ["--mixed_precision", "fp16"], False),  # SDXL's own VAE overflows in fp16: kept fp32
    ("tiny_sdxl", ["--mixed_precision", "bf16", "--train_text_encoder"], True),
])
def test_frozen_parts_reach_the_gpu_already_in_half(request, instance_dir, tmp_path, monkeypatch, model, flags,
                                                    half_vae):
    """Under mixed precision the frozen parts (VAE, text encoders not trained) only ever run in half, so
    they are loaded in host memory and reach the GPU cast: the start-up peak is the trained parts in
    fp32 plus the frozen ones in half, never every part in fp32 (SD3's T5 alone would not fit a 24 GB
    GPU in fp32). Driven on the CPU through a stand-in device up to the memory estimate (the rest needs
    a GPU); the peak is compared with a count from the model's own folders and with the estimate."""
    from ppdiffusers import DiffusionPipeline

    import families
    import memory_estimate

    folder = request.getfixturevalue(model)
    half = {"fp16": "float16", "bf16": "bfloat16"}[flags[1]]
    base = DiffusionPipeline.from_pretrained(folder)  # before the ledger: host memory, not counted
    trained = {"transformer", "unet"}
    if "--train_text_encoder" in flags:
        trained |= {"text_encoder", "text_encoder_2"}
    counts = {name: sum(math.prod(p.shape) for p in getattr(base, name).parameters())
              for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
              if getattr(base, name, None) is not None}
    expected_dtype = {name: "float32" if name in trained or (name == "vae" and not half_vae) else half
                      for name in counts}
    expected_peak = sum(n * (4 if expected_dtype[name] == "float32" else 2) for name, n in counts.items())
    del base
    ledger = DeviceLedger(monkeypatch)
    estimate = {}

    def log_estimate(log, rows, note):
        estimate.update({label.split(":")[0]: size for label, size in rows})
        raise Stop
    monkeypatch.setattr(memory_estimate, "log_estimate", log_estimate)
    parts = {}
    real_load = families.SD.load

    def load(family, *a, **k):
        result = real_load(family, *a, **k)
        parts.update(vae=result.vae, **{family.denoiser_name: result.denoiser}, **result.text_encoders)
        return result
    monkeypatch.setattr(families.SD, "load", load)
    with pytest.raises(Stop):
        run_train(*train_args(folder, instance_dir, tmp_path / "out", "--print_memory_estimate", *flags))
    assert parts.keys() == counts.keys()
    for name, part in parts.items():
        arrived = {ledger.arrived.get(id(p)) for p in part.parameters()}
        assert arrived == {expected_dtype[name]}, f"{name} reached the GPU as {arrived}"
        assert all(id(p) in ledger.on_device for p in part.parameters()), f"{name} is not on the GPU"
    ledger.measure()
    assert ledger.peak == expected_peak == estimate["start-up"]


def test_the_class_image_pipeline_is_freed_before_the_training_models_load(tiny_model, instance_dir, tmp_path,
                                                                          monkeypatch):
    """The sampling pipeline's layers hold reference cycles (the cross-attention keys and values it
    reuses), which `del` alone leaves to a later garbage collection: on a GPU their weights would sit
    next to the training models at start-up. None of its weighted layers is alive when they load."""
    import weakref

    import families
    import train_dreambooth

    layers, alive_at_load = [], []
    real_pipeline, real_load = train_dreambooth.load_sampling_pipeline, families.SD.load

    def load_sampling_pipeline(*a, **k):
        pipe = real_pipeline(*a, **k)
        for name in ("unet", "vae", "text_encoder"):
            layers.extend(weakref.ref(layer) for layer in getattr(pipe, name).sublayers()
                          if layer.parameters(include_sublayers=False))
        return pipe

    def load(family, *a, **k):
        alive_at_load.append(sum(ref() is not None for ref in layers))
        return real_load(family, *a, **k)
    monkeypatch.setattr(train_dreambooth, "load_sampling_pipeline", load_sampling_pipeline)
    monkeypatch.setattr(families.SD, "load", load)
    run_train(*train_args(tiny_model, instance_dir, tmp_path / "out", "--with_prior_preservation", "--class_prompt",
                          CLASS_PROMPT, "--class_data_dir", tmp_path / "class", "--num_class_images", 1,
                          "--class_inference_steps", 1, "--max_train_steps", 1))
    assert len(layers) > 50 and alive_at_load == [0]
