"""Tests of ldm.files.imageio and ldm.files.metadata: output layout, atomic writes, watermark, grid, metadata, input images."""

import errno
import hashlib
import io
import itertools
import json
import os
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.files import imageio as iio
from ldm.files import metadata
from ldm.errors import SDError


# ------------------------------------------------------------------ helpers


def _blur(a, sigma, axis):
    """Separable Gaussian blur along one axis (edge-padded), numpy only."""
    r = int(3 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = [(0, 0)] * a.ndim
    pad[axis] = (r, r)
    p = np.pad(a, pad, mode="edge")
    n = a.shape[axis]
    return sum(w * np.take(p, range(i, i + n), axis=axis) for i, w in enumerate(k))


def natural(h, w, seed=0, texture=30.0):
    """A photo-like RGB test image: smooth colour gradients plus blurred (sigma 1.5) colour noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([128 + 60 * np.sin(x / 37.0) * np.cos(y / 53.0), 40 + 170 * x / w, 40 + 170 * y / h], -1)
    noise = _blur(_blur(rng.normal(size=(h, w, 3)), 1.5, 0), 1.5, 1)
    img = base + texture * noise / noise.std()
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8))


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def solid(color, size=(8, 8)):
    return Image.new("RGB", size, color)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ------------------------------------------------------------------ output layout and atomic writes


def test_next_index_continues_after_highest_number(tmp_path):
    assert iio.next_index(tmp_path / "missing", 5) == 0
    assert iio.next_index(tmp_path, 5) == 0
    for name in ["00000.png", "00003.png", "00007.png", "notes.txt", "0009.png", ".00042.ab12cd34.tmp",
                 "00011.jpg", "grid-0004.png", "grid-12.png"]:
        (tmp_path / name).write_bytes(b"x")
    # 0009.png has 4 digits, 00011.jpg another suffix, the temp file a leading dot: none count.
    assert iio.next_index(tmp_path, 5) == 8
    assert iio.next_index(tmp_path, 4, prefix="grid-") == 5  # grid-12.png has too few digits
    (tmp_path / "123456.png").write_bytes(b"x")  # the reference's f"{n:05}" grows past 99999
    assert iio.next_index(tmp_path, 5) == 123457



class Writer:
    """The reference layout as PlanRunner writes it: numbered samples and grids, the next number remembered."""

    def __init__(self, outdir):
        self.root = iio.ensure_writable_dir(outdir)
        self.samples = iio.ensure_writable_dir(self.root / "samples")
        self.next = {}

    def _save(self, image, folder, prefix, digits, metadata=None, watermark=True):
        path = iio.save_numbered(image, folder, digits, prefix, metadata, watermark, start=self.next.get(prefix))
        self.next[prefix] = int(path.stem[len(prefix):]) + 1
        return path

    def save_sample(self, image, metadata=None, watermark=True):
        return self._save(image, self.samples, "", iio.SAMPLE_DIGITS, metadata, watermark)

    def save_grid(self, image, metadata=None, watermark=True):
        return self._save(image, self.root, iio.GRID_PREFIX, iio.GRID_DIGITS, metadata, watermark)

def test_output_dir_layout_numbering_and_no_overwrite(tmp_path):
    out = tmp_path / "outputs" / "txt2img-samples"
    od = Writer(out)
    names = [od.save_sample(solid((10 * k, 0, 0)), watermark=False).name for k in range(3)]
    assert names == ["00000.png", "00001.png", "00002.png"]
    assert od.save_grid(solid((0, 0, 200)), watermark=False) == out / "grid-0000.png"
    assert sorted(os.listdir(out)) == ["grid-0000.png", "samples"]
    assert sorted(os.listdir(out / "samples")) == names
    assert pixels(out / "samples" / "00002.png")[0, 0].tolist() == [20, 0, 0]

    # A new run continues after the highest number even after a deletion (the reference's
    # len(os.listdir()) would give 2 here and overwrite 00002.png).
    os.unlink(out / "samples" / "00001.png")
    od2 = Writer(out)
    assert od2.save_sample(solid((1, 2, 3)), watermark=False).name == "00003.png"
    assert od2.save_grid(solid((1, 2, 3)), watermark=False).name == "grid-0001.png"
    assert pixels(out / "samples" / "00002.png")[0, 0].tolist() == [20, 0, 0]


def test_names_taken_by_another_writer_are_skipped(tmp_path):
    od = Writer(tmp_path)
    assert od.save_sample(solid((1, 1, 1)), watermark=False).name == "00000.png"
    # Another process takes the next two names after od remembered "next is 00001".
    for name in ("00001.png", "00002.png"):
        (tmp_path / "samples" / name).write_bytes(b"other writer")
    assert od.save_sample(solid((2, 2, 2)), watermark=False).name == "00003.png"
    assert od.save_sample(solid((3, 3, 3)), watermark=False).name == "00004.png"
    for name in ("00001.png", "00002.png"):
        assert (tmp_path / "samples" / name).read_bytes() == b"other writer"
    assert sorted(os.listdir(tmp_path / "samples")) == [f"{k:05d}.png" for k in range(5)]


def test_two_concurrent_writers_get_distinct_names(tmp_path):
    writers = [Writer(tmp_path), Writer(tmp_path)]  # as two processes would
    barrier = threading.Barrier(2)
    written = [[], []]

    def run(w):
        barrier.wait()
        for k in range(8):
            written[w].append(writers[w].save_sample(solid((100 * w, k, 0)), watermark=False))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(os.listdir(tmp_path / "samples")) == [f"{k:05d}.png" for k in range(16)]
    for w in range(2):  # every file holds what its writer wrote, in the writer's order
        assert [pixels(p)[0, 0].tolist() for p in written[w]] == [[100 * w, k, 0] for k in range(8)]


def test_fallback_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "00000.png").write_bytes(b"keep")
    od = Writer(tmp_path)
    od.next[""] = 0  # a stale hint: the reserved-name path must skip 00000
    assert od.save_sample(solid((5, 6, 7)), watermark=False).name == "00001.png"
    assert od.save_sample(solid((5, 6, 8)), watermark=False).name == "00002.png"
    assert (tmp_path / "samples" / "00000.png").read_bytes() == b"keep"
    assert pixels(tmp_path / "samples" / "00002.png")[0, 0].tolist() == [5, 6, 8]
    assert sorted(os.listdir(tmp_path / "samples")) == ["00000.png", "00001.png", "00002.png"]
    with pytest.raises(SDError, match="already exists"):
        iio.save_png(solid((0, 0, 0)), tmp_path / "samples" / "00000.png", watermark=False, overwrite=False)


def _failing_save(exc):
    def save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half an image")  # something is on disk when it fails
        raise exc

    return save


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), SDError),
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_failed_save_leaves_no_file(tmp_path, monkeypatch, exc, expected):
    od = Writer(tmp_path)
    od.save_sample(solid((9, 9, 9)), watermark=False)
    before = (tmp_path / "samples" / "00000.png").read_bytes()
    monkeypatch.setattr(Image.Image, "save", _failing_save(exc))
    with pytest.raises(expected) as info:
        od.save_sample(solid((1, 1, 1)), watermark=False)
    if expected is SDError:
        assert str(info.value) == f"cannot write {tmp_path / 'samples' / '00001.png'}: No space left on device"
    with pytest.raises(expected):
        iio.save_png(solid((1, 1, 1)), tmp_path / "samples" / "00000.png", watermark=False)
    assert os.listdir(tmp_path / "samples") == ["00000.png"]
    assert (tmp_path / "samples" / "00000.png").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["samples"]


def test_interrupt_while_publishing_leaves_no_temp(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", interrupted)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        iio.save_numbered(solid((1, 2, 3)), tmp_path, 5, watermark=False)
    with pytest.raises(KeyboardInterrupt):
        iio.save_png(solid((1, 2, 3)), tmp_path / "x.png", watermark=False)
    assert os.listdir(tmp_path) == []

    def no_link(src, dst):
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "link", no_link)  # the reserve-then-rename path removes its placeholder
    with pytest.raises(KeyboardInterrupt):
        iio.save_numbered(solid((1, 2, 3)), tmp_path, 5, watermark=False)
    assert os.listdir(tmp_path) == []


def test_save_png_overwrites_atomically_and_keeps_permissions(tmp_path):
    path = tmp_path / "a.png"
    iio.save_png(solid((1, 2, 3)), path, watermark=False)
    iio.save_png(solid((4, 5, 6)), path, watermark=False)
    assert pixels(path)[0, 0].tolist() == [4, 5, 6]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert os.listdir(tmp_path) == ["a.png"]


def test_ensure_writable_dir(tmp_path, monkeypatch):
    made = iio.ensure_writable_dir(tmp_path / "a" / "b")
    assert made.is_dir() and os.listdir(made) == []  # the probe file is gone again
    (tmp_path / "file").write_text("x")
    with pytest.raises(SDError) as info:
        iio.ensure_writable_dir(tmp_path / "file")
    assert str(info.value) == f"cannot write to {tmp_path / 'file'}: it exists and is not a folder"
    with pytest.raises(SDError) as info:
        iio.ensure_writable_dir(tmp_path / "file" / "sub")
    assert str(info.value) == f"cannot write to {tmp_path / 'file' / 'sub'}: Not a directory"

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)  # as root, chmod cannot make a folder unwritable
    with pytest.raises(SDError) as info:
        iio.ensure_writable_dir(tmp_path / "a")
    assert str(info.value) == f"cannot write to {tmp_path / 'a'}: Permission denied"
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ watermark

# PSNR of the watermarked vs the original test image, as measured with invisible-watermark 0.2.0.
# The library's dwtDct swaps the U channel's horizontal/vertical detail bands, so textured images
# lose more than smooth ones (see apply_watermark's docstring).
@pytest.mark.parametrize("size, seed, expected_psnr", [
    ((256, 256), 0, 29.204),
    ((512, 384), 1, 29.185),
    ((512, 512), 2, 29.261),
])
def test_watermark_decodes_and_psnr(size, seed, expected_psnr):
    img = natural(size[1], size[0], seed)
    marked = iio.apply_watermark(img)
    assert marked.size == img.size and marked.mode == "RGB"
    assert iio.read_watermark(marked) == b"SDV2"
    assert iio.read_watermark(img) != b"SDV2"
    assert psnr(img, marked) == pytest.approx(expected_psnr, abs=0.05)


def test_watermark_on_smooth_image_is_nearly_invisible():
    img = natural(384, 512, texture=0.0)
    assert psnr(img, iio.apply_watermark(img)) == pytest.approx(41.473, abs=0.05)


def test_watermark_equals_reference_put_watermark():
    """Pixel equality with the reference script's put_watermark (cv2 colour conversion, dwtDct)."""
    import cv2
    from imwatermark import WatermarkEncoder

    img = natural(256, 320, seed=3)
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", "SDV2".encode("utf-8"))
    bgr = encoder.encode(cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR), "dwtDct")
    reference = np.asarray(Image.fromarray(bgr[:, :, ::-1]))
    np.testing.assert_array_equal(np.asarray(iio.apply_watermark(img)), reference)


