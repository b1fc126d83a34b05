"""Options shared by the generating commands, defined once.

Each reference flag keeps its spelling (underscores included) and gains a dashed alias.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.errors import SDError

Prompt = Annotated[str, typer.Option("--prompt", help="The prompt to render.")]
NegativePrompt = Annotated[str, typer.Option(
    "--negative-prompt", "--negative_prompt", "-n",
    help="What the image should not show (the unconditional prompt of classifier-free guidance; default \"\").")]
Outdir = Annotated[Path, typer.Option("--outdir", help="Folder for samples/ and grid-NNNN.png.")]
Steps = Annotated[int, typer.Option("--steps", "--ddim_steps", "--ddim-steps", help="Number of sampling steps [default: 50, or the command's own; 20 with the demo model].", show_default=False)]
NIter = Annotated[int, typer.Option("--n_iter", "--n-iter", help="Sample this often [default: 1; txt2img 3, or 1 with the demo model].", show_default=False)]
NSamples = Annotated[int, typer.Option("--n_samples", "--n-samples", help="Images per batch (batch size) [default: 1, or the command's own; txt2img 3, or 4 with the demo model].", show_default=False)]
Plms = Annotated[bool, typer.Option("--plms", help="Use the PLMS sampler (same as --sampler plms).")]
Dpm = Annotated[bool, typer.Option("--dpm", help="Use DPM-Solver (same as --sampler dpm).")]


def _sampler_help() -> str:
    from ldm.models.diffusion.sampler_names import SAMPLER_INFO  # a table without torch: --help stays light

    listed = "; ".join(f"{name}: {spec.description.split(';')[0]} (~{spec.steps} steps)" for name, spec in SAMPLER_INFO.items())
    return f"Sampler (default ddim; `sd samplers` for details). {listed}."


def _schedule_help() -> str:
    from ldm.models.diffusion.sampler_names import SCHEDULE_INFO

    return f"Noise schedule instead of the sampler's default: {', '.join(SCHEDULE_INFO)}."


Sampler = Annotated[Optional[str], typer.Option("--sampler", help=_sampler_help())]
Schedule = Annotated[Optional[str], typer.Option("--schedule", help=_schedule_help())]
FixedCode = Annotated[bool, typer.Option(
    "--fixed_code", "--fixed-code", help="Every image starts from the same noise (that of seed + 0).")]
DdimEta = Annotated[Optional[float], typer.Option("--ddim_eta", "--ddim-eta", "--eta", show_default=False, help="Noise amount for ddim, euler_a and dpmpp_2m_sde [default: the sampler's own: 0 for ddim, 1 for euler_a "
    "and dpmpp_2m_sde; inpaint 1.0]; 0 is deterministic; other samplers refuse a non-zero value.")]
LatentChannels = Annotated[int, typer.Option("--C", help="Latent channels.")]
Factor = Annotated[int, typer.Option("--f", help="Downsampling factor of the first stage.")]
NRows = Annotated[int, typer.Option("--n_rows", "--n-rows", help="Images per grid row (0: n_samples).")]
Scale = Annotated[Optional[float], typer.Option(
    "--scale", help="Classifier-free guidance scale: uncond + scale * (cond - uncond). Default: 9.0 "
    "(inpaint and upscale 10.0), as the reference's scripts; 5.0 with the built-in demo model (larger "
    "scales over-drive it).", show_default=False)]
FromFile = Annotated[Optional[Path], typer.Option(
    "--from-file", "--from_file", help="Read prompts from this file, one per line.")]
Config = Annotated[Optional[Path], typer.Option(
    "--config", envvar="SD_CONFIG", help="The model's YAML config [default with --ckpt: the reference config the "
    "checkpoint's keys and a one-call eps/v probe choose; a given one wins, with a warning if the probe disagrees].")]
Ckpt = Annotated[Optional[Path], typer.Option(
    "--ckpt", envvar="SD_CKPT", help="Checkpoint (.ckpt or .safetensors). Without it the built-in demo model "
    "(configs/demo/) is used.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed: image k of the run uses seed + k; -1 picks a random one (recorded in each PNG).")]
Precision = Annotated[str, typer.Option(
    "--precision", help="auto (bf16 on CPUs with AVX512-BF16/AMX, fp32 on other CPUs, fp16 on CUDA), full (fp32), "
    "autocast (the reference's: fp32 weights under torch.autocast), bf16 or fp16 (weights cast once); with --backend "
    "openvino: int8 (UNet weights) or int8-ptq (UNet weights and activations, calibrated on the run's first 24 steps).")]
Repeat = Annotated[int, typer.Option("--repeat", help="Repeat each prompt of --from-file this often.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, or auto (cuda when available).")]
Torchscript = Annotated[bool, typer.Option("--torchscript", help="Trace and freeze the UNet with TorchScript.")]
Ipex = Annotated[Optional[bool], typer.Option(
    "--ipex/--no-ipex", help="Intel Extension for PyTorch for the UNet. End-of-life (Intel stopped it after 2.8, "
    "October 2025): never a default; use --backend openvino. Needs make install-ipex and .venv-ipex/bin/sd.")]
Bf16 = Annotated[bool, typer.Option("--bf16", help="The reference's flag: same as --precision bf16.")]
Compile = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the UNet (oneDNN fusions); compiled kernels are cached in ~/.cache/sd.")]
TrustConfig = Annotated[bool, typer.Option(
    "--trust-config", help="Let the config build any Python class it names (by default only sd's own classes and "
    "torch.nn.Identity: a config can name code, e.g. os.system).")]
MaxSide = Annotated[int, typer.Option("--max-side", help="Refuse image sides above this many pixels.")]
MaxSteps = Annotated[int, typer.Option("--max-steps", help="Refuse more sampling steps than this.")]
MaxBatch = Annotated[int, typer.Option("--max-batch", help="Refuse batches (--n_samples) larger than this.")]
MaxImages = Annotated[int, typer.Option("--max-images", help="Refuse runs that would save more images than this.")]
MaxChunks = Annotated[int, typer.Option("--max-chunks", help="Refuse prompts of more 75-token chunks than this.")]
ClipSkip = Annotated[int, typer.Option(
    "--clip-skip", help="AUTOMATIC1111's Clip skip: text features from this many layers before the text "
    "encoder's last (1: the model's own layer, SD 2's penultimate; 2: one layer earlier).")]
Emphasis = Annotated[str, typer.Option(
    "--emphasis", help="AUTOMATIC1111's prompt weights, (word:1.2) [word] BREAK: original (weights, then the mean "
    "restored), none (weights only), off (brackets are plain text, one 77-token chunk).")]
Embeddings = Annotated[Optional[Path], typer.Option(
    "--embeddings", help="Folder of textual-inversion embeddings (.pt/.bin/.safetensors): a file's stem used as a "
    "word in the prompt inserts its vectors [default: embeddings/ beside the checkpoints folder].")]
Lora = Annotated[Optional[list[str]], typer.Option(
    "--lora", help="FILE[:WEIGHT]: merge this LoRA (kohya or diffusers/PEFT .safetensors) for every image; "
    "repeatable. In prompts, <lora:NAME:W> or <lora:NAME:TEXT_W:UNET_W> takes NAME from --lora-dir.")]
LoraDir = Annotated[Optional[Path], typer.Option(
    "--lora-dir", help="Folder of LoRA files named by <lora:NAME:W> tags [default: loras/ beside the checkpoints folder].")]
Backend = Annotated[str, typer.Option(
    "--backend", help="torch; openvino: the UNet, VAE and text encoder converted to OpenVINO (CPU, float32; converted "
    "once per shape and cached in ~/.cache/sd/openvino); auto: the fastest fp32-accurate one (OpenVINO on CPUs).")]
Threads = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: OMP_NUM_THREADS, else all cores).")]


def pick_sampler(sampler: Optional[str], *, plms: bool, dpm: bool) -> Optional[str]:
    """--plms and --dpm are the reference's spellings of --sampler plms / dpm."""
    chosen = [name for name, on in (("plms", plms), ("dpm", dpm)) if on]
    if sampler is not None:
        chosen.append(sampler)
    if len(set(chosen)) > 1:
        raise SDError(f"choose one sampler: {' and '.join('--' + c if c in ('plms', 'dpm') else c for c in chosen)} were given")
    return chosen[0] if chosen else None  # None: the model's default (Request.resolved)


