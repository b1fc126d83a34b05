"""`sd serve`: the web page and AUTOMATIC1111's HTTP API on one loaded model (ldm.serve)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ldm.cli.app import app
from ldm.cli import options as opt
from ldm.serve import PREVIEW_EVERY

Host = Annotated[str, typer.Option("--host", help="Address to listen on (other than loopback: needs --api-auth or --insecure).")]
Port = Annotated[int, typer.Option("--port", help="Port of the page and the API.")]
ApiAuth = Annotated[Optional[str], typer.Option(
    "--api-auth", help="USER:PASSWORD: HTTP Basic auth on every route, the page included.")]
Insecure = Annotated[bool, typer.Option("--insecure", help="Serve a non-loopback --host without authentication.")]
ModelsDir = Annotated[Optional[Path], typer.Option(
    "--models-dir", help="Checkpoints clients may switch to (POST /sdapi/v1/options) [default: the --ckpt's folder].")]
ServeOutdir = Annotated[Optional[Path], typer.Option(
    "--outdir", help="Where save_images / the page's save box write (OUTDIR/<task>-samples/samples/NNNNN.png).")]
Tab = Annotated[str, typer.Option("--tab", help="The page's first tab: txt2img, img2img, inpaint, depth2img, upscale, variations.")]
MaxBodyMb = Annotated[int, typer.Option("--max-body-mb", help="Refuse request bodies above this many MiB (413).")]
Styles = Annotated[Optional[Path], typer.Option(
    "--styles", help="AUTOMATIC1111's styles.csv (name,prompt,negative_prompt) for requests' \"styles\" "
    "[default: styles.csv beside the models folder].")]
HypernetworkDir = Annotated[Optional[Path], typer.Option(
    "--hypernetwork-dir", help="AUTOMATIC1111's hypernetworks folder, listed by GET /sdapi/v1/hypernetworks for the "
    "clients that read it; sd applies no hypernetwork (a prompt's <hypernet:...> is refused in one line) "
    "[default: hypernetworks/ beside the checkpoints folder].")]
ControlNetDir = Annotated[Optional[Path], typer.Option(
    "--controlnet-dir", help="Folder of ControlNet files that API units and the page name (GET /controlnet/model_list) "
    "[default: controlnet/ beside the checkpoints folder].")]
Replicas = Annotated[int, typer.Option(
    "--replicas", help="Run the jobs on this many replica processes, each with its own copy of the model and "
    "its share of the cores (--threads: each replica's), fed from one queue (docs/scale-out.md) [default: 0, "
    "the server's own worker thread].")]
RayAddress = Annotated[Optional[str], typer.Option(
    "--ray", help="auto or a Ray cluster's ADDRESS: run the --replicas as a Ray Serve deployment (pip install "
    "'sd[ray]'); auto joins the cluster `ray start` runs on this machine, else starts one here "
    "(docs/scale-out.md).")]
RayMin = Annotated[Optional[int], typer.Option(
    "--ray-min-replicas", help="With --ray: autoscale between this many replicas and --ray-max-replicas.")]
RayMax = Annotated[Optional[int], typer.Option(
    "--ray-max-replicas", help="With --ray: autoscale up to this many replicas [default: --replicas].")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="Refuse input images with more pixels than this.")]
PreviewEvery = Annotated[int, typer.Option(
    "--preview-every", help="Show a live preview on the page and in /progress every this many steps (0: none), made "
    "only while the page or a /progress client shows it; the cheap previews (A1111's \"Approx cheap\", the default "
    "without --taesd) cost next to nothing and come every step.")]


@app.command("serve", help="Serve a web page for every task and AUTOMATIC1111's /sdapi/v1 API on one loaded model.")
def serve(ckpt: opt.Ckpt = None, config: opt.Config = None, host: Host = "127.0.0.1", port: Port = 7860,
          api_auth: ApiAuth = None, insecure: Insecure = False, models_dir: ModelsDir = None,
          outdir: ServeOutdir = None, tab: Tab = "txt2img", device: opt.Device = "auto",
          precision: opt.Precision = "auto", threads: opt.Threads = None, trust_config: opt.TrustConfig = False,
          max_side: opt.MaxSide = 2048, max_steps: opt.MaxSteps = 150, max_batch: opt.MaxBatch = 8,
          max_images: opt.MaxImages = 16, max_chunks: opt.MaxChunks = 32, max_body_mb: MaxBodyMb = 64, max_pixels: MaxPixels = 16_000_000,
          embeddings: opt.Embeddings = None, lora_dir: opt.LoraDir = None, backend: opt.Backend = "torch",
          styles: Styles = None, preview_every: PreviewEvery = PREVIEW_EVERY, taesd: opt.Taesd = None,
          hypernetwork_dir: HypernetworkDir = None, controlnet_dir: ControlNetDir = None,
          control_midas: opt.ControlMidas = None, replicas: Replicas = 0, ray: RayAddress = None,
          ray_min_replicas: RayMin = None, ray_max_replicas: RayMax = None) -> None:
    from ldm.cli.entry import ready_for_interrupts
    from ldm.errors import SDError, note
    from ldm.limits import Limits
    from ldm.loading.families import TASKS

    auth = None
    if api_auth is not None:
        user, sep, password = api_auth.partition(":")
        if not sep or not user or not password:
            raise SDError("--api-auth must be USER:PASSWORD")
        auth = (user, password)
    if tab not in TASKS:
        raise SDError(f"--tab must be one of {', '.join(TASKS)} (got '{tab}')")
    if not 1 <= max_body_mb <= 4096 or max_pixels < 1 or not 1 <= port <= 65535 or not 0 <= preview_every <= 1000 \
            or not 0 <= replicas <= 64:
        raise SDError("--max-body-mb must be 1..4096, --max-pixels at least 1, --port 1..65535, --preview-every "
                      "0..1000, --replicas 0..64")
    ray_options = None
    if ray is not None:
        low, high = ray_min_replicas, ray_max_replicas
        if (low is not None and not 0 <= low <= 64) or (high is not None and not 1 <= high <= 64) or \
                (low is not None and high is not None and low > high):
            raise SDError("--ray-min-replicas must be 0..64, --ray-max-replicas 1..64, and min at most max")
        ray_options = {"address": ray, "min_replicas": low, "max_replicas": high}
        from ldm.serve.backends.rayserve import need_ray

        need_ray()  # before the model loads: a missing extra costs nothing
    elif ray_min_replicas is not None or ray_max_replicas is not None:
        raise SDError("--ray-min-replicas and --ray-max-replicas go with --ray")
    limits = Limits(max_side=max_side, max_steps=max_steps, max_batch=max_batch, max_images=max_images,
                    max_chunks=max_chunks)
    limits.check()
    if embeddings is not None and not embeddings.is_dir():
        raise SDError(f"--embeddings {embeddings}: no such folder")
    from ldm.serve.bind import check_bind

    said = check_bind(host, auth, insecure)  # before the model loads: a refused start costs nothing
    ready_for_interrupts()
    from ldm.pipeline import Pipeline
    from ldm.serve.app import run

    pipeline = Pipeline.load(ckpt, config, device=device, precision=precision, threads=threads,
                             trust_config=trust_config, task=tab, backend=backend, taesd=taesd)
    note(f"sd serve on http://{host}:{port}/ (page) and /sdapi/v1 (API, docs at /docs): {said}")
    run(pipeline, host=host, port=port, auth=auth, models_dir=models_dir, outdir=outdir, limits=limits,
        max_pixels=max_pixels, max_body=max_body_mb * 2 ** 20, first_tab=tab, embeddings=embeddings,
        lora_dir=lora_dir, styles=styles, preview_every=preview_every, hypernetwork_dir=hypernetwork_dir,
        controlnet_dir=controlnet_dir, control_midas=control_midas, replicas=replicas, ray=ray_options)