def test_watermark_size_rule_and_alpha():
    with pytest.raises(SDError, match=r"255x256 is too small for the invisible watermark"):
        iio.apply_watermark(natural(256, 255))
    with pytest.raises(SDError, match="too small"):
        iio.check_watermark_size(128, 128)
    iio.check_watermark_size(512, 128)  # the library's rule is on the pixel count
    assert iio.apply_watermark(natural(128, 512)).size == (512, 128)

    rgb = natural(256, 256, seed=0)
    alpha = Image.fromarray(np.arange(256 * 256, dtype=np.uint32).reshape(256, 256).astype(np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    marked = iio.apply_watermark(rgba)
    assert marked.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(marked.getchannel("A")), np.asarray(alpha))
    np.testing.assert_array_equal(np.asarray(marked.convert("RGB")), np.asarray(iio.apply_watermark(rgb)))


def test_saved_png_carries_watermark_and_metadata(tmp_path):
    img = natural(256, 256, seed=0)
    text = metadata.format_parameters("a photo, of a cat", "", {"Steps": 50, "Seed": 42})
    path = Writer(tmp_path).save_sample(img, metadata={"parameters": text})
    with Image.open(path) as im:
        assert im.text["parameters"] == text
        assert iio.read_watermark(im.convert("RGB")) == b"SDV2"
        np.testing.assert_array_equal(np.asarray(im), np.asarray(iio.apply_watermark(img)))


# ------------------------------------------------------------------ grid


@pytest.mark.parametrize("n, n_rows", [(n, r) for n in range(1, 8) for r in (1, 2, 3, 4)])
def test_make_grid_matches_torchvision(n, n_rows):
    from torchvision.utils import make_grid as tv_make_grid

    gen = torch.Generator().manual_seed(100 * n + n_rows)
    x = torch.randint(0, 256, (n, 3, 10, 14), generator=gen, dtype=torch.uint8)
    ours = iio.make_grid([Image.fromarray(t.permute(1, 2, 0).numpy()) for t in x], n_rows)
    theirs = tv_make_grid(x, nrow=n_rows).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_grid_shape_and_reference_pipeline():
    """The reference grids its float samples and truncates once; gridding our saved samples agrees."""
    from torchvision.utils import make_grid as tv_make_grid

    x = torch.randn(5, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 1.2  # some clipping
    samples = iio.tensor_to_pil(x)
    ours = iio.make_grid(samples, 2)
    assert ours.size == (2 * (24 + 2) + 2, 3 * (16 + 2) + 2)
    grid = tv_make_grid(torch.clamp((x + 1.0) / 2.0, 0.0, 1.0), nrow=2)
    reference = (255.0 * grid.permute(1, 2, 0).numpy()).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(ours), reference)
    assert np.asarray(ours)[:2].max() == 0 and np.asarray(ours)[-18:, 28:].max() == 0  # padding, empty cell


# ------------------------------------------------------------------ metadata


def test_format_parameters_a1111_layout():
    settings = {"Model": "v2-1_768-ema-pruned", "Size": (512, 768), "Seed": 42, "Eta": 0.0,
                "CFG scale": 9.0, "Sampler": "DDIM", "Steps": 50, "Model hash": "abcdef1234", "Unused": None}
    assert metadata.format_parameters("a cat", "blurry", settings) == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 50, Sampler: DDIM, CFG scale: 9.0, Seed: 42, Size: 512x768, Model hash: abcdef1234, "
        "Model: v2-1_768-ema-pruned, Eta: 0.0")
    assert metadata.format_parameters("a cat", "", {"Steps": 2}) == "a cat\nSteps: 2"
    assert metadata.format_parameters("", "", {"Steps": 2}) == "Steps: 2"
    with pytest.raises(ValueError):
        metadata.format_parameters("a", "", {"Bad, key": 1})