def pick_precision(precision: str, bf16: bool) -> str:
    """--bf16 is the reference's spelling of --precision bf16."""
    if bf16 and precision not in ("auto", "bf16"):
        raise SDError(f"--bf16 and --precision {precision} disagree; pick one")
    return "bf16" if bf16 else precision


# The batch-job flags (their values are ldm.batch's options: resume, scale-out, reproduction).
SkipExisting = Annotated[bool, typer.Option(
    "--skip-existing", "--skip_existing",
    help="Resume: skip images whose file already exists with the same parameters. Images are then named "
         "base + k (base fixed by the run's manifest), so the same command finishes an interrupted run.")]
Devices = Annotated[Optional[int], typer.Option(
    "--devices", help="Processes per node (Lightning DDP); each takes whole batches and writes its own files.")]
NumNodes = Annotated[int, typer.Option(
    "--num-nodes", "--num_nodes", help="Machines taking part (launch with torchrun or SLURM; see README).")]
Accelerator = Annotated[Optional[str], typer.Option(
    "--accelerator", help="cpu or gpu for the Lightning processes (default: from --device).")]
FromImage = Annotated[Optional[Path], typer.Option(
    "--from-image", "--from_image", help="Reproduce a PNG written by sd from its stored parameters (same pixels).")]

