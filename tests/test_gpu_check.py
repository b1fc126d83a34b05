"""benchmarks/gpu_check.py, rehearsed on the CPU with tiny models (what a machine without a GPU can check)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_its_dry_run_and_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    out = tmp_path / "report.md"
    assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    for heading in ("## UNet guidance step (batch 2)", "## 2.1-v shape in fp16", "## End to end txt2img",
                    "## One image of each task"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| full | 256 | off |")]
    assert len(rows) == 1 and float(rows[0].split("|")[6]) > 0  # a measured sd / diffusers ratio
    for task in ("txt2img", "img2img", "inpaint", "depth2img", "upscale"):
        assert f"| {task} | 256x256 |" in text
    assert "| ATTN_PRECISION=fp32 | True |" in text


def test_without_a_gpu_the_real_run_says_so(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", "/nonexistent/x.md"]) == 1
    assert "--dry-run" in capsys.readouterr().err