@pytest.mark.parametrize("value, written", [
    ("DPM++ 2M", "DPM++ 2M"),
    ("a, b", '"a, b"'),
    ("x: y", '"x: y"'),
    ("two\nlines", '"two\\nlines"'),
    ('say "hi"', 'say "hi"'),  # A1111 leaves inner quotes alone
    ('"lead', '"\\"lead"'),  # ... but a leading quote would be read as quoting: we quote it
    (" padded ", '" padded "'),
    ("café ✓", "café ✓"),
    ("é, ✓", '"é, ✓"'),  # ensure_ascii=False, as A1111
])
def test_quoting(value, written):
    assert metadata.format_parameters("p", "", {"K": value}) == f"p\nK: {written}"


PROMPTS = ["", "a cat", "multi\nline\nprompt", " spaced  ", "unicode ✓ café, with: colon"]
NEGATIVES = ["", "blurry", "two\nlines", "Negative prompt: nested", " lead"]
SETTINGS = [
    {},
    {"Steps": "50", "Sampler": "DDIM", "CFG scale": "9.0", "Seed": "42", "Size": "512x512"},
    {"Model": "name, with comma", "Note": 'has "quotes", and: colons', "Empty": "", "Eta": "0.0"},
    {"Lines": "a\nb\r\nc", "Tab": "x\ty", "Slash": "back\\slash", "Lead": '"quoted"', "Pad": " x "},
    {"Sampler": "DPM++ 2M Karras", "Uni": "日本語, テスト", "Json": '{"a": [1, 2]}', "Trail": "end,"},
]


