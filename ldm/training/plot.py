"""A loss-curve PNG drawn with PIL (no plotting library needed): raw values faint, moving average bold."""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image, ImageDraw


def read_losses(path: str | Path) -> list[tuple[int, float]]:
    with open(path, newline="") as f:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(f)]


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(panels: list[tuple[str, list[tuple[int, float]]]], out: str | Path, width: int = 640,
                height: int = 240, window: int = 50) -> Path:
    """One panel per (title, [(step, loss), ...]), stacked vertically, y axis on a linear scale."""
    margin_l, margin_r, margin_t, margin_b = 56, 12, 22, 24
    image = Image.new("RGB", (width, height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    for k, (title, points) in enumerate(panels):
        top = k * height
        x0, x1, y0, y1 = margin_l, width - margin_r, top + margin_t, top + height - margin_b
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        smooth = moving_average(losses, window)
        lo, hi = min(smooth) * 0.9, max(smooth[min(len(smooth) - 1, window):] or smooth) * 1.1
        s_lo, s_hi = steps[0], max(steps[-1], steps[0] + 1)

        def xy(step, value):
            value = min(max(value, lo), hi)
            return (x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0), y1 - (value - lo) / (hi - lo) * (y1 - y0))

        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        for frac in (0.0, 0.5, 1.0):
            value = lo + frac * (hi - lo)
            y = y1 - frac * (y1 - y0)
            draw.line([x0 - 4, y, x0, y], fill=(0, 0, 0))
            draw.text((4, y - 6), f"{value:.3f}", fill=(0, 0, 0))
        draw.text((x0, y1 + 6), f"step {s_lo}", fill=(0, 0, 0))
        draw.text((x1 - 70, y1 + 6), f"step {s_hi}", fill=(0, 0, 0))
        draw.text((x0 + 4, top + 4), title, fill=(0, 0, 0))
        draw.line([xy(s, v) for s, v in points], fill=(190, 200, 230), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 200), width=2)
    out = Path(out)
    image.save(out)
    return out
