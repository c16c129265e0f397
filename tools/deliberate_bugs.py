#!/usr/bin/env python
"""Apply deliberate bugs, one at a time, to a scratch copy of the repository and check that the
tests meant to catch each one fail.

    python tools/deliberate_bugs.py                 # every bug; exit 1 if one is not caught
    python tools/deliberate_bugs.py --list          # the bugs and their test selections
    python tools/deliberate_bugs.py --only NAME ... # some of them
    python tools/deliberate_bugs.py --write         # also write docs/deliberate_bugs.md
    python tools/deliberate_bugs.py --only NAME ... --write  # update just those rows of it
    python tools/deliberate_bugs.py --check         # seconds: does every bug still apply? (CI runs this)

A bug is a snippet of a tracked file and its replacement. The snippet must occur exactly once:
when a refactor moves or rewrites the code, the script says which bug no longer applies (and
exits 1) instead of silently testing nothing. A bug counts as caught only when its pytest
selection runs and at least one test fails (exit status 1); a selection that collects nothing
or does not import is reported as an error, not as caught. --check verifies only that much (each
snippet occurs once, each selection collects a test) without running anything, and is in CI.

The full run is not part of CI (it runs each selection once per bug, minutes in all): run it before
claiming that the tests guard the behaviours below, and after refactoring the code they name.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join("docs", "deliberate_bugs.md")


@dataclass
class Bug:
    name: str
    what: str  # the behaviour it breaks, for the report
    file: str
    original: str
    replacement: str
    tests: list  # pytest arguments: node ids, files, -k expressions

    def selection(self):
        return " ".join(self.tests)


T = "train_dreambooth.py"
F = "families.py"
NUMERICS = "tests/test_numerics.py"
BLIND = "tests/test_blind_spots.py"
MULTI = "tests/test_multi_process.py"
FAULTS = "tests/test_faults.py"
SDXL = "tests/test_sdxl.py"
SD3 = "tests/test_sd3.py"
SD3_FAMILY = "family_sd3.py"
RESUME = "tests/test_resume.py"
BENCH, BENCH_TESTS = "bench/benchmark.py", "tests/test_bench.py"
EFFICACY = "tests/test_efficacy.py"
EXPORT = "tests/test_export.py"

BUGS = [
    Bug("v_target_ignored", "v-prediction models train against the noise instead of the velocity", F,
        'target = noise_scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" \\\n'
        '            else noise',
        "target = noise", [NUMERICS, "-k", "v_prediction_models"]),
    Bug("epsilon_target_is_velocity", "epsilon models train against the velocity", F,
        'if prediction_type == "v_prediction" \\\n            else noise',
        'if prediction_type != "v_prediction" \\\n            else noise',
        [NUMERICS, "-k", "first_update"]),
    Bug("latent_scale_dropped", "latents not multiplied by the VAE's scaling_factor", F,
        "    return sample * vae_config.scaling_factor", "    return sample",
        [NUMERICS, "-k", "first_update"]),
    Bug("prior_loss_weight_ignored", "the class loss is added with weight 1 whatever --prior_loss_weight", T,
        "loss = loss + args.prior_loss_weight * per_sample[num_instance:].mean()",
        "loss = loss + per_sample[num_instance:].mean()",
        [NUMERICS, "-k", "compute_loss or first_update"]),
    Bug("accumulation_not_divided", "accumulated micro-batch losses summed, not averaged", T,
        "args, weight=weight, mask=mask) / len(group)",
        "args, weight=weight, mask=mask)",
        [NUMERICS, "-k", "accumulation_equals"]),
    Bug("short_group_divided_by_full_accumulation", "an epoch's last, shorter group averaged over "
        "--gradient_accumulation_steps instead of the micro-batches it has", T,
        "args, weight=weight, mask=mask) / len(group)",
        "args, weight=weight, mask=mask) / args.gradient_accumulation_steps",
        [BLIND, "-k", "epoch_boundary"]),
    Bug("no_sync_on_last_micro_batch", "gradients all-reduced on the first micro-batch of a group instead of "
        "the last (the last micro-batch's gradient never reaches the other rank)", T,
        "with no_sync() if batch_index != group[-1] else contextlib.nullcontext():",
        "with no_sync() if batch_index != group[0] else contextlib.nullcontext():",
        [MULTI, "-k", "run_multi"]),
    # The optimizer's state carries the schedule's position too, so the bug drops it from both.
    Bug("lr_schedule_not_restored", "a resumed run restarts the lr schedule from update 0", T,
        '        optimizer.set_state_dict(rename_state(saved, back))\n'
        '    with reading_checkpoint(folder, "training_state.json"):\n'
        '        lr_scheduler.set_state_dict(state["lr_scheduler"])\n',
        '        optimizer.set_state_dict({k: v for k, v in rename_state(saved, back).items()\n'
        '                                  if k != "LR_Scheduler"})\n'
        '    with reading_checkpoint(folder, "training_state.json"):\n',
        [BLIND, "-k", "cosine"]),
    Bug("noise_keyed_by_local_position", "per-sample noise keyed by the position in this rank's batch, "
        "not in the global batch: processes and batch sizes see different noise", T,
        "keyed = [(instances[batch_items[pos] % len(instances)], (epoch, batch_index * global_batch + pos, 0))",
        "keyed = [(instances[batch_items[pos] % len(instances)], (epoch, batch_index * args.train_batch_size + pos, "
        "0))",
        [MULTI, "-k", "run_multi"]),
    Bug("noise_not_keyed_by_epoch", "every epoch draws the same noise, crops and flips", T,
        "rng = np.random.default_rng([seed, NOISE_STREAM, *key])",
        "rng = np.random.default_rng([seed, NOISE_STREAM, 0, *key[1:]])",
        [BLIND, "-k", "epoch_boundary"]),
    Bug("commit_dir_deletes_first", "replacing a folder deletes the old one before the new one is in place", T,
        "        if os.path.exists(final):\n            os.replace(final, old)\n",
        "        if os.path.exists(final):\n            shutil.rmtree(final)\n",
        ["tests/test_resume.py", "-k", "crash_while_replacing"]),
    Bug("lora_alpha_not_folded", "the saved LoRA lacks the alpha / rank scale the trained model used", T,
        "scale = args.lora_alpha / args.lora_rank", "scale = 1.0",
        ["tests/test_lora.py", "-k", "trained_model_own_outputs"]),
    Bug("lora_alpha_folded_twice", "alpha / rank folded into the down and the up weights", F,
        'return {k.removeprefix("unet."): v * (alpha / rank) if ".up." in k else v',
        'return {k.removeprefix("unet."): v * (alpha / rank)',
        ["tests/test_lora.py", "-k", "trained_model_own_outputs"]),
    Bug("random_crop_always_centered", "uncached training crops the center instead of a random window", T,
        "box = crop_box(self.image, args.height, args.width, not self.random_crop, rng)",
        "box = crop_box(self.image, args.height, args.width, True, rng)",
        [BLIND, "-k", "random_crop_and_flip"]),
    Bug("uncached_flip_not_applied", "--random_flip without cached latents decides a flip but never flips", T,
        "return to_pixels(self.image.crop(box), flip), flip", "return to_pixels(self.image.crop(box), False), flip",
        [BLIND, "-k", "random_crop_and_flip"]),
    Bug("cached_flip_not_applied", "--random_flip with cached latents always uses the unflipped latents", T,
        "cached = [posterior_cache[id(item), flip] for item, flip in zip(batch[\"items\"], batch[\"flips\"])]",
        "cached = [posterior_cache[id(item), False] for item in batch[\"items\"]]",
        [BLIND, "-k", "cached_flip"]),
    Bug("class_images_not_split", "every rank generates the first rank's share of class images", T,
        "mine = indices[rank::world_size]", "mine = indices[::world_size]",
        [MULTI, "-k", "run_multi"]),
    Bug("noise_offset_per_pixel", "--noise_offset adds independent noise per pixel, not one offset per channel", T,
        "noise += noise_offset * rng.standard_normal((latent_shape[0], 1, 1), dtype=np.float32)",
        "noise += noise_offset * rng.standard_normal(latent_shape, dtype=np.float32)",
        [BLIND, "-k", "noise_offset"]),
    Bug("snr_gamma_not_applied", "--snr_gamma parsed but the loss is not weighted in training", T,
        'batch["times"],\n                                                             args.snr_gamma)',
        'batch["times"],\n                                                             None)',
        [BLIND, "-k", "snr_gamma"]),
    Bug("snr_weight_clipped_from_below", "Min-SNR clips the SNR from below instead of above", F,
        "return snr.clip(max=gamma) /", "return snr.clip(min=gamma) /",
        [NUMERICS, "-k", "min_snr"]),
    Bug("validation_leaves_text_encoder_in_eval", "validation does not put the trained text encoder back "
        "into training mode (its dropout stops)", T,
        "        for model, mode in zip(models, modes):\n            model.train(mode)\n"
        "        paddle.set_rng_state(rng)\n",
        "        for model, mode in zip(models[:1], modes):\n            model.train(mode)\n"
        "        paddle.set_rng_state(rng)\n",
        [BLIND, "-k", "bit_identical"]),
    Bug("validation_samples_the_base_unet", "validation images come from the base UNet, not the trained one", T,
        "pipe = family.pipeline(parts, family.sampling_scheduler(parts.noise_scheduler))",
        "pipe = family.pipeline(families.Parts(**{**vars(parts), \"denoiser\": type(parts.denoiser).from_pretrained("
        "args.pretrained_model_name_or_path, subfolder=\"unet\")}), family.sampling_scheduler(parts.noise_scheduler))",
        [BLIND, "-k", "validation_samples"]),
    Bug("attention_mask_dropped", "a text encoder whose config sets use_attention_mask gets no mask", F,
        'return dict(attention_mask=paddle.to_tensor(masks)) if getattr(config, "use_attention_mask", False) else {}',
        "return {}",
        [BLIND, "-k", "attention_mask"]),
    Bug("resume_ignores_process_count", "a checkpoint of 2 processes resumes on 1 (other batches and noise)", T,
        '"center_crop", "random_flip", "world_size",', '"center_crop", "random_flip",',
        [BLIND, "-k", "refuses"]),
    Bug("explicit_checkpoint_ignored", "--resume_from_checkpoint <folder> resumes from the latest instead", T,
        "        found = args.resume_from_checkpoint\n",
        "        found = list_checkpoints(args.output_dir)[-1]\n",
        [BLIND, "-k", "older_checkpoint"]),
    Bug("class_sampler_ignored", "--class_sampler has no effect: class images use the model's own scheduler", T,
        "pipe.scheduler = sampler.from_config(pipe.scheduler.config, **unclipped)", "pass",
        [BLIND, "-k", "class_sampler"]),
    Bug("ddim_class_sampler_clips_latents", "--class_sampler ddim clips the latents to [-1, 1] (DDIM's default)", T,
        'unclipped = {} if "clip_sample" in pipe.scheduler.config else {"clip_sample": False}', "unclipped = {}",
        [BLIND, "-k", "class_sampler"]),
    Bug("class_guidance_ignored", "--class_guidance_scale has no effect: class images use the pipeline's 7.5", T,
        "num_inference_steps=args.class_inference_steps,\n                              "
        "guidance_scale=args.class_guidance_scale).images",
        "num_inference_steps=args.class_inference_steps).images",
        [BLIND, "-k", "class_sampler"]),
    Bug("caption_dropout_ignored", "--caption_dropout_rate has no effect: every sample keeps its prompt", T,
        'batch["prompts"].append("" if dropped else item.prompt)', 'batch["prompts"].append(item.prompt)',
        [NUMERICS, "-k", "caption_dropout"]),
    Bug("masked_loss_unnormalised", "--masked_loss averages the masked error over the whole picture, so a small "
        "subject trains weakly", T,
        "(squared * mask).mean(axis=[1, 2, 3]) / mask.mean(axis=[1, 2, 3]).clip(min=1e-6)",
        "(squared * mask).mean(axis=[1, 2, 3])",
        [NUMERICS, "-k", "masked_loss"]),
    Bug("masked_loss_mask_not_flipped", "--masked_loss uses the unflipped mask on a flipped picture", T,
        "mask = mask.transpose(Image.FLIP_LEFT_RIGHT) if flip else mask", "mask = mask",
        [NUMERICS, "-k", "loss_mask"]),
    Bug("optimizer_state_loaded_as_tensors", "a resume loads the AdamW moments as tensors (onto a GPU at once)", T,
        'paddle.load(os.path.join(folder, "optimizer.pdopt"), return_numpy=True)',
        'paddle.load(os.path.join(folder, "optimizer.pdopt"))',
        [RESUME, "-k", "host_memory"]),
    Bug("prefetch_out_of_order", "--dataloader_num_workers hands batches over out of order", T,
        "            if len(pending) > 2 * workers:\n                yield pending.popleft().result()",
        "            if len(pending) > 2 * workers:\n                yield pending.pop().result()",
        [BLIND, "-k", "dataloader_workers"]),
    Bug("logging_steps_ignored", "scalars are logged at every update whatever --logging_steps", T,
        "if global_step % args.logging_steps == 0:", "if True:",
        [BLIND, "-k", "logging_steps"]),
    Bug("export_half_ignored", "--export_half through the trainer writes float32", T,
        "family.export(args.output_dir, out, args.use_lora, args.export_half)",
        "family.export(args.output_dir, out, args.use_lora, False)",
        [BLIND, "-k", "export_half"]),
    Bug("sd2_exported_as_sd1", "export_single_file.py writes an SD 2.x model's OpenCLIP text encoder in SD 1.x's "
        "CLIP layout (cond_stage_model.transformer.*)", "export_single_file.py",
        "        return SD2\n", "        return SD\n", [EXPORT, "-k", "sd2"]),
    Bug("sd2_trainer_exports_sd1", "the trainer's --export_single_file writes an SD 2.x model in SD 1.x's layout", F,
        "export_single_file.checkpoint_layout(self.pipeline_class_name, folder)",
        "export_single_file.LAYOUTS[self.pipeline_class_name]", [EXPORT, "-k", "sd2_single_file_round_trips and fp32"]),
    Bug("sdxl_open_clip_norms_swapped", "the SDXL single file puts the second encoder's layer_norm1 under OpenCLIP's "
        "ln_2 and layer_norm2 under ln_1", "export_single_file.py",
        '"layer_norm1": "ln_1", "layer_norm2": "ln_2"', '"layer_norm1": "ln_2", "layer_norm2": "ln_1"',
        [SDXL, "-k", "single_file_round_trips and fp32"]),
    Bug("sdxl_kohya_encoders_swapped", "the SDXL kohya LoRA names the first encoder's weights lora_te2_ and the "
        "second's lora_te1_", "export_single_file.py",
        'lora_text_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}',
        'lora_text_prefixes={"text_encoder": "lora_te2_", "text_encoder_2": "lora_te1_"}', [SDXL, "-k", "kohya"]),
    Bug("sdxl_pooled_from_first_encoder", "SDXL's pooled prompt embedding taken from the first encoder's pooled "
        "output instead of the second encoder's projection", F,
        '"pooled_prompt_embeds": outputs[-1][0]}', '"pooled_prompt_embeds": outputs[0][1]}',
        [SDXL, "-k", "first_loss"]),
    Bug("sdxl_last_hidden_state", "SDXL conditioned on the encoders' last hidden states, not the penultimate", F,
        'paddle.concat([out.hidden_states[-2] for out in outputs], axis=-1)',
        'paddle.concat([out.hidden_states[-1] for out in outputs], axis=-1)',
        [SDXL, "-k", "first_loss"]),
    Bug("sdxl_time_ids_ignore_crop", "SDXL's add_time_ids say crop (0, 0) whatever crop was made", F,
        "time_ids = paddle.to_tensor(np.asarray(geometry, dtype=np.float32))",
        "time_ids = paddle.to_tensor(np.asarray([(g.original_height, g.original_width, 0, 0, g.height, g.width) "
        "for g in geometry], dtype=np.float32))",
        [SDXL, "-k", "add_time_ids"]),
    Bug("sdxl_read_layer_frozen", "SDXL's --train_text_encoder freezes the first encoder's penultimate layer, whose "
        "output the conditioning reads, instead of its last", F,
        "last = text_encoder.config.num_hidden_layers - 1  #", "last = text_encoder.config.num_hidden_layers - 2  #",
        [SDXL, "-k", "only_the_vae_is_untouched"]),
    Bug("sd3_target_sign_flipped", "SD3 trains against latents - noise instead of the flow's velocity noise - "
        "latents", SD3_FAMILY,
        "return (1.0 - s) * latents + s * noise, noise - latents",
        "return (1.0 - s) * latents + s * noise, latents - noise",
        [SD3, "-k", "first_update"]),
    Bug("sd3_vae_shift_dropped", "SD3's latents not shifted by the VAE's shift_factor", F,
        "        sample = sample - vae_config.shift_factor\n", "        sample = sample\n",
        [SD3, "-k", "first_update"]),
    Bug("sd3_schedule_shift_ignored", "SD3 trains on the unshifted sigmas instead of the scheduler's shifted "
        "schedule", SD3_FAMILY,
        "    sigmas = np.asarray(scheduler.sigmas.numpy(), dtype=np.float64)[:len(timesteps)]\n",
        "    sigmas = np.arange(len(timesteps), 0, -1) / len(timesteps)\n    timesteps = sigmas * len(timesteps)\n",
        [SD3, "-k", "shifted_one or first_update"]),
    Bug("sd3_loss_weighting_not_applied", "--weighting_scheme cosmap / sigma_sqrt draws the times but its loss "
        "weight is never applied", F,
        'weight = family_sd3.loss_weighting(self.weighting["scheme"], sigmas[index])',
        "weight = np.ones(len(index))",
        [SD3, "-k", "first_update"]),
    Bug("sd3_sigma_sqrt_weight_wrong", "--weighting_scheme sigma_sqrt weights the loss by 1 / sigma instead of "
        "1 / sigma^2", SD3_FAMILY, "        return sigmas ** -2.0\n", "        return sigmas ** -1.0\n",
        [SD3, "-k", "first_update"]),
    Bug("sd3_density_flags_ignored", "--logit_mean, --logit_std and --mode_scale parsed but the time density uses "
        "the defaults", F,
        "logit_mean=args.logit_mean, logit_std=args.logit_std,\n                              mode_scale=args.mode_scale)",
        "logit_mean=0.0, logit_std=1.0,\n                              mode_scale=1.29)",
        [SD3, "-k", "first_update"]),
    Bug("sd3_sigma_not_keyed", "SD3's noise level drawn from NumPy's global RNG, not the sample's keyed stream "
        "as its noise is", F,
        "return family_sd3.draw_schedule_index(rng, ", "return family_sd3.draw_schedule_index(np.random, ",
        [SD3, "-k", "first_update"]),
    Bug("validation_rng_not_restored", "validation leaves Paddle's RNG where its sampling left it", T,
        "            model.train(mode)\n        paddle.set_rng_state(rng)\n",
        "            model.train(mode)\n",
        [BLIND, "-k", "bit_identical"]),
    Bug("diagnostics_leave_eval_mode", "a diagnostics measurement leaves the models in eval mode", "diagnostics.py",
        "        for model, mode in zip(models, modes):\n            model.train(mode)",
        "        for model, mode in zip(models, modes):\n            pass",
        [BLIND, "-k", "bit_identical"]),
    Bug("class_drift_at_step_0_assumed", "the step-0 class drift is written as 0 instead of measured",
        "diagnostics.py", "    diagnostics.measure(step)\n    return diagnostics",
        "    diagnostics.record(step, 0.0, None if klass is None else 0.0)\n    return diagnostics",
        [BLIND, "-k", "class_drift"]),
    Bug("output_dir_sharing_unchecked", "a multi-machine run without a shared --output_dir starts anyway", T,
        "shared = on_every_rank(os.path.isfile(probe))", "shared = True",
        [MULTI, "-k", "output_dir_stops"]),
    Bug("class_dir_sharing_unchecked", "a process that sees only some of the class images trains on them", T,
        "if world_size > 1 and not on_every_rank(len(paths) == wanted):", "if False:",
        [MULTI, "-k", "class_images_other_processes"]),
    Bug("mkl_variable_leaks", "main() leaves MKL_DEBUG_CPU_TYPE in the caller's environment", T,
        '            os.environ.pop("MKL_DEBUG_CPU_TYPE", None)\n', "            pass\n",
        [BLIND, "-k", "mkl"]),
    Bug("failed_save_keeps_staging", "a save that fails or is interrupted leaves its half-written staging folder "
        "(which keeps a full disk full)", T,
        "shutil.rmtree(staging, ignore_errors=True) if os.path.isdir(staging) else remove_if_exists(staging)",
        "pass", [FAULTS, "-k", "full_disk_on_each_writer and safetensors"]),
    Bug("safetensors_failure_unguarded", "a full disk met by safetensors is a traceback, not one line", T,
        "    return OSError, SafetensorError, RuntimeError", "    return (OSError,)",
        [FAULTS, "-k", "full_disk_on_each_writer and safetensors"]),
    Bug("checkpoint_hash_not_checked", "a checkpoint whose file changed but kept its size verifies", T,
        '        if file_sha256(os.path.join(folder, name)) != entry["sha256"]:', "        if False:",
        [FAULTS, "-k", "truncated_checkpoint"]),
    Bug("latest_takes_a_damaged_checkpoint", "--resume_from_checkpoint latest takes the newest checkpoint even "
        "when it does not verify", T,
        "        problem = checkpoint_problem(folder)\n        if problem is None:",
        "        problem = None\n        if problem is None:", [FAULTS, "-k", "latest_skips"]),
    Bug("output_dir_not_locked", "two runs share one --output_dir", T,
        "    lock = take_output_dir_lock(output_dir) if take else (None, [])", "    lock = (None, [])",
        [FAULTS, "-k", "stale_lock"]),
    Bug("second_ctrl_c_traceback", "a second Ctrl-C in training ends in a traceback", T,
        'raise Interrupted(f"aborted by a second Ctrl-C', 'raise KeyboardInterrupt(f"aborted by a second Ctrl-C',
        [FAULTS, "-k", "second_ctrl_c_aborts"]),
    Bug("cut_identifier_allowed", "a prompt cut at the tokenizer's limit may lose the subject's identifier", T,
        "        if word_ids and not inside:", "        if False:", [FAULTS, "-k", "cut_prompt"]),
    Bug("sdxl_transformer_depth_ignored", "the memory estimate counts one transformer block per attention layer "
        "of SDXL's UNet (it has 1, 2, 10 per level)", "memory_estimate.py",
        'depths = per_level(config.get("transformer_layers_per_block", 1), levels)', "depths = [1] * levels",
        ["tests/test_bench.py", "tests/test_docs.py", "-k", "sdxl_levels or memory_tables"]),
    Bug("parked_models_counted_on_gpu", "the memory estimate counts the parked text encoders and VAE as on the "
        "GPU while training", "memory_estimate.py", "        if frozen and not part.parked:", "        if frozen:",
        ["tests/test_bench.py", "-k", "keeps_on_the_gpu"]),
    Bug("frozen_parts_moved_before_cast", "under mixed precision a frozen part (T5, a CLIP, the VAE) reaches the "
        "GPU in fp32 and is cast there: the start-up peak holds it in fp32 next to the rest", T,
        "return model.to(device=paddle.get_device(), dtype=frozen[name])",
        "return model.to(device=paddle.get_device()).to(dtype=frozen[name])",
        ["tests/test_mixed_precision.py", "-k", "reach_the_gpu"]),
    Bug("multi_process_exit_status_lost", "a rank of a multi-process run ends with status 0 whatever its run "
        "returned: a failed run looks finished to the launcher and run_multi.sh", T,
        "        exit_now(code)", "        exit_now(0)",
        ["tests/test_multi_process.py", "-k", "fails_exits"]),
    Bug("class_pipeline_left_to_gc", "the class-image pipeline's layers (reference cycles) are still alive when "
        "the training models load", T, "    gc.collect()  # its layers hold reference cycles", "    pass",
        ["tests/test_mixed_precision.py", "-k", "freed_before"]),
    # SD 1.x has one text encoder, so only SDXL's and SD3's resume can take the second one from the base.
    Bug("resume_takes_only_the_first_text_encoder", "a full fine-tune resumed with --train_text_encoder takes "
        "text_encoder from the checkpoint but the second one (SDXL, SD3) from the base model", F,
        "args.train_text_encoder and name in self.trained_text_encoders",
        'args.train_text_encoder and name == "text_encoder"',
        [RESUME, "-k", "kill_9_then and (sdxl or sd3)"]),
    Bug("bench_floor_loss_not_mse", "the benchmark's floor computes another loss than the trainer's", BENCH,
        'return ((pred - inputs["target"]) ** 2).mean()', 'return (pred - inputs["target"]).abs().mean()',
        [BENCH_TESTS, "-k", "trainers_loss"]),
    Bug("bench_floor_lora_without_out", "the benchmark's LoRA floor trains fewer adapters than --use_lora", BENCH,
        "for linear in (layer.to_q, layer.to_k, layer.to_v, layer.to_out[0]):",
        "for linear in (layer.to_q, layer.to_k, layer.to_v):", [BENCH_TESTS, "-k", "trainers_loss"]),
    # Consistent but wrong: every run agrees with every other, only the demo's judged samples show it.
    Bug("demo_latent_scale_dropped", "training latents not multiplied by the VAE's scaling_factor (the demo "
        "on the drawn-world base)", F, "    return sample * vae_config.scaling_factor", "    return sample",
        [EFFICACY, "-k", "demo"]),
    Bug("demo_v_target_is_noise", "the drawn-world base (v-prediction) trained against the noise in the demo", F,
        'target = noise_scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" \\\n'
        '            else noise',
        "target = noise", [EFFICACY, "-k", "demo"]),
]


def tracked_files():
    """Tracked files plus new, not yet ignored ones: the tree as it is, uncommitted edits included."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [p for p in out.split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]