@pytest.mark.parametrize("prompt, negative, settings", list(itertools.product(PROMPTS, NEGATIVES, SETTINGS)))
def test_parameters_round_trip(prompt, negative, settings):
    text = metadata.format_parameters(prompt, negative, settings)
    assert metadata.parse_parameters(text) == (prompt, negative, settings)
    # AUTOMATIC1111's reader (its settings-line grammar, written independently here) agrees.
    a1111 = {}
    last = text.split("\n")[-1]
    for key, value in re.findall(r'\s*([^,:]+?):\s*("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', last):
        a1111[key] = json.loads(value) if len(value) > 1 and value[0] == value[-1] == '"' else value
    assert {k: v for k, v in a1111.items() if v} == {k: v for k, v in settings.items() if v}


def test_parse_a1111_text():
    text = ("girl with a beret, blue eyes, ((eyeshadow)), detailed\n"
            "Negative prompt: ugly, (((deformed))), [blurry]\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, "
            'Model hash: 45dee52b, Lora hashes: "a: 1, b: 2", Tiling')
    assert metadata.parse_parameters(text) == (
        "girl with a beret, blue eyes, ((eyeshadow)), detailed",
        "ugly, (((deformed))), [blurry]",
        {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size": "512x512",
         "Model hash": "45dee52b", "Lora hashes": "a: 1, b: 2", "Tiling": "Tiling"})


