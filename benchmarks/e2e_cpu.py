"""End-to-end txt2img on the CPU, split into load, text, sampling, decode and save: sd with PyTorch fp32, sd with
--backend openvino (cache warm: the second run), diffusers' StableDiffusionPipeline fp32, and optimum-intel's
OVStableDiffusionPipeline (OpenVINO's own Hugging Face pipeline; run in .venv-optimum, `make install-optimum`).

All four use the same full-size random SD 2.x base weights (benchmarks/fullsize.py), 512x512, 25 DDIM steps,
guidance 9, one image. Every run is a fresh process (loads are part of the measure); the variants alternate
A B C D A B C D and the report gives medians, minima and ratios of the medians.

    .venv/bin/python benchmarks/e2e_cpu.py [--reps 2] [--steps 25] [--size 512] [--only sd-torch,sd-openvino,...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PROMPT = "a professional photograph of an astronaut riding a horse"
VARIANTS = ("sd-torch", "sd-openvino", "diffusers", "optimum-intel")
BF16_VARIANTS = ("sd-bf16", "diffusers-bf16")  # --only sd-bf16,diffusers-bf16: the native-bf16 CPUs' rows
PHASES = ("load", "text", "sampling", "decode", "save")


class Timer:
    def __init__(self):
        self.split, self.start = {}, time.perf_counter()
        self.mark = self.start

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.split[phase], self.mark = now - self.mark, now

    def result(self) -> dict:
        return {**self.split, "total": time.perf_counter() - self.start}


def run_sd(args: dict) -> dict:
    import torch

    from ldm.files import imageio
    from ldm.loading.build import load_model
    from ldm.request import SamplingSettings
    from ldm.runtime.policy import RuntimeOptions, autocast_context
    from ldm.sampling import sample_latents, start_noise
    from ldm.text.encoder import PromptEncoder

    timer = Timer()
    backend = "openvino" if args["variant"] == "sd-openvino" else "torch"
    precision = "bf16" if args["variant"] == "sd-bf16" else "full"
    model = load_model(args["config"], args["ckpt"], RuntimeOptions(device="cpu", precision=precision, backend=backend))
    timer("load")
    with torch.inference_mode(), autocast_context(model):
        encoder = PromptEncoder(model)
        c, uc = encoder([PROMPT]), encoder([""])
        timer("text")
        noise, generators = start_noise([42], (4, args["size"] // 8, args["size"] // 8))
        latents = sample_latents(model, noise, generators, c, uc,
                                 SamplingSettings(steps=args["steps"], sampler="ddim", scale=9.0))
        timer("sampling")
        images = model.decode_first_stage(latents).float()
        timer("decode")
    with tempfile.TemporaryDirectory() as out:
        imageio.save_numbered(imageio.tensor_to_pil(images.cpu())[0], Path(out), digits=5, metadata={"parameters": "b"})
    timer("save")
    return timer.result()


def run_diffusers(args: dict) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.text.tokenizer import get_tokenizer
    from peer import load_pretrained_peer

    timer = Timer()
    dtype = torch.bfloat16 if args["variant"] == "diffusers-bf16" else torch.float32
    unet, vae, text = load_pretrained_peer(Path(args["folder"]), dtype)
    scheduler = DDIMScheduler.from_pretrained(Path(args["folder"]) / "scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    timer("load")
    with torch.inference_mode():
        ids = get_tokenizer(77)([PROMPT, ""])
        c, uc = text(ids[:1])[0], text(ids[1:])[0]
        timer("text")
        g = torch.Generator().manual_seed(42)
        latents = pipe(prompt_embeds=c, negative_prompt_embeds=uc, num_inference_steps=args["steps"], guidance_scale=9.0,
                       height=args["size"], width=args["size"], generator=g, output_type="latent").images
        timer("sampling")
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        timer("decode")
    _save(images)
    timer("save")
    return timer.result()


def run_optimum(args: dict) -> dict:
    """In .venv-optimum: optimum-intel's pipeline on the OpenVINO IR it exported from the diffusers folder (float32
    weights: no 8-bit compression at export), run with float32 inference."""
    import numpy as np
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    timer = Timer()
    # float32 inference, as sd's backend (OpenVINO's default on a bf16 CPU would be bf16)
    pipe = OVStableDiffusionPipeline.from_pretrained(args["ov_folder"], compile=True,
                                                     ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    timer("load")
    c, uc = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
    timer("text")
    g = np.random.RandomState(42)
    latents = pipe(prompt_embeds=c, negative_prompt_embeds=uc, num_inference_steps=args["steps"], guidance_scale=9.0,
                   height=args["size"], width=args["size"], generator=g, output_type="latent").images
    timer("sampling")
    latents = torch.as_tensor(np.asarray(latents))
    images = torch.as_tensor(np.asarray(pipe.vae_decoder(latent_sample=latents / 0.18215)[0]))
    timer("decode")
    _save(images)
    timer("save")
    return timer.result()


def _save(images) -> None:
    import numpy as np
    from PIL import Image

    array = ((images[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    with tempfile.TemporaryDirectory() as out:
        Image.fromarray(np.ascontiguousarray(array)).save(Path(out) / "00000.png")


# ---------------------------------------------------------------------------------------------------- parent
def diffusers_folder(config: Path, ckpt: Path, out: Path) -> Path:
    """The peer's diffusers folder, completed to a whole pipeline (scheduler, tokenizer, model_index.json) so that
    optimum-intel's exporter can read it offline."""
    from peer import save_pretrained_peer

    from ldm.text.tokenizer import get_tokenizer

    save_pretrained_peer(config, ckpt, out)
    tok = get_tokenizer(77)
    (out / "tokenizer").mkdir(exist_ok=True)
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(tok.vocab))
    merges = sorted(tok._ranks, key=tok._ranks.get)
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!", "do_lower_case": True}))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "prediction_type": "epsilon"}))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return out


