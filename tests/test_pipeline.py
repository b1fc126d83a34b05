"""ldm.pipeline: load once, generate many; the same images as the commands; progress, cancel, memory."""
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.files import metadata
from ldm.cli import main
from ldm.pipeline import Cancelled, Pipeline

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs"
CPU = dict(device="cpu", precision="full")
CLI = ["--steps", "3", "--precision", "full", "--device", "cpu", "--n_samples", "2", "--n_iter", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_ckpts):
    """Tiny checkpoints of every family, and pipelines loaded once for the module."""
    from tests.tinyckpt import build_tiny, save_tiny

    root = tmp_path_factory.mktemp("pipeline")
    files = {"eps": (tiny_ckpts["eps"]["safetensors"], Path(tiny_ckpts["eps"]["config"]))}
    for kind, cfg, seed in (("inpaint", "tiny-v2-inpainting.yaml", 3), ("depth", "tiny-v2-midas.yaml", 4),
                            ("upscale", "tiny-x4-upscaling.yaml", 5)):
        files[kind] = (save_tiny(build_tiny(cfg, seed), root / f"{kind}.ckpt"), CONFIGS / cfg)
    return files


@pytest.fixture(scope="module")
def pipes(models):
    return {kind: Pipeline.load(ckpt, config, **CPU) for kind, (ckpt, config) in models.items()}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from tests.conftest import smooth_photo

    root, rgb = tmp_path_factory.mktemp("pictures"), smooth_photo()
    paths = {"photo": root / "photo.png", "small": root / "small.png", "mask": root / "mask.png"}
    Image.fromarray(rgb).save(paths["photo"])
    Image.fromarray(rgb[::4, ::4][:64, :64]).save(paths["small"])
    mask = np.zeros((300, 260), np.uint8)
    mask[100:200, 80:180] = 255
    Image.fromarray(mask).save(paths["mask"])
    return paths


def command_pngs(command, kind, models, args, outdir) -> list[bytes]:
    ckpt, config = models[kind]
    assert main([command, "--ckpt", str(ckpt), "--config", str(config), *CLI, *args, "--outdir", str(outdir)]) == 0
    return [p.read_bytes() for p in sorted((outdir / "samples").glob("*.png"))]


@pytest.mark.parametrize("command, kind, args, call", [
    ("txt2img", "eps", ["--prompt", "a cube", "--H", "256", "--W", "320", "-n", "blurry", "--sampler", "euler_a"],
     lambda p, x: p.txt2img("a cube", negative_prompt="blurry", sampler="euler_a", height=256, width=320,
                            seed=42, steps=3, batch_size=2)),
    ("img2img", "eps", ["--prompt", "p", "--init-img", "{photo}", "--strength", "0.6"],
     lambda p, x: p.img2img(Image.open(x["photo"]), "p", strength=0.6, seed=42, steps=3, batch_size=2)),
    ("inpaint", "inpaint", ["--prompt", "p", "--image", "{photo}", "--mask", "{mask}"],
     lambda p, x: p.inpaint(x["photo"], Image.open(x["mask"]), "p", seed=42, steps=3, batch_size=2)),
    ("inpaint", "eps", ["--prompt", "p", "--image", "{photo}", "--mask", "{mask}"],
     lambda p, x: p.inpaint(x["photo"], x["mask"], "p", seed=42, steps=3, batch_size=2)),
    ("depth2img", "depth", ["--prompt", "p", "--init-img", "{photo}"],
     lambda p, x: p.depth2img(x["photo"], "p", seed=42, steps=3, batch_size=2)),
    ("upscale", "upscale", ["--prompt", "p", "--image", "{small}", "--tile", "--tile-size", "32"],
     lambda p, x: p.upscale(x["small"], "p", tile=True, tile_size=32, seed=42, steps=3, batch_size=2)),
])
def test_the_pipeline_makes_the_commands_pngs_byte_for_byte(models, pipes, pictures, tmp_path, command, kind,
                                                             args, call):
    expected = command_pngs(command, kind, models, [a.format(**pictures) for a in args], tmp_path)
    got = call(pipes[kind], pictures)
    assert len(got) == len(expected) == 2
    assert [image.png() for image in got] == expected
    assert [(g.index, g.seed, g.batch_size, g.position) for g in got] == [(0, 42, 2, 0), (1, 43, 2, 1)]
    prompt, negative, fields = metadata.parse_parameters(got[1].parameters)
    assert fields["Seed"] == "43" and fields["Mode"] == command and fields["Batch pos"] == "1"


def test_each_task_takes_its_families_defaults(pipes, pictures):
    seen = []
    pipes["inpaint"].inpaint(pictures["photo"], pictures["mask"], "p", seed=1, steps=2,
                             progress=lambda p: seen.append(p.total))
    _, _, fields = metadata.parse_parameters(pipes["inpaint"].inpaint(pictures["photo"], pictures["mask"], "p", seed=1,
                                                                      steps=2)[0].parameters)
    assert fields["CFG scale"] == "10.0" and fields["Eta"] == "1.0"  # the reference inpainting demo's
    _, _, fields = metadata.parse_parameters(pipes["eps"].txt2img("p", seed=1, steps=2)[0].parameters)
    assert fields["CFG scale"] == "9.0" and fields["Size"] == "512x512" and fields["Sampler"] == "DDIM"


