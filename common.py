"""What train_dreambooth.py, families.py, diagnostics.py and export_single_file.py share: the error a user
can fix, and the names of the files a run writes. Imports nothing of the project, so every module can
import it without a cycle."""
import math
import os


class DreamBoothError(Exception):
    """A problem the user can fix: reported as one line, exit code 1."""


def parameter_count(parameters):
    """Elements of the parameters, from their shapes: a model built under paddle.LazyGuard (no memory,
    tools/memory_table.py) counts too, where numel() needs a device."""
    return sum(math.prod(p.shape) for p in parameters)


def first_line(error):
    return (str(error).strip().splitlines() or ["no reason given"])[0]


# What the LoRA loaders read: StableDiffusionPipeline.save_lora_weights (and SDXL's) write this name.
LORA_WEIGHTS = "paddle_lora_weights.safetensors"
# Text-encoder LoRA has a file of its own: ppdiffusers 0.29's load_lora_weights fails on text-encoder
# keys (its loader for them is removed), so they must not be in the file it reads. load_lora reads both.
# Keys are "<pipeline component>.<parameter>", e.g. text_encoder_2.text_model....down.weight.
TEXT_ENCODER_LORA = "text_encoder_lora_weights.safetensors"
# A folder holding one of these is a finished run's output.
FINISHED_MARKERS = ("model_index.json", LORA_WEIGHTS)
# What save_final moves into output_dir (commit_dir may leave <name>.old for a moment): the components
# of every supported pipeline.
PIPELINE_ENTRIES = {"unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
                    "tokenizer_2", "tokenizer_3", "scheduler", "safety_checker", "feature_extractor", "image_encoder"}
# A checkpoint folder's own files, beside the pipeline (or LoRA weights) it holds.
TRAINING_STATE = "training_state.json"
OPTIMIZER_STATE = "optimizer.pdopt"
LORA_TRAINING_STATE = "lora_training_state.pdparams"
RNG_STATE = "rng_state_{rank}.pkl"


def give_usual_file_modes(path):
    """safetensors creates its files readable by their owner only (0600). Give every file under `path`
    (or `path` itself) the mode the user's umask gives any new file, so that the weights can be copied to
    or read by another account (a WebUI install, a shared model folder)."""
    mask = os.umask(0)
    os.umask(mask)
    files = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns]
    for name in files:
        os.chmod(name, 0o666 & ~mask)