def scratch_copy(files):
    folder = tempfile.mkdtemp(prefix="deliberate-bugs-")
    for rel in files:
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(folder, rel))
    return folder


def snippet_problem(bug, folder):
    """None if the bug's snippet occurs exactly once in its file under folder, else why not."""
    path = os.path.join(folder, bug.file)
    if not os.path.isfile(path):
        return f"{bug.file} does not exist"
    with open(path, encoding="utf-8") as f:
        count = f.read().count(bug.original)
    if count != 1:
        where = "no longer occurs" if count == 0 else f"occurs {count} times"
        return f"its snippet {where} in {bug.file}; update the bug in tools/deliberate_bugs.py to the code's new form"
    return None


def apply(bug, folder):
    """Write the bug into the copy; returns None, or why it cannot be applied."""
    problem = snippet_problem(bug, folder)
    if problem:
        return problem
    path = os.path.join(folder, bug.file)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(bug.original, bug.replacement))
    return None


def run_bug(bug, files, timeout):
    """(verdict, seconds, last lines of pytest's output). verdict: caught, NOT CAUGHT, or error: why.
    A bug of None runs the selection on the unchanged copy (the baseline, which must pass)."""
    folder = scratch_copy(files)
    started = time.time()
    try:
        problem = apply(bug, folder) if bug.original else None
        if problem:
            return f"error: {problem}", 0.0, ""
        env = pytest_env()
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "--basetemp", os.path.join(folder, ".pytest-tmp"), *bug.tests]
        try:
            proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"error: the tests ran over {timeout} s", time.time() - started, ""
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # What failed, and pytest's summary: the assertion lines ("E ...") and the last lines
        tail = "\n".join([ln for ln in lines if ln.startswith("E ")][:10] + lines[-4:])
        verdict = {0: "NOT CAUGHT", 1: "caught", 5: "error: the selection collects no tests"}.get(
            proc.returncode, f"error: pytest exit status {proc.returncode}")
        return verdict, time.time() - started, tail
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_env():
    # Some tests start `python`: make it this interpreter, activated or not.
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONDONTWRITEBYTECODE="1",
                PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