Preset = Annotated[Optional[str], typer.Option(
    "--preset", help="Whose defaults fill the settings you leave out: turbo (few-step models such as SD-Turbo: 1 step, "
    "scale 1, euler_a, trailing timesteps), sd (SD 2's: the reference's), auto [default]: turbo when the "
    "checkpoint's file name says turbo.", show_default=False)]

Taesd = Annotated[Optional[Path], typer.Option(
    "--taesd", help="TAESD, the tiny autoencoder: taesd_decoder.pth or .safetensors (taesd_encoder.* beside it is "
    "read too) or a diffusers AutoencoderTiny folder; used by --decode/--encode taesd.")]
Decode = Annotated[str, typer.Option(
    "--decode", help="Decoder of the final images: full (the checkpoint's VAE) or taesd (about 40x less work; "
    "needs --taesd).")]
Encode = Annotated[str, typer.Option(
    "--encode", help="Encoder of img2img/inpaint/depth2img inputs: full or taesd (needs --taesd with its encoder).")]
Tome = Annotated[float, typer.Option(
    "--tome", help="Token merging ratio (tomesd, as A1111 applies it): merge this share of the tokens before each "
    "self-attention of the full-resolution blocks; 0 off, up to 0.9. Faster at large sizes; the image changes a little.")]

ControlNetFiles = Annotated[Optional[list[str]], typer.Option(
    "--controlnet", help="FILE[:WEIGHT]: a ControlNet (.safetensors or .ckpt, alone or a whole ControlLDM checkpoint) "
    "steering every image by --control-image, weight 0-2 [default 1]; repeatable, one unit each (docs/controlnet.md).")]
ControlImages = Annotated[Optional[list[Path]], typer.Option(
    "--control-image", help="The picture a --controlnet reads (through --control-module): one for all units, or one per "
    "--controlnet in order.")]
ControlModules = Annotated[Optional[list[str]], typer.Option(
    "--control-module", help="Preprocessor of --control-image: none [default: the picture is the hint], canny, invert, "
    "threshold, scribble_xdog, lineart_standard, depth_midas (needs --control-midas); one for all units or one each.")]
ControlStarts = Annotated[Optional[list[float]], typer.Option(
    "--control-start", help="Fraction of the steps after which the ControlNet acts [default 0]; one or one per unit.")]
ControlEnds = Annotated[Optional[list[float]], typer.Option(
    "--control-end", help="Fraction of the steps after which it stops [default 1]; one or one per unit.")]
ControlModes = Annotated[Optional[list[str]], typer.Option(
    "--control-mode", help="balanced [default], prompt (My prompt is more important), control (ControlNet is more "
    "important); one or one per unit.")]
ControlResizes = Annotated[Optional[list[str]], typer.Option(
    "--control-resize", help="How the hint meets the image size: crop [default] (Crop and Resize), just (Just Resize), "
    "fill (Resize and Fill); one or one per unit.")]
ControlMidas = Annotated[Optional[Path], typer.Option(
    "--control-midas", help="MiDaS for --control-module depth_midas: the depth2img checkpoint (512-depth-ema.ckpt), "
    "whose depth model is read.")]


