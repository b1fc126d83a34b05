"""`make bench`: sd against diffusers on full-size random weights, side by side in one run.

Each measurement runs in a child process (so load times and peak RSS are those of a fresh process,
and the IPEX rows can run in .venv-ipex); inside a child the variants are timed in turns
A B C D A B C D ... after one warm-up call each, and reported as medians (and minima) with ratios to
the peer of the same precision. The machine's cores are shared, so only ratios from the same child
are compared. Results go to stdout as markdown and to ~/.cache/sd-bench/results-*.json.

    python benchmarks/run.py [--reps 3] [--sizes 512,768] [--no-compile] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fullsize import CONFIGS, cache_dir, checkpoint_for  # noqa: E402

BASE = CONFIGS / "v2-inference.yaml"
V768 = CONFIGS / "v2-inference-v.yaml"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def psnr(a, b) -> float:
    """PSNR of images in [-1, 1] (clamped), peak-to-peak 2."""
    import math
    mse = ((a.double().clamp(-1, 1) - b.double().clamp(-1, 1)) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


# ---------------------------------------------------------------------------------- child workers
def _sd_model(config, ckpt, precision, **opts):
    from ldm.loading.build import load_model
    from ldm.runtime.policy import RuntimeOptions
    return load_model(config, ckpt, RuntimeOptions(device="cpu", precision=precision, **opts))


def build_unet_variants(names: list[str], ckpt: Path):
    """name -> callable(x, t, context) for the UNet variants asked for (sharing weights where they can)."""
    import torch

    from ldm.loading.checkpoint import read_state_dict
    from ldm.runtime.fastpath import speed_up
    from ldm.runtime.policy import RuntimeOptions, resolve_precision
    from peer import diffusers_unet

    calls = {}
    sd_models = {}
    raw = None
    for name in names:
        kind, _, flavour = name.partition("-")
        if flavour.startswith("openvino"):  # sd-openvino (float32), sd-openvino-int8 (NNCF int8 weights)
            model = _sd_model(BASE, ckpt, "int8" if flavour.endswith("int8") else "full", backend="openvino")
            calls[name] = (lambda u: lambda x, t, c: u(x, t, c))(model.model.diffusion_model)
        elif kind == "sd":  # sd-<fp32|bf16>[-ipex][-compile|-torchscript]
            precision = "full" if flavour.startswith("fp32") else "bf16"
            flags = set(flavour.split("-")[1:])
            key = (precision, "ipex" in flags)  # IPEX rewrites the module in place: its own copy
            if key not in sd_models:
                sd_models[key] = _sd_model(BASE, ckpt, precision).model.diffusion_model
            unet = sd_models[key]
            if flags:
                opts = RuntimeOptions(device="cpu", precision=precision, compile="compile" in flags,
                                      ipex="ipex" in flags, torchscript="torchscript" in flags)
                unet = speed_up(unet, opts, resolve_precision(precision, torch.device("cpu")), torch.device("cpu"))
            calls[name] = (lambda u: lambda x, t, c: u(x, t, c))(unet)
        elif kind == "diffusers":
            raw = raw if raw is not None else read_state_dict(ckpt)
            dtype = torch.float32 if flavour == "fp32" else torch.bfloat16
            twin = diffusers_unet(BASE, raw, dtype)
            calls[name] = (lambda u, d: lambda x, t, c: u(x.to(d), t, encoder_hidden_states=c.to(d)).sample.float())(twin, dtype)
        else:
            raise ValueError(name)
    return calls


def alternate(calls: dict, inputs: tuple, reps: int) -> tuple[dict, dict, dict]:
    """Warm-up once each, then `reps` rounds of A B C ...; returns (times, first-call times, outputs)."""
    import torch

    times = {k: [] for k in calls}
    first, outputs = {}, {}
    with torch.inference_mode():
        for name, call in calls.items():
            start = time.perf_counter()
            outputs[name] = call(*inputs).float()
            first[name] = time.perf_counter() - start
        for _ in range(reps):
            for name, call in calls.items():
                start = time.perf_counter()
                call(*inputs)
                times[name].append(time.perf_counter() - start)
    return times, first, outputs


def worker_unet(args: dict) -> dict:
    import torch

    torch.manual_seed(0)
    calls = build_unet_variants(args["variants"], Path(args["ckpt"]))
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": {}}
    for size in args["sizes"]:
        latent = size // 8
        g = torch.Generator().manual_seed(size)
        x = torch.randn(2, 4, latent, latent, generator=g)
        t = torch.tensor([999.0, 999.0]) * torch.rand(1, generator=g)  # one timestep, CFG batch of 2
        c = torch.randn(2, 77, 1024, generator=g)
        # torch.compile specialises to each shape and its first compile takes minutes: only at compile_sizes.
        here = {k: v for k, v in calls.items() if "compile" not in k or size in args.get("compile_sizes", [])}
        times, first, outputs = alternate(here, (x, t, c), args["reps"])
        errors = {}
        for name, out in outputs.items():
            ref = "sd-fp32" if name.startswith("sd") else "diffusers-fp32"
            if ref in outputs and ref != name:
                errors[f"{name} vs {ref}"] = rel_err(out, outputs[ref])
        if "sd-fp32" in outputs and "diffusers-fp32" in outputs:
            errors["sd-fp32 vs diffusers-fp32"] = rel_err(outputs["sd-fp32"], outputs["diffusers-fp32"])
        result["sizes"][str(size)] = {"times": times, "first": first, "rel_err": errors}
        if args.get("partial"):  # what is measured survives an interrupted run
            Path(args["partial"]).write_text(json.dumps({**result, "peak_rss_gb": peak_rss_gb()}))
        print(f"  unet {size}: " + ", ".join(f"{k} {statistics.median(v):.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def worker_vae(args: dict) -> dict:
    import torch

    from ldm.loading.checkpoint import read_state_dict
    from peer import diffusers_vae

    ckpt = Path(args["ckpt"])
    ours = _sd_model(BASE, ckpt, "full").first_stage_model
    ours_bf16 = _sd_model(BASE, ckpt, "full").first_stage_model.to(torch.bfloat16)
    raw = read_state_dict(ckpt)
    twin = diffusers_vae(BASE, raw, torch.float32)
    twin_bf16 = diffusers_vae(BASE, raw, torch.bfloat16)
    calls = {
        "sd-fp32": lambda z: ours.decode(z),
        "diffusers-fp32": lambda z: twin.decode(z).sample,
        "sd-bf16": lambda z: ours_bf16.decode(z.to(torch.bfloat16)),
        "diffusers-bf16": lambda z: twin_bf16.decode(z.to(torch.bfloat16)).sample,
    }
    size = args["size"]
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(1))
    times, first, outputs = alternate(calls, (z,), args["reps"])
    return {"times": times, "first": first, "size": size,
            "rel_err": {"sd-fp32 vs diffusers-fp32": rel_err(outputs["sd-fp32"], outputs["diffusers-fp32"]),
                        "sd-bf16 vs sd-fp32": rel_err(outputs["sd-bf16"], outputs["sd-fp32"])},
            "psnr_bf16_vs_fp32_db": psnr(outputs["sd-bf16"], outputs["sd-fp32"]),
            "peak_rss_gb": peak_rss_gb()}


def worker_load(args: dict) -> dict:
    """A fresh process: imports, then load until ready to sample; the page cache is warm."""
    start = time.perf_counter()
    import torch  # noqa: F401
    if args["who"] == "sd":
        import ldm.models.diffusion.ddpm  # noqa: F401
        from ldm.loading.build import load_model
        from ldm.runtime.policy import RuntimeOptions
        imported = time.perf_counter()
        load_model(args["config"], args["ckpt"], RuntimeOptions(device="cpu", precision=args["precision"]))
    else:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
        from peer import load_pretrained_peer
        imported = time.perf_counter()
        load_pretrained_peer(Path(args["folder"]), torch.float32 if args["precision"] == "full" else torch.bfloat16)
    done = time.perf_counter()
    return {"import_s": imported - start, "load_s": done - imported, "peak_rss_gb": peak_rss_gb()}


def worker_e2e(args: dict) -> dict:
    """txt2img as generate.run_txt2img does it, with a timer around each phase."""
    import tempfile

    import torch

    from ldm.files import imageio
    from ldm.plan import Item
    from ldm.request import SamplingSettings
    from ldm.sampling import sample_latents, start_noise
    from ldm.text.encoder import PromptEncoder
    from ldm.loading.build import load_model
    from ldm.runtime.policy import RuntimeOptions, autocast_context

    split = {}
    start = time.perf_counter()
    model = load_model(args["config"], args["ckpt"], RuntimeOptions(device="cpu", precision=args["precision"]))
    split["load"] = time.perf_counter() - start
    size, steps = args["size"], args["steps"]
    items = [Item(0, "a professional photograph of an astronaut riding a horse", "", 42)]
    settings = SamplingSettings(steps=steps, sampler="ddim", scale=9.0)
    with torch.inference_mode(), autocast_context(model):
        t0 = time.perf_counter()
        encoder = PromptEncoder(model)
        c, uc = encoder([items[0].prompt]), encoder([items[0].negative_prompt])
        split["text"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        noise, generators = start_noise([item.seed for item in items], (4, size // 8, size // 8))
        latents = sample_latents(model, noise, generators, c, uc, settings)
        split["sampling"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = model.decode_first_stage(latents)
        split["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for pil in imageio.tensor_to_pil(images.float().cpu()):
            imageio.save_numbered(pil, Path(out), digits=5, metadata={"parameters": "bench"})
    split["save"] = time.perf_counter() - t0
    split["total"] = time.perf_counter() - start
    return {"split": split, "size": size, "steps": steps, "peak_rss_gb": peak_rss_gb(),
            "finite": bool(torch.isfinite(images).all())}


WORKERS = {"unet": worker_unet, "vae": worker_vae, "load": worker_load, "e2e": worker_e2e}


# ---------------------------------------------------------------------------------- the parent
def child(task: str, args: dict, python: str = sys.executable, env: dict | None = None) -> dict:
    print(f"- {task} {json.dumps({k: v for k, v in args.items() if k not in ('ckpt', 'config', 'folder')})}",
          file=sys.stderr, flush=True)
    proc = subprocess.run([python, __file__, "--worker", task, json.dumps(args)], cwd=REPO,
                          stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        partial = Path(args.get("partial", "/nonexistent"))
        if partial.exists():
            return {**json.loads(partial.read_text()), "error_after": f"exit {proc.returncode}"}
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    from ldm.runtime.policy import cpu_flags
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = cpu_flags()
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16") if f in flags)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores ({isa}), {mem:.0f} GiB, Python {platform.python_version()}"


def med(v: list[float]) -> float:
    return statistics.median(v)


def unet_table(res: dict, peer_of) -> list[str]:
    lines = []
    for size, r in res["sizes"].items():
        for name, ts in r["times"].items():
            peer = peer_of(name)
            ratio = f"{med(ts) / med(r['times'][peer]):.2f}" if peer in r["times"] and peer != name else ""
            lines.append(f"| {size} | {name} | {med(ts):.2f} | {min(ts):.2f} | {r['first'][name]:.1f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", default="512,768")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (slow first compile)")
    parser.add_argument("--quick", action="store_true", help="512 only, 2 reps, no compile, no 768 e2e")
    parser.add_argument("--only", default="unet,ipex,vae,load,e2e,e2e-cpu,fast", help="comma-separated parts to run "
                        "(e2e-cpu: benchmarks/e2e_cpu.py, sd torch / openvino against diffusers and optimum-intel; "
                        "fast: benchmarks/fast.py, time to a picture: few-step, TAESD, token merging)")
    parser.add_argument("--ipex-variants", default="sd-bf16-ipex,sd-bf16-ipex-torchscript,sd-bf16,diffusers-bf16",
                        help="UNet variants timed in .venv-ipex (when it exists)")
    parser.add_argument("--load-reps", type=int, default=2, help="fresh-process loads per variant")
    parser.add_argument("--variants", default="sd-fp32,diffusers-fp32,sd-bf16,diffusers-bf16,sd-openvino,sd-openvino-int8",
                        help="UNet variants of the main group (sd-<fp32|bf16>[-compile|-torchscript], "
                             "sd-openvino[-int8], diffusers-<fp32|bf16>)")
    ns = parser.parse_args()
    if ns.quick:
        ns.reps, ns.sizes, ns.no_compile = 2, "512", True
    sizes = [int(s) for s in ns.sizes.split(",")]
    parts = set(ns.only.split(","))
    started = time.strftime("%Y-%m-%d %H:%M")
    ckpt = checkpoint_for(BASE.name)
    ckpt_v = checkpoint_for(V768.name) if not ns.quick else None
    for path in filter(None, (ckpt, ckpt_v)):  # the page cache holds the file, as the load target assumes
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    results: dict = {"date": started, "machine": machine(), "command": " ".join(["python"] + sys.argv)}
    common = {"ckpt": str(ckpt), "reps": ns.reps, "sizes": sizes}

    if "unet" in parts:
        variants = ns.variants.split(",")
        if not ns.no_compile and "sd-bf16-compile" not in variants:
            variants.append("sd-bf16-compile")
        results["unet"] = child("unet", {**common, "variants": variants, "compile_sizes": sizes[:1],
                                         "partial": str(cache_dir() / "partial-unet.json")})
    ipex_python = REPO / ".venv-ipex" / "bin" / "python"
    if "ipex" in parts and ipex_python.exists():
        results["ipex"] = child("unet", {**common, "variants": ns.ipex_variants.split(","),
                                         "partial": str(cache_dir() / "partial-ipex.json")},
                                python=str(ipex_python))
    if "vae" in parts:
        results["vae"] = child("vae", {"ckpt": str(ckpt), "reps": ns.reps, "size": 512})
    if "load" in parts:
        from peer import save_pretrained_peer
        folder = save_pretrained_peer(BASE, ckpt, cache_dir() / "diffusers-v2-base")
        results["load"] = {}
        for rep in range(ns.load_reps):  # alternate; the report keeps the fastest (first-touch effects)
            for who, precision in (("sd", "full"), ("diffusers", "full"), ("sd", "bf16"), ("diffusers", "bf16")):
                key = f"{who}-{'fp32' if precision == 'full' else 'bf16'}"
                r = child("load", {"who": who, "precision": precision, "config": str(BASE), "ckpt": str(ckpt),
                                   "folder": str(folder)})
                results["load"].setdefault(key, []).append(r)
    if "e2e" in parts:
        results["e2e"] = {"512": child("e2e", {"config": str(BASE), "ckpt": str(ckpt), "precision": "bf16",
                                               "size": 512, "steps": 25})}
        if ckpt_v is not None:
            results["e2e"]["768"] = child("e2e", {"config": str(V768), "ckpt": str(ckpt_v), "precision": "bf16",
                                                  "size": 768, "steps": 2})
    if "e2e-cpu" in parts:  # its own script: fresh processes per run, optimum-intel in .venv-optimum
        steps = "2" if ns.quick else "25"
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "e2e_cpu.py"), "--steps", steps,
                               "--reps", "1" if ns.quick else "2"], cwd=REPO, stdout=subprocess.PIPE, text=True)
        results["e2e_cpu"] = proc.stdout if proc.returncode == 0 else f"e2e_cpu.py failed (exit {proc.returncode})"
    if "fast" in parts:  # its own script: one pipeline per backend, rows alternated
        more = ["--reps", "1", "--tome-sizes", "512", "--tome-reps", "1"] if ns.quick else []
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fast.py"), *more], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
        results["fast"] = proc.stdout if proc.returncode == 0 else f"fast.py failed (exit {proc.returncode})"
    out = cache_dir() / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(report(results))
    print(f"\n(raw results: {out})")


def report(results: dict) -> str:
    lines = [f"date: {results['date']}", f"machine: {results['machine']}", f"command: {results['command']}", ""]

    def peer_of(name: str) -> str:
        return "diffusers-fp32" if "fp32" in name or "openvino" in name else "diffusers-bf16"

    for part in ("unet", "ipex"):
        res = results.get(part)
        if not res:
            continue
        if "error" in res:
            lines += [f"{part}: {res['error']}", ""]
            continue
        lines += [f"UNet guidance step (batch 2), torch {res['torch']}, {res['threads']} threads"
                  + (" (.venv-ipex)" if part == "ipex" else ""), "",
                  "| size | variant | median s | min s | first call s | ratio to diffusers |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += unet_table(res, peer_of)
        lines.append("")
        for size, r in res["sizes"].items():
            if r["rel_err"]:
                lines.append(f"relative error at {size}: " + ", ".join(f"{k} {v:.2e}" for k, v in r["rel_err"].items()))
        lines += [f"peak RSS of this process: {res['peak_rss_gb']:.1f} GB", ""]
    vae = results.get("vae")
    if vae and "error" not in vae:
        lines += [f"VAE decode {vae['size']}x{vae['size']} (batch 1)", "",
                  "| variant | median s | min s | ratio to diffusers |", "| --- | --- | --- | --- |"]
        for name, ts in vae["times"].items():
            peer = peer_of(name)
            ratio = f"{med(ts) / med(vae['times'][peer]):.2f}" if peer != name else ""
            lines.append(f"| {name} | {med(ts):.2f} | {min(ts):.2f} | {ratio} |")
        lines += ["", "relative error: " + ", ".join(f"{k} {v:.2e}" for k, v in vae["rel_err"].items())
                  + f"; PSNR bf16 vs fp32 decode {vae['psnr_bf16_vs_fp32_db']:.1f} dB", ""]
    load = results.get("load")
    if load:
        lines += ["Load (fresh process, file in the page cache; fastest of the runs)", "",
                  "| who | imports s | load s | peak RSS GB |", "| --- | --- | --- | --- |"]
        for key, runs in load.items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                lines.append(f"| {key} | error | | |")
                continue
            best = min(ok, key=lambda r: r["load_s"])
            lines.append(f"| {key} | {best['import_s']:.1f} | {best['load_s']:.1f} | {max(r['peak_rss_gb'] for r in ok):.2f} |")
        lines.append("")
    for size, r in (results.get("e2e") or {}).items():
        if "error" in r:
            lines += [f"e2e {size}: {r['error']}", ""]
            continue
        split = ", ".join(f"{k} {v:.1f}s" for k, v in r["split"].items())
        lines += [f"txt2img {size}x{size}, bf16, {r['steps']} DDIM steps, 1 image: {split}; "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB; finite {r['finite']}", ""]
    if results.get("e2e_cpu"):
        lines += ["End to end on the CPU, fp32-accurate paths (benchmarks/e2e_cpu.py):", "", results["e2e_cpu"], ""]
    if results.get("fast"):
        lines += ["Time to a picture (benchmarks/fast.py):", "", results["fast"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(WORKERS[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        main()