# Collects each selection with pytest.main in one interpreter, so the test modules are imported once
# rather than once per selection. Prints, per selection, pytest's exit status and its last output line.
COLLECTOR = r"""
import contextlib, io, json, sys
import pytest
results = []
for tests in json.loads(sys.stdin.read()):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = int(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *tests]))
    results.append([code, (out.getvalue().strip().splitlines() or [""])[-1]])
print(json.dumps(results))
"""


def collection_problems(selections, folder):
    """{selection: None if it collects at least one test in folder, else why not}."""
    selections = list(selections)
    proc = subprocess.run([sys.executable, "-c", COLLECTOR], input=json.dumps(selections), cwd=folder,
                          env=pytest_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"collecting the selections failed: {proc.stderr.strip()[-500:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    why = {0: None, 5: "collects no test"}
    return {tuple(tests): why.get(code, f"does not collect (pytest exit status {code}: {last})")
            for tests, (code, last) in zip(selections, results)}


def check(bugs, folder=ROOT):
    """Without running a test: one line for each bug whose snippet does not occur exactly once, or whose
    test selection collects no test (or does not import). Each distinct selection is collected once."""
    collected = collection_problems({tuple(b.tests) for b in bugs}, folder)
    problems = []
    for bug in bugs:
        problem = snippet_problem(bug, folder)
        if problem is None and collected[tuple(bug.tests)]:
            problem = f"its tests `{bug.selection()}` {collected[tuple(bug.tests)]}"
        if problem:
            problems.append(f"{bug.name}: {problem}")
    return problems


# A row of the report: | `name` | what | `selection` | verdict | seconds | date |  (older reports: no date)
ROW = re.compile(r"^\| `(?P<name>[^`]+)` \| .* \| `(?P<selection>[^`]*)` \| (?P<verdict>[^|]+?) \| "
                 r"(?P<seconds>[^|]*?) \|(?: (?P<date>[^|]*?) \|)?$")
GENERATED_ON = re.compile(r" on (\d{4}-\d\d-\d\d \d\d:\d\d UTC)")


def read_report(path):
    """{name: (selection, verdict, seconds, date)} from an earlier report; {} if there is none."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    generated = GENERATED_ON.search(text)  # the date of every row in a report without a date column
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m and m["verdict"] != "not run":
            rows[m["name"]] = (m["selection"], m["verdict"], m["seconds"],
                               m["date"] or (generated.group(1) if generated else "?"))
    return rows


def report_rows(bugs, results, earlier):
    """One row per bug of the script, in its order: this run's result, else the earlier report's when it was
    run with the same test selection, else "not run". Rows of bugs no longer in the script are dropped."""
    rows = []
    for bug in bugs:
        if bug.name in results:
            rows.append((bug,) + results[bug.name])
        elif bug.name in earlier and earlier[bug.name][0] == bug.selection():
            rows.append((bug,) + earlier[bug.name][1:])
        else:
            rows.append((bug, "not run", "", ""))
    return rows


def markdown(rows):
    lines = ["# Deliberate bugs and the tests that catch them", "",
             "Generated by `python tools/deliberate_bugs.py --write` (all bugs) or `--only NAME ... --write` (just "
             "those rows; each row gives the date it was run). Each bug is applied alone to a scratch copy of the "
             "repository and its test selection is run there; *caught* means at least one of those tests failed. "
             "The bugs themselves (file, snippet, replacement) are listed in `tools/deliberate_bugs.py`.", "",
             "| bug | what it breaks | tests run | caught? | seconds | run on |", "|---|---|---|---|---|---|"]
    for bug, verdict, seconds, date in rows:
        lines.append(f"| `{bug.name}` | {bug.what} | `{bug.selection()}` | {verdict} | {seconds} | {date} |")
    ran = [v for _, v, _, _ in rows if v != "not run"]
    caught = sum(v == "caught" for v in ran)
    not_run = len(rows) - len(ran)
    summary = (f"{caught} of {len(ran)} bugs caught." if not not_run else
               f"{caught} of {len(ran)} run bugs caught; {not_run} not run.")
    lines += ["", summary, ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="List the bugs and their tests, run nothing.")
    p.add_argument("--only", nargs="+", metavar="NAME", help="Run only these bugs.")
    p.add_argument("--check", action="store_true",
                   help="Run no test: check that every bug's snippet occurs once in its file and that its test "
                        "selection collects a test; exit 1 with one line per bug that does not.")
    p.add_argument("--write", action="store_true",
                   help=f"Write the results to {REPORT}; with --only, update just those bugs' rows.")
    p.add_argument("--timeout", type=int, default=900, help="Seconds allowed per bug's tests.")
    p.add_argument("-v", "--verbose", action="store_true", help="Show pytest's last lines for every bug.")
    p.add_argument("--baseline", action="store_true",
                   help="First run each distinct test selection without any bug: all must pass, or a failure "
                        "would count as a catch.")
    args = p.parse_args(argv)
    bugs = BUGS
    if args.only:
        unknown = sorted(set(args.only) - {b.name for b in BUGS})
        if unknown:
            p.error(f"--only: no bug named {', '.join(unknown)} (see --list)")
        bugs = [b for b in BUGS if b.name in args.only]
    if args.list:
        for bug in bugs:
            print(f"{bug.name:45} {bug.file:22} {bug.selection()}\n    {bug.what}")
        return 0
    if args.check:
        problems = check(bugs)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            return 1
        print(f"all {len(bugs)} bugs apply and their tests collect")
        return 0
    files = tracked_files()
    if args.baseline:
        selections = {b.selection(): b.tests for b in bugs}
        for selection, tests in selections.items():
            verdict, seconds, tail = run_bug(Bug("baseline", "", "", "", "", tests), files, args.timeout)
            print(f"baseline {selection}: {'passes' if verdict == 'NOT CAUGHT' else 'FAILS'} ({seconds:.0f} s)",
                  flush=True)
            if verdict != "NOT CAUGHT":
                print("    " + tail.replace("\n", "\n    "), file=sys.stderr)
                print(f"the tests {selection} fail without any bug: fix them first", file=sys.stderr)
                return 1
    rows = []
    width = max(len(b.name) for b in bugs)
    print(f"{'bug':{width}} | {'tests run':55} | {'caught?':10} | seconds", flush=True)
    for bug in bugs:
        verdict, seconds, tail = run_bug(bug, files, args.timeout)
        rows.append((bug, verdict, seconds, tail))
        print(f"{bug.name:{width}} | {bug.selection():55} | {verdict:10} | {seconds:.0f}", flush=True)
        if args.verbose or verdict != "caught":
            print("    " + tail.replace("\n", "\n    "), flush=True)
    if args.write:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results = {bug.name: (verdict, f"{seconds:.0f}", date) for bug, verdict, seconds, _ in rows}
        report = os.path.join(ROOT, REPORT)
        table = report_rows(BUGS, results, read_report(report) if args.only else {})
        with open(report, "w", encoding="utf-8") as f:
            f.write(markdown(table))
        print(f"wrote {REPORT}")
    missed = [b.name for b, v, _, _ in rows if v != "caught"]
    if missed:
        print(f"{len(missed)} of {len(rows)} bugs not caught or not applicable: {', '.join(missed)}", file=sys.stderr)
        return 1
    print(f"all {len(rows)} bugs caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