def test_png_text_read_back_by_plain_pil(tmp_path):
    text = metadata.format_parameters("日本 prompt, ✓\nsecond line", "neg: x", {"Steps": 3, "Model": "m, 1"})
    path = iio.save_png(solid((1, 2, 3)), tmp_path / "p.png", {"parameters": text, "Other": "latin é"},
                        watermark=False)
    assert Image.open(path).text == {"parameters": text, "Other": "latin é"}
    assert metadata.read_png_text(path) == {"parameters": text, "Other": "latin é"}
    assert metadata.parse_parameters(metadata.read_png_text(path)["parameters"])[0] == "日本 prompt, ✓\nsecond line"
    assert metadata.read_png_text(iio.save_png(solid((0, 0, 0)), tmp_path / "q.png", watermark=False)) == {}
    with pytest.raises(SDError, match="image not found"):
        metadata.read_png_text(tmp_path / "missing.png")


def test_model_hash(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"abc")
    assert metadata.model_hash(path) == "ba7816bf8f"  # SHA-256("abc") = ba7816bf8f01cfea...
    data = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 5, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()[:10]
    assert metadata.model_hash(path, chunk_size=65536) == expected
    monkeypatch.setattr("builtins.open", lambda *a, **k: pytest.fail("cache miss"))
    assert metadata.model_hash(path) == expected  # (path, size, mtime) unchanged: from the cache
    monkeypatch.undo()
    path.write_bytes(b"")
    assert metadata.model_hash(path) == "e3b0c44298"  # SHA-256 of nothing
    with pytest.raises(SDError, match="checkpoint not found"):
        metadata.model_hash(tmp_path / "nope.ckpt")


# ------------------------------------------------------------------ input images


def _png_bytes(img, **kwargs):
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def test_load_image_errors(tmp_path):
    with pytest.raises(SDError) as info:
        iio.load_image(tmp_path / "nope.png")
    assert str(info.value) == f"image not found: {tmp_path / 'nope.png'}"
    with pytest.raises(SDError, match="is a folder, not an image"):
        iio.load_image(tmp_path)
    (tmp_path / "t.png").write_text("not an image")
    with pytest.raises(SDError, match="not an image file"):
        iio.load_image(tmp_path / "t.png")

    img = natural(64, 64)
    data = _png_bytes(img)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name in ("cut.png", "cut.jpg"):
        with pytest.raises(SDError) as info:
            iio.load_image(tmp_path / name)
        assert "truncated or corrupt" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    assert iio.load_image(tmp_path / "ok.jpg").size == (64, 64)


def test_load_image_applies_exif_orientation(tmp_path):
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # H=2, W=3
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    (tmp_path / "o.png").write_bytes(_png_bytes(Image.fromarray(arr), exif=exif))
    loaded = iio.load_image(tmp_path / "o.png")
    assert loaded.size == (2, 3)
    np.testing.assert_array_equal(np.asarray(loaded), np.rot90(arr, k=-1))