def export_optimum(python: Path, folder: Path, ov_folder: Path) -> None:
    if (ov_folder / "model_index.json").exists():
        return
    code = ("import sys; from optimum.intel import OVStableDiffusionPipeline; "
            "p = OVStableDiffusionPipeline.from_pretrained(sys.argv[1], export=True, compile=False, load_in_8bit=False); "
            "p.save_pretrained(sys.argv[2])")
    start = time.perf_counter()
    subprocess.run([str(python), "-c", code, str(folder), str(ov_folder)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    print(f"optimum-intel export: {time.perf_counter() - start:.0f} s", file=sys.stderr)


def child(variant: str, args: dict, python: str) -> dict:
    proc = subprocess.run([python, __file__, "--worker", json.dumps({**args, "variant": variant})], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from fullsize import CONFIGS, cache_dir, checkpoint_for

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"variants among {', '.join(VARIANTS + BF16_VARIANTS)}")
    ns = parser.parse_args()
    config = CONFIGS / "v2-inference.yaml"
    ckpt = checkpoint_for(config.name)
    folder = diffusers_folder(config, ckpt, cache_dir() / "diffusers-v2-base")
    optimum_python = REPO / ".venv-optimum" / "bin" / "python"
    variants = [v for v in ns.only.split(",") if v != "optimum-intel" or optimum_python.exists()]
    args = {"config": str(config), "ckpt": str(ckpt), "folder": str(folder), "size": ns.size, "steps": ns.steps,
            "ov_folder": str(cache_dir() / "optimum-v2-base")}
    if "optimum-intel" in variants:
        export_optimum(optimum_python, folder, Path(args["ov_folder"]))
    if "sd-openvino" in variants:
        child("sd-openvino", {**args, "steps": 1}, sys.executable)  # converts and caches: later runs are "second runs"
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(ns.reps):
        for variant in variants:
            python = str(optimum_python) if variant == "optimum-intel" else sys.executable
            results[variant].append(child(variant, args, python))
            print(f"- {variant}: {results[variant][-1]}", file=sys.stderr, flush=True)
    print(report(results, ns))


def report(results: dict, ns) -> str:
    from ldm.runtime.policy import cpu_flags

    flags = cpu_flags()
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)
    lines = [f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({isa}); {ns.size}x{ns.size}, {ns.steps} steps, "
             f"one image; medians of {ns.reps} fresh processes (min in brackets)", "",
             "| variant | " + " | ".join(PHASES) + " | total | total / diffusers (same precision) |", "|" + " --- |" * (len(PHASES) + 3)]
    ok = {v: [r for r in runs if "error" not in r] for v, runs in results.items()}
    bases = {peer: statistics.median(r["total"] for r in ok[peer]) for peer in ("diffusers", "diffusers-bf16")
             if ok.get(peer)}
    for variant, runs in ok.items():
        base = bases.get("diffusers-bf16" if variant.endswith("bf16") else "diffusers")
        if not runs:
            lines.append(f"| {variant} | failed: {results[variant][0].get('error')} |")
            continue
        cells = [f"{statistics.median(r[p] for r in runs):.2f} ({min(r[p] for r in runs):.2f})" for p in PHASES + ("total",)]
        total = statistics.median(r["total"] for r in runs)
        ratio = f"{total / base:.2f}" if base else ""
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        run = {"sd-torch": run_sd, "sd-openvino": run_sd, "sd-bf16": run_sd, "diffusers": run_diffusers,
               "diffusers-bf16": run_diffusers, "optimum-intel": run_optimum}
        print(json.dumps(run[job["variant"]](job)))
    else:
        main()
