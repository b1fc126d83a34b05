"""`--from-image IMAGE`: rebuild a job's request from the "parameters" text of a PNG we wrote.

The text gives prompt, negative prompt, seed, steps, sampler, schedule, scale, size, eta and precision;
checkpoint and config stay the command's (a different model hash is noted). To give the same pixels,
and not merely the same picture, the image is recomputed in a batch of the size it was made in and at
its position ("Batch size" / "Batch pos"), filled with copies of itself: our kernels round each image
of a batch the same whatever the other images are, but not whatever the batch size or position is.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.files import metadata
from ldm.errors import SDError, note

if TYPE_CHECKING:
    from ldm.batch.job import BatchJob


def _note_flag_loras(prompt: str, recorded: str, path: Path) -> None:
    """LoRAs the image used that its prompt does not tag (they came from --lora): say so."""
    from ldm.text.syntax import take_loras

    tagged = {tag.name for tag in take_loras(prompt)[1]}
    for entry in filter(None, (e.strip() for e in recorded.split(","))):
        name = entry.partition(":")[0].strip()
        if name not in tagged:
            note(f"{path} was made with LoRA {entry} from --lora: pass the same --lora to reproduce it")


def _note_missing_embeddings(job: "BatchJob", recorded: str, path: Path) -> None:
    """Say which textual-inversion files the image used that are missing here or differ (by hash)."""
    folder = job.request.embeddings_dir(job.ckpt)[0]
    for entry in filter(None, (e.strip() for e in recorded.split(","))):
        name, _, digest = entry.partition(":")
        files = [folder / f"{name.strip()}{suffix}" for suffix in (".pt", ".bin", ".safetensors")] if folder else []
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            note(f"{path} used the embedding {name.strip()}, which is not in {folder}: the image will differ")
        elif metadata.model_hash(found, length=12) != digest.strip():
            note(f"{path} used the embedding {name.strip()} with hash {digest.strip()}; {found} differs: the image will differ")


def _recorded_control(units: tuple, fields: dict, path: Path) -> tuple:
    """The command's ControlNet units (their files and pictures: a PNG records neither) with the settings the
    image records in its "ControlNet N" fields."""
    from ldm.control.units import parse_infotext, parse_mode, parse_resize

    recorded = [parse_infotext(fields[f"ControlNet {i}"]) for i in range(len(fields)) if f"ControlNet {i}" in fields]
    if not recorded and not units:
        return units
    if len(recorded) != len(units):
        if not recorded:
            raise SDError("it was made without ControlNet: drop --controlnet to reproduce it")
        models = ", ".join(unit.get("Model", "?") for unit in recorded)
        raise SDError(f"it was made with {len(recorded)} ControlNet unit(s) ({models}): pass --controlnet FILE and "
                      "--control-image for each, in that order (a PNG records neither)")
    out = []
    for i, (unit, rec) in enumerate(zip(units, recorded)):
        try:
            changed = dataclasses.replace(
                unit, module=rec.get("Module", unit.module), weight=float(rec.get("Weight", unit.weight)),
                start=float(rec.get("Guidance Start", unit.start)), end=float(rec.get("Guidance End", unit.end)),
                mode=parse_mode(rec.get("Control Mode", unit.mode)), resize=parse_resize(rec.get("Resize Mode", unit.resize)),
                processor_res=int(rec["Processor Res"]) if "Processor Res" in rec else unit.processor_res,
                threshold_a=float(rec["Threshold A"]) if "Threshold A" in rec else unit.threshold_a,
                threshold_b=float(rec["Threshold B"]) if "Threshold B" in rec else unit.threshold_b)
        except ValueError as exc:
            raise SDError(f"ControlNet {i}: a recorded value is not a number ({exc})") from None
        if rec.get("Model") and Path(unit.model).stem != rec["Model"]:
            note(f"{path} used ControlNet {rec['Model']} as unit {i}, --controlnet gives {Path(unit.model).name}: "
                 "the image will differ")
        out.append(changed)
    return tuple(out)


def job_from_image(job: "BatchJob") -> "BatchJob":
    """`job` with everything the image records in its request; checkpoint, config, outdir and device stay
    the job's. A task whose input image gives the size keeps it (the recorded Size is not applied); the
    task's own settings (img2img's denoising strength) come from the recorded fields (Task.reproduce)."""
    path = Path(job.from_image)
    if job.from_file is not None:
        raise SDError("--from-image and --from-file both give the prompts; use one of them")
    info = metadata.Infotext.of_png(path)
    try:
        return _job_from(job, info, path)
    except SDError as exc:
        message = str(exc)
        raise SDError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def _job_from(job: "BatchJob", info: metadata.Infotext, path: Path) -> "BatchJob":
    from ldm.tasks import task_sets_size

    request, task = job.request, job.request.task
    prompt, negative, fields = info.prompt, info.negative_prompt, info.fields
    made_by = fields.get("Mode", "txt2img")
    if made_by != task.name:
        raise SDError(f"{path} was made by `sd {made_by}`; reproduce it with that command")
    task.reproduce(fields)
    sized = not task_sets_size(task) and "Size" in fields
    width, height = info.size() if sized else (request.width, request.height)
    sampler, schedule = info.sampler(request.sampling.sampler)
    s = request.sampling
    sampling = dataclasses.replace(
        s, steps=info.number("Steps", int, s.steps), sampler=sampler, schedule=schedule,
        eta=info.number("Eta", float, s.eta), scale=info.number("CFG scale", float, s.scale))
    _note_missing_embeddings(job, fields.get("TI hashes", ""), path)
    _note_flag_loras(prompt, fields.get("Lora hashes", ""), path)
    batch_size, position = info.number("Batch size", int, 1), info.number("Batch pos", int, 0)
    if not 0 <= position < batch_size:
        raise SDError(f"Batch pos {position} does not fit Batch size {batch_size}")
    if job.ckpt is not None and Path(job.ckpt).is_file() and "Model hash" in fields:
        ours = metadata.model_hash(job.ckpt)
        if ours != fields["Model hash"]:
            note(f"{path} was made with model hash {fields['Model hash']} ({fields.get('Model', '?')}), "
                 f"--ckpt has {ours}: the image will differ")
    request = dataclasses.replace(
        request, prompt=prompt, negative_prompt=negative, seed=info.number("Seed", int, request.seed),
        width=width, height=height, sampling=sampling, lines=(), batch_size=1, n_iter=1, fixed_seed=False,
        emphasis={"No norm": "none", "None": "off"}.get(fields.get("Emphasis", ""), "original"),
        clip_skip=info.number("Clip skip", int, 1), reproduce=(batch_size, position),
        decode="taesd" if fields.get("VAE Decoder") == "TAESD" else "full",
        encode="taesd" if fields.get("VAE Encoder") == "TAESD" else "full",
        tome=info.number("Token merging ratio", float, 0.0))
    from ldm.hires import from_fields

    hires = from_fields(fields) if made_by == "txt2img" else request.hires
    if hires is not None and hires.upscaler == "SD x4" and request.hires is not None:
        hires = dataclasses.replace(hires, x4=request.hires.x4)  # a PNG names the x4 model, --hires-x4 gives its file
    request = dataclasses.replace(request, control=_recorded_control(request.control, fields, path), hires=hires)
    runtime = dataclasses.replace(job.runtime, precision=fields.get("Precision", job.runtime.precision))
    return dataclasses.replace(job, request=request, runtime=runtime, from_file=None, repeat=1)
