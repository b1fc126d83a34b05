"""The README and docs run as written: their examples that need no Stable Diffusion weights are extracted and
run in an empty folder, in order, as a newcomer would paste them; the conda environment installs what
`make install` does."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm.files import metadata

ROOT = Path(__file__).resolve().parent.parent
SD = Path(sys.executable).parent  # the environment running the tests holds the sd command (make install: .venv)
# Lines a newcomer pastes that set the machine up or serve for ever: not run here (`make test` is this run).
NOT_RUN = ("make ", "source ", "conda ", "sd serve")


def shell_examples(markdown: str) -> list[str]:
    """The commands of a page's indented code blocks, continuation lines joined."""
    commands, current = [], ""
    for line in markdown.splitlines():
        if not line.startswith("    ") or line.strip().startswith("#"):
            continue
        text = line[4:]
        current = (current + " " + text.strip()) if current else text.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        commands.append(current)
        current = ""
    return commands


def python_examples(markdown: str) -> list[str]:
    return [block.split("```", 1)[0] for block in markdown.split("```python\n")[1:]]


def needs_weights(command: str) -> bool:
    """True for a command that names a Stable Diffusion checkpoint or an input no example made."""
    return "--ckpt" in command or "checkpoints/" in command or command.startswith(NOT_RUN) or \
        any(name in command for name in ("photo.png", "room.jpg", "small.png", "cat.png", "mask.png"))


def test_the_readmes_weightless_commands_run_as_written(tmp_path):
    commands = [c for c in shell_examples((ROOT / "README.md").read_text()) if not needs_weights(c)]
    assert [c.split()[:2] for c in commands] == [
        ["sd", "txt2img"], ["sd", "info"], ["sd", "img2img"], ["sd", "prompt"], ["printf", "'a"], ["sd", "txt2img"]]
    env = {**os.environ, "PATH": f"{SD}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        if command.startswith("sd info"):
            assert "Sampler: DDIM" in done.stdout and "a red circle on a blue background" in done.stdout
    assert len(list((tmp_path / "outputs" / "txt2img-samples" / "samples").glob("*.png"))) == 4
    assert len(list((tmp_path / "outputs" / "img2img-samples" / "samples").glob("*.png"))) >= 1
    assert len(list((tmp_path / "outputs" / "batch" / "samples").glob("*.png"))) == 2  # a line an image, 2 to a batch


def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch):
    blocks = python_examples((ROOT / "README.md").read_text())
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert Image.open(tmp_path / "triangle.png").size == (256, 256) and scope["image"].seed == 7


def test_the_python_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """Every Python block of docs/python.md, in order, in an empty folder."""
    blocks = python_examples((ROOT / "docs" / "python.md").read_text())
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "docs/python.md", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 Steps: 20, Sampler: DDIM, CFG scale: 5.0")
    assert out[1:7] == [f"step {k}/20" for k in range(1, 6)] + ["cancelled after step 5 of 20"]
    assert out[7:] == ["1.0", "[3, 4, 5]"]
    batches = [(image.batch_size, image.position) for image in scope["request_images"]]
    assert batches == [(2, 0), (2, 1), (1, 0)] and "Steps: 12" in scope["request_images"][2].parameters
    assert len(scope["previews"]) == 1 and scope["previews"][0].size == (256, 256)
    assert Image.open("circle.png").size == (256, 256) and (tmp_path / "circle-with-settings.png").read_bytes() == \
        scope["images"][0].png()
    assert metadata.read_png_text("circle-with-settings.png")["parameters"] == scope["images"][0].parameters
    assert scope["masked"][0].image.size == (256, 256) and scope["edited"][0].seed == 1


def test_the_numactl_recipe_computes_this_machines_cores():
    """docs/intel-cpus.md's lines that read lscpu give this machine's physical cores of socket 0, its node
    and a thread count (numactl itself may be missing here: the page says how to install it)."""
    lines = [c for c in shell_examples((ROOT / "docs" / "intel-cpus.md").read_text())
             if c.startswith(("cpus=", "node=", "threads="))]
    assert len(lines) == 3
    out = subprocess.run(["bash", "-c", "\n".join(lines) + '\necho "$cpus|$node|$threads"'], capture_output=True,
                         text=True, check=True).stdout.strip()
    cpus, node, threads = out.split("|")
    assert re.fullmatch(r"\d+(,\d+)*", cpus) and node.isdigit() and int(threads) == len(cpus.split(","))
    assert 1 <= int(threads) <= os.cpu_count()


def test_the_conda_environment_installs_what_make_install_does():
    import yaml

    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    makefile = (ROOT / "Makefile").read_text()
    pins = re.search(r"^TORCH_PINS := (.+)$", makefile, re.M).group(1).split()
    install = re.search(r"\$\(BIN\)/pip install -e (.+)$", makefile, re.M).group(1)
    assert shlex.split(install) == [".[test]", "-r", "requirements-test.txt", "$(TORCH_PINS)"]
    assert pip == [*pins, "-r requirements-test.txt", "-e .[test]"]
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    setup = (ROOT / "setup.py").read_text()
    minimum = re.search(r'python_requires=">=(\d+)\.(\d+)"', setup).groups()
    assert tuple(map(int, python.split("=")[1].split("."))) >= tuple(map(int, minimum))