def test_load_image_alpha_palette_and_16_bit(tmp_path):
    rgba = np.array([[[0, 0, 0, 0], [255, 0, 0, 128], [10, 20, 30, 255]]], dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(_png_bytes(Image.fromarray(rgba)))
    rgb = np.asarray(iio.load_image(tmp_path / "a.png"))
    a = rgba[..., 3:] / 255.0
    np.testing.assert_allclose(rgb, rgba[..., :3] * a + 255 * (1 - a), atol=1)  # over white
    assert rgb.tolist() == [[[255, 255, 255], [255, 127, 127], [10, 20, 30]]]
    # Other modes convert plainly: a mask's alpha does not turn into white.
    assert np.asarray(iio.load_image(tmp_path / "a.png", mode="L")).tolist() == [[0, 76, 18]]

    pal = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 255, 0, 255, 0])
    (tmp_path / "p.png").write_bytes(_png_bytes(pal, transparency=0))
    assert np.asarray(iio.load_image(tmp_path / "p.png")).tolist() == [[[255, 255, 255], [0, 255, 0]]]

    grey16 = Image.fromarray(np.array([[0, 25600, 65535]], dtype=np.uint16))
    (tmp_path / "g.png").write_bytes(_png_bytes(grey16))
    assert np.asarray(iio.load_image(tmp_path / "g.png")).tolist() == [[[0] * 3, [100] * 3, [255] * 3]]


def test_pil_to_tensor_matches_reference_formula():
    img = natural(16, 24)
    x = iio.pil_to_tensor(img)
    assert x.shape == (1, 3, 16, 24) and x.dtype == torch.float32
    ref = 2.0 * torch.from_numpy((np.array(img).astype(np.float32) / 255.0)[None].transpose(0, 3, 1, 2)) - 1.0
    assert torch.equal(x, ref)
    edge = iio.pil_to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert edge.flatten().tolist() == [-1.0, 1.0, pytest.approx(1 / 255, abs=1e-7)]


def test_tensor_to_pil_truncates_like_reference():
    # 255 * clamp((x + 1) / 2) = 254.9, 0.6, 255 (clamped), 0 (clamped), 127.5
    vals = torch.tensor([254.9 / 255 * 2 - 1, 0.6 / 255 * 2 - 1, 3.0, -7.0, 0.0])
    x = vals.view(1, 1, 1, 5).expand(2, 3, 1, 5).clone()
    x[1] *= -1
    imgs = iio.tensor_to_pil(x)
    assert [im.size for im in imgs] == [(5, 1), (5, 1)] and imgs[0].mode == "RGB"
    assert np.asarray(imgs[0])[0, :, 0].tolist() == [254, 0, 255, 0, 127]
    assert np.asarray(imgs[1])[0, :, 0].tolist() == [0, 254, 0, 255, 127]
    assert np.asarray(iio.tensor_to_pil(x[0].half())[0]).tolist() == np.asarray(imgs[0]).tolist()

    # The reference's truncation does not invert its own load_img exactly: in float32, levels 1..63
    # come back one lower from pil_to_tensor -> tensor_to_pil (2k/255 - 1 loses low bits near -1).
    levels = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2))
    back = np.asarray(iio.tensor_to_pil(iio.pil_to_tensor(levels))[0])[0, :, 0].astype(int)
    diff = back - np.arange(256)
    assert np.nonzero(diff)[0].tolist() == list(range(1, 64)) and set(diff[1:64].tolist()) == {-1}


def test_resize_to_multiple():
    img = natural(700, 1000)
    out = iio.resize_to_multiple(img, 64)
    assert out.size == (960, 640)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((960, 640), Image.LANCZOS)))
    assert iio.resize_to_multiple(img, 64, max_side=512).size == (512, 320)  # 1000x700 -> 512x358 -> 512x320
    assert iio.resize_to_multiple(img, 8, max_side=2000).size == (1000, 696)  # never enlarged
    same = natural(128, 192)
    np.testing.assert_array_equal(np.asarray(iio.resize_to_multiple(same, 64)), np.asarray(same))
    with pytest.raises(SDError, match="each side must be at least 64 pixels"):
        iio.resize_to_multiple(natural(63, 200), 64)