def test_random_seeds_are_reported(pipes):
    a, b = pipes["eps"].txt2img("p", steps=1, width=256, height=256), pipes["eps"].txt2img("p", seed=-1, steps=1,
                                                                                           width=256, height=256)
    assert 0 <= a[0].seed < 2 ** 32 and 0 <= b[0].seed < 2 ** 32
    again = pipes["eps"].txt2img("p", seed=a[0].seed, steps=1, width=256, height=256)
    assert again[0].png() == a[0].png()


def test_progress_sees_every_step_of_every_batch(pipes, pictures):
    seen = []
    pipes["eps"].img2img(pictures["photo"], "p", strength=0.5, steps=6, seed=3, batch_size=2, n_iter=2,
                         progress=seen.append)
    # strength 0.5 of 6 steps runs 3; two batches
    assert [(p.step, p.total, p.batch, p.batches) for p in seen] == [
        (1, 6, 0, 2), (2, 6, 0, 2), (3, 6, 0, 2), (4, 6, 1, 2), (5, 6, 1, 2), (6, 6, 1, 2)]
    assert tuple(seen[0].denoised.shape) == (2, 4, 37, 32)
    preview = pipes["eps"].preview(seen[-1].denoised)
    assert [im.size for im in preview] == [(256, 296)] * 2


def test_cancel_stops_within_a_step_and_leaves_the_pipeline_usable(pipes):
    pipe = pipes["eps"]
    before = pipe.txt2img("p", seed=5, steps=5, width=256, height=256)
    seen = []

    def cancel_at_two(progress):
        seen.append(progress.step)
        if progress.step == 2:
            pipe.cancel()  # as a server's interrupt would, from its own thread

    with pytest.raises(Cancelled, match="after step 2 of 10"):
        pipe.txt2img("p", seed=5, steps=5, width=256, height=256, n_iter=2, progress=cancel_at_two)
    assert seen == [1, 2]
    after = pipe.txt2img("p", seed=5, steps=5, width=256, height=256)
    assert after[0].png() == before[0].png()


# Twenty calls in a process of their own: in the test process, servers and threads left by other tests
# allocate too, and their growth would be counted as the pipeline's.
TWENTY_CALLS = """
import ctypes, gc, json, sys, warnings
import torch
import ldm.loading.checkpoint
from ldm.pipeline import Pipeline

reads = []
real = ldm.loading.checkpoint.read_state_dict
ldm.loading.checkpoint.read_state_dict = lambda path: (reads.append(path), real(path))[1]
pipe = Pipeline.load(sys.argv[1], sys.argv[2], device="cpu", precision="full", quiet=True)
trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc: give freed arena pages back before reading RSS
rss, tensors = [], []
for k in range(20):
    pipe.txt2img(f"prompt {k}", seed=k, steps=2, width=256, height=256, batch_size=2)
    gc.collect()
    if trim:
        trim(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
    with open("/proc/self/statm") as f:
        rss.append(int(f.read().split()[1]) * 4096)
print(json.dumps({"reads": len(reads), "rss": rss, "tensors": tensors}))
"""


def test_twenty_calls_load_once_and_memory_stays_flat(models):
    import json

    ckpt, config = models["eps"]
    done = subprocess.run([sys.executable, "-c", TWENTY_CALLS, str(ckpt), str(config)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rss = result["rss"]
    assert result["reads"] == 1
    # no call keeps a tensor alive: the live tensors after each call are exactly those after the first (534 here)
    assert len(set(result["tensors"])) == 1, result["tensors"]
    # and the resident set, read after malloc_trim, stays within 32 MiB over 15 calls (measured: 0-1 MiB of
    # wobble; without the trim, glibc's arenas grew by 16 MiB steps under a busy machine's load and the test
    # flaked)
    assert rss[-1] - rss[4] < 32 * 2 ** 20, [r // 2 ** 20 for r in rss]


def test_loading_another_model_releases_the_first(models, monkeypatch):
    import ldm.loading.checkpoint

    pipe = Pipeline.load(*models["eps"], **CPU)
    first = weakref.ref(pipe.model)
    alive_at_read = []
    real = ldm.loading.checkpoint.read_state_dict
    monkeypatch.setattr(ldm.loading.checkpoint, "read_state_dict",
                        lambda path: (alive_at_read.append(first() is not None), real(path))[1])
    pipe.load_model(*models["inpaint"])
    assert alive_at_read == [False] and first() is None
    assert type(pipe.model).__name__ == "LatentInpaintDiffusion"


def test_the_library_does_not_import_the_cli_and_help_does_not_import_torch():
    code = ("import sys, ldm.pipeline, ldm.batch.run; "
            "print(sorted(m for m in sys.modules if m in ('typer', 'click') or m.startswith('ldm.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = ("import sys\nfrom ldm.cli import main\n"
            "codes = [main(['--help']), main(['txt2img', '--help']), main(['upscale', '--help'])]\n"
            "print(codes, 'torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[0, 0, 0] False False"