def control_units(files, images, modules=None, starts=None, ends=None, modes=None, resizes=None) -> tuple:
    """The ControlNet units of the command's flags: one per --controlnet FILE[:WEIGHT]; every other flag
    given once applies to all, or once per unit in order."""
    import numpy as np

    from ldm.control.units import ControlUnit, parse_mode, parse_resize
    from ldm.files.imageio import load_image

    files = list(files or [])
    given = {"--control-image": images, "--control-module": modules, "--control-start": starts,
             "--control-end": ends, "--control-mode": modes, "--control-resize": resizes}
    if not files:
        extra = [flag for flag, values in given.items() if values]
        if extra:
            raise SDError(f"{', '.join(extra)} only apply with --controlnet FILE")
        return ()

    def per_unit(flag: str, values, default):
        values = list(values or [])
        if len(values) in (0, 1):
            return [values[0] if values else default] * len(files)
        if len(values) != len(files):
            raise SDError(f"{flag} is given {len(values)} times for {len(files)} --controlnet: give it once, or "
                          "once per --controlnet")
        return values

    pictures = per_unit("--control-image", images, None)
    if pictures[0] is None:
        raise SDError("--controlnet needs --control-image (the picture it reads)")
    read = {path: np.asarray(load_image(path, "RGB", f"--control-image {path}")) for path in set(pictures)}
    units = []
    for i, (spec, picture, module, start, end, mode, resize) in enumerate(zip(
            files, pictures, per_unit("--control-module", modules, "none"), per_unit("--control-start", starts, 0.0),
            per_unit("--control-end", ends, 1.0), per_unit("--control-mode", modes, "balanced"),
            per_unit("--control-resize", resizes, "crop"))):
        path, weight = _file_and_weight(spec, "--controlnet")
        units.append(ControlUnit(model=path, image=read[picture], module=module, weight=weight, start=start, end=end,
                                 mode=parse_mode(mode, "--control-mode"), resize=parse_resize(resize, "--control-resize")))
    return tuple(units)


def _file_and_weight(spec: str, flag: str) -> tuple[str, float]:
    """FILE[:WEIGHT] (a Windows drive letter's colon is the file's)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            return head, float(tail)
        except ValueError:
            raise SDError(f"{flag} {spec}: the weight after ':' must be a number") from None
    return spec, 1.0


# How the CLI names the fields of ControlNet unit i in messages.
CONTROL_NAMES = {f"control.{i}.{key}": f"{flag} (unit {i + 1})" for i in range(8) for key, flag in (
    ("model", "--controlnet"), ("weight", "--controlnet FILE:WEIGHT"), ("image", "--control-image"),
    ("module", "--control-module"), ("start", "--control-start"), ("end", "--control-end"),
    ("mode", "--control-mode"), ("resize", "--control-resize"), ("processor_res", "processor res"),
    ("threshold_a", "threshold a"), ("threshold_b", "threshold b"))}

Height = Annotated[Optional[int], typer.Option("--H", help="Image height in pixels [default: the model's native size: 512 "
                                               "for v2 base, 768 for v and unCLIP, 256 for the demo model].")]
Width = Annotated[Optional[int], typer.Option("--W", help="Image width in pixels [default: the model's native size].")]

# How the commands name the fields of ldm.request.Request (and its Limits) in messages: by their flags.
FLAG_NAMES = {
    "prompt": "--prompt", "negative_prompt": "--negative-prompt", "seed": "--seed", "width": "--W", "height": "--H",
    "steps": "--steps", "scale": "--scale", "eta": "--ddim_eta", "sampler": "--sampler", "schedule": "--schedule",
    "batch_size": "--n_samples", "n_iter": "--n_iter", "emphasis": "--emphasis", "clip_skip": "--clip-skip",
    "embeddings": "--embeddings", "C": "--C", "f": "--f", "max_side": "--max-side", "max_steps": "--max-steps",
    "max_batch": "--max-batch", "max_images": "--max-images", "max_chunks": "--max-chunks",
    "strength": "--strength", "noise_level": "--noise-level", "preset": "--preset", "decode": "--decode",
    "encode": "--encode", "tome": "--tome", "control": "--controlnet", **CONTROL_NAMES,
    "hires": "--hires-*", "hires.scale": "--hires-scale", "hires.width": "--hires-resize", "hires.height": "--hires-resize",
    "hires.upscaler": "--hires-upscaler", "hires.steps": "--hires-steps", "hires.strength": "--hires-strength",
    "hires.x4": "--hires-x4",
}
