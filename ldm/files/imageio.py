"""Image files and pictures: the one place that touches image files (no model code).

What lives here:
- the reference txt2img output layout, OUTDIR/samples/00000.png ... and OUTDIR/grid-0000.png ...,
  with names reserved safely when several processes write into the same folder;
- atomic PNG writes: a hidden temporary file in the target folder, published under its final name in
  one step, removed again on any failure (KeyboardInterrupt included), so no half-written PNG is ever
  visible under a final name;
- the reference's invisible watermark "SDV2" (invisible-watermark, method dwtDct);
- the reference's image grid (torchvision's make_grid semantics, on numpy);
- PNGs encoded to bytes in memory with their text chunks (what a server sends);
- loading input images with one-line SDErrors, and the reference's PIL <-> tensor conversions.

The PNG "parameters" text lives in ldm.files.metadata. torch and invisible-watermark (which pulls in cv2) are imported only by the functions that need them, so
that importing this module stays cheap for the CLI's fast paths (--help, argument errors).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from ldm.errors import SDError

SAMPLE_DIGITS = 5  # OUTDIR/samples/00000.png
# Numbered names of more digits than this are not sd's (a run would need 10**15 images): a file named with a
# 300-digit number must not push every later name past the file system's length limit.
MAX_INDEX_DIGITS = 15
MAX_INDEX = 10 ** MAX_INDEX_DIGITS - 1
GRID_DIGITS = 4  # OUTDIR/grid-0000.png
GRID_PREFIX = "grid-"
WATERMARK = b"SDV2"
WATERMARK_METHOD = "dwtDct"
# invisible-watermark refuses images with fewer pixels than this (it checks rows * cols, not each side).
WATERMARK_MIN_PIXELS = 256 * 256


# --------------------------------------------------------------------------------------------------
# Output folders and atomic writes
# --------------------------------------------------------------------------------------------------


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create the folder `path` (and its parents) if needed and prove that files can be created in it.

    Writability is proven by creating and removing a probe file, because os.access() says yes to root
    even on read-only mounts. Raises SDError("cannot write to PATH: reason") on any failure.
    """
    folder = Path(path)
    try:
        if folder.exists() and not folder.is_dir():
            raise SDError(f"cannot write to {folder}: it exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".sd-probe-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except SDError:
        raise
    except OSError as exc:
        raise SDError(f"cannot write to {folder}: {_reason(exc)}") from None
    return folder


def _numbered_name(index: int, digits: int, prefix: str = "", suffix: str = ".png") -> str:
    return f"{prefix}{index:0{digits}d}{suffix}"


def next_index(folder: str | os.PathLike, pattern_digits: int, prefix: str = "",
               suffix: str = ".png") -> int:
    """The number after the highest `prefix` + number + `suffix` file in `folder` (0 if none).

    Names count when the number has at least `pattern_digits` digits (the reference's f"{n:05}" grows
    past 99999) and at most MAX_INDEX_DIGITS. Unlike the reference, which takes len(os.listdir(folder)) and so overwrites files
    after any deletion (or counts unrelated files), this continues after the highest number, so an
    existing image is never overwritten. A missing folder gives 0.
    """
    pattern = re.compile(rf"{re.escape(prefix)}(\d{{{pattern_digits},{MAX_INDEX_DIGITS}}}){re.escape(suffix)}")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    numbers = [int(m.group(1)) for m in map(pattern.fullmatch, names) if m]
    return max(numbers) + 1 if numbers else 0


def _pnginfo(metadata: Mapping[str, str] | None) -> PngImagePlugin.PngInfo | None:
    if not metadata:
        return None
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)  # PIL writes iTXt (UTF-8) when the value is not latin-1
    return info


def _encode_png(image: Image.Image, f, metadata: Mapping[str, str] | None) -> None:
    """The one PNG encoding of sd: files and in-memory bytes are the same bytes."""
    pnginfo = _pnginfo(metadata)
    image.save(f, format="PNG", **({"pnginfo": pnginfo} if pnginfo else {}))


def png_bytes(image: Image.Image, metadata: Mapping[str, str] | None = None) -> bytes:
    """`image` encoded as PNG bytes with text chunks `metadata` (no watermark is added: give a marked image),
    byte for byte what save_png writes for it."""
    buffer = io.BytesIO()
    _encode_png(image, buffer, metadata)
    return buffer.getvalue()


def _write_temp_png(image: Image.Image, final: Path, metadata: Mapping[str, str] | None) -> Path:
    """Encode `image` into a new hidden file beside `final`; the file is removed if anything fails."""
    folder = final.parent
    tmp = folder / f".{final.stem}.{secrets.token_hex(4)}.tmp"
    try:
        # os.open with 0o666 lets the umask decide the final permissions, like a plain PIL save.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise SDError(f"cannot write to {folder}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            _encode_png(image, f, metadata)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name appears
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise SDError(f"cannot write {final}: {_reason(exc)}") from None
        raise
    return tmp


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}


def _publish_new(tmp: Path, final: Path) -> None:
    """Give the finished temp file the name `final`, raising FileExistsError if that name is taken.

    os.link fails atomically when `final` exists, so two writers can never take the same name. On
    file systems without hard links (FAT, some network mounts) the name is reserved by creating it
    exclusively and then replaced by the finished file: readers may see an empty file for that
    moment, never a partial PNG, and the placeholder is removed again if the rename fails.
    """
    try:
        os.link(tmp, final)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
    os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(final)
        raise


def _prepared(image: Image.Image, watermark: bool) -> Image.Image:
    return apply_watermark(image) if watermark else image


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
             watermark: bool = True, overwrite: bool = True) -> Path:
    """Write `image` as a PNG at `path` atomically, with text chunks `metadata` and the watermark.

    The PNG is written to a hidden temp file in the same folder and then renamed (overwrite=True) or
    hard-linked (overwrite=False: SDError if `path` exists) into place; the temp file is removed on
    every path out, including KeyboardInterrupt. Returns the path written.
    """
    final = Path(path)
    image = _prepared(image, watermark)
    tmp = _write_temp_png(image, final, metadata)
    try:
        if overwrite:
            os.replace(tmp, final)
        else:
            _publish_new(tmp, final)
    except FileExistsError:
        raise SDError(f"{final} already exists; not overwriting it") from None
    except OSError as exc:
        raise SDError(f"cannot write {final}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return final


def save_numbered(image: Image.Image, folder: str | os.PathLike, digits: int, prefix: str = "",
                  metadata: Mapping[str, str] | None = None, watermark: bool = True,
                  start: int | None = None) -> Path:
    """Save `image` as folder/<prefix><number>.png under the first free number, never overwriting.

    The search starts at `start` (default: next_index(folder, digits, prefix)). The PNG is encoded
    once into a temp file; publishing it under a name that another process took in the meantime
    fails atomically, and the next number is tried (rescanning the folder so a stale `start` costs
    one retry, not one per file). Returns the path written.
    """
    folder = Path(folder)
    index = next_index(folder, digits, prefix) if start is None else start
    image = _prepared(image, watermark)
    tmp = _write_temp_png(image, folder / _numbered_name(index, digits, prefix), metadata)
    try:
        while True:
            final = folder / _numbered_name(index, digits, prefix)
            try:
                _publish_new(tmp, final)
                return final
            except FileExistsError:
                index = max(index + 1, next_index(folder, digits, prefix))
            except OSError as exc:
                raise SDError(f"cannot write {final}: {_reason(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------------
# Invisible watermark
# --------------------------------------------------------------------------------------------------


def check_watermark_size(width: int, height: int) -> None:
    """Raise SDError unless a width x height image can carry the watermark (the CLI calls this early).

    The rule is invisible-watermark's own, which the reference scripts inherit: at least 256*256
    pixels in total (so 512x128 passes, 255x256 does not).
    """
    if width * height < WATERMARK_MIN_PIXELS:
        raise SDError(f"image size {width}x{height} is too small for the invisible watermark: it needs "
                      f"at least {WATERMARK_MIN_PIXELS} pixels (256x256); use a larger size")


def _bgr(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        raise ValueError(f"the watermark works on RGB images, got mode {img.mode}")
    return np.ascontiguousarray(np.asarray(img)[:, :, ::-1])  # cv2's channel order


def apply_watermark(img: Image.Image) -> Image.Image:
    """Return a copy of the RGB image `img` carrying the reference's invisible watermark b"SDV2".

    Exactly the reference's put_watermark: invisible-watermark's WatermarkEncoder, method dwtDct, on
    the BGR uint8 array, so the pixels equal the reference's for the same input. That encoder has two
    known defects we keep for compatibility: it embeds into a Haar-DWT band without the DCT its name
    promises and swaps the horizontal and vertical detail bands of the U channel on the way back, so
    the distortion grows with fine colour texture (measured PSNR: about 41 dB on smooth images,
    29-33 dB on textured ones), and read_watermark does not recover the bytes from every image
    (smooth images often decode wrongly). RGBA keeps its alpha channel untouched.
    Raises SDError for images below WATERMARK_MIN_PIXELS.
    """
    from imwatermark import WatermarkEncoder

    check_watermark_size(*img.size)
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARK)
    bgr = encoder.encode(_bgr(img.convert("RGB") if alpha is not None else img), WATERMARK_METHOD)
    out = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
    if alpha is not None:
        out.putalpha(alpha)
    return out


def read_watermark(img: Image.Image, length: int = len(WATERMARK)) -> bytes:
    """The `length` watermark bytes that invisible-watermark's dwtDct decoder reads from `img`.

    Returns b"SDV2" for images we watermarked (where the library's decoder manages, see
    apply_watermark) and arbitrary bytes for others. Raises SDError for images that are too small.
    """
    from imwatermark import WatermarkDecoder

    check_watermark_size(*img.size)
    decoder = WatermarkDecoder("bytes", 8 * length)
    return decoder.decode(_bgr(img.convert("RGB")), WATERMARK_METHOD)


# --------------------------------------------------------------------------------------------------
# Grid
# --------------------------------------------------------------------------------------------------


def make_grid(images: list[Image.Image], n_rows: int, padding: int = 2, pad_value: int = 0) -> Image.Image:
    """Tile `images` like the reference (torchvision.utils.make_grid(x, nrow=n_rows)), pixel for pixel.

    As in torchvision, `n_rows` is the number of images in each ROW (the reference's --n_rows name
    notwithstanding): min(n_rows, len(images)) columns, ceil(len / columns) rows, `padding` pixels of
    `pad_value` around and between the tiles, the last row left-aligned. A single image is returned
    unpadded, as torchvision does. All images must share size and mode; the grid has that mode (a
    grayscale grid stays "L", where torchvision would make 3 channels). The CLI maps --n_rows 0 to
    n_samples before calling this.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if n_rows < 1:
        raise ValueError(f"n_rows must be at least 1, got {n_rows}")
    if any(im.size != images[0].size or im.mode != images[0].mode for im in images):
        raise ValueError("make_grid needs images of one size and mode")
    if len(images) == 1:
        return images[0].copy()
    tiles = [np.asarray(im) for im in images]
    h, w = tiles[0].shape[:2]
    cols = min(n_rows, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding) + tiles[0].shape[2:],
                   pad_value, dtype=tiles[0].dtype)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = tile
    return Image.fromarray(grid)


# --------------------------------------------------------------------------------------------------
# Input images and tensors
# --------------------------------------------------------------------------------------------------

# Input images are decoded whole; above this many pixels (an 8000x8000 photo is 64 million) decoding alone
# takes gigabytes, and every mode shrinks its input far below it anyway.
MAX_INPUT_PIXELS = 64_000_000
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B")


def _to_8_bits(im: Image.Image, what: str) -> Image.Image:
    """8-bit grey from 16-bit, 32-bit integer or float grey, by the range its values really use (PIL's own
    convert clips them at 255, which turns a 16-bit picture white and a 0..1 float one black):
    16-bit files by their depth, 32-bit integers within 0..255 or 0..65535 as 8- or 16-bit ones and larger
    ones from 0..their maximum (with a note), float pictures holding 0..1 scaled to 0..255; anything else
    (negative values, NaN, floats past 255) is one SDError line."""
    values = np.asarray(im)
    if im.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray((values.astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    if im.mode == "F" and not np.isfinite(values).all():
        raise SDError(f"{what} is a float image with NaN or infinite values: sd cannot read it as a picture")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0:
        raise SDError(f"{what} is a {'float' if im.mode == 'F' else '32-bit integer'} image with values from "
                      f"{low:g} to {high:g}; sd reads pictures whose values are 0 or more")
    if im.mode == "F":
        if high > 255:
            raise SDError(f"{what} is a float image with values up to {high:g}; sd reads float pictures "
                          "holding 0..1 or 0..255")
        scaled = values * 255.0 if high <= 1.0 else values
        return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8))
    if high <= 65535:  # 32-bit storage of 8- or 16-bit values (older Pillow opens 16-bit PNGs as "I")
        return Image.fromarray((values.astype(np.int64) >> (0 if high <= 255 else 8)).astype(np.uint8))
    from ldm.errors import note

    note(f"{what} is a 32-bit integer image with values 0..{high:.0f}; read as 0..{high:.0f} -> 0..255")
    return Image.fromarray(np.rint(values.astype(np.float64) * (255.0 / high)).astype(np.uint8))


def _convert(im: Image.Image, mode: str, what: str = "the picture") -> Image.Image:
    """Convert to `mode`; 16-bit, 32-bit and float grey are brought to 8 bits (_to_8_bits); for "RGB",
    transparency goes over white.

    White rather than the reference's plain .convert("RGB") (which keeps whatever colour hides under
    transparent pixels, often black or junk): cut-outs and logos are drawn to be seen on white. Other
    modes (e.g. "L" for masks) convert plainly, so a mask's alpha does not turn into "repaint".
    """
    if im.mode == mode:
        return im
    if im.mode in (*_SIXTEEN_BIT_MODES, "I", "F"):
        im = _to_8_bits(im, what)
    if mode == "RGB" and im.has_transparency_data:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert(mode)


def load_image(path: str | os.PathLike | Image.Image, mode: str = "RGB", what: str = "the image") -> Image.Image:
    """Open, fully decode and orient an input image; SDError one-liners for every user mistake.

    The whole file is decoded up front (.load()), so a truncated PNG/JPEG fails here and not halfway
    through a run. EXIF orientation is applied (photos from phones), then the image is converted to
    `mode` as _convert says (transparency over white for "RGB"). A PIL image (the Python API's input) is
    held to the same size bound and conversion; `what` names it in errors. Only regular files are read.
    """
    if isinstance(path, Image.Image):
        width, height = path.size
        if width * height > MAX_INPUT_PIXELS:
            raise SDError(f"{what} is {width}x{height} pixels, more than sd reads ({MAX_INPUT_PIXELS // 10**6} "
                          "megapixels); shrink it first")
        if width < 1 or height < 1:
            raise SDError(f"{what} is empty ({width}x{height} pixels)")
        return _convert(path, mode, what)
    from ldm.files.reading import open_regular

    p = Path(path)
    with open_regular(p, "image") as f:
        return decode_picture(f, str(p), mode)


def decode_picture(f, name: str, mode: str = "RGB", max_pixels: int = MAX_INPUT_PIXELS,
                   bound: str = "") -> Image.Image:
    """The picture in the binary file `f` (a file, or an upload's io.BytesIO) decoded, oriented by its EXIF
    tag and converted to `mode`: the one decoder of input pictures, for the commands and the server alike.
    Its size is read from the header and held to `max_pixels` (`bound` says whose bound that is) before a
    pixel is decoded; every failure is one SDError line naming `name`."""
    limit = f"{bound or 'sd reads'} ({max_pixels / 10**6:g} megapixels)"

    def too_large(width, height) -> SDError:
        return SDError(f"{name} is {width}x{height} pixels, {'above' if bound else 'more than'} {limit}; shrink it first")

    try:
        with Image.open(f) as im:
            width, height = im.size  # from the header: nothing is decoded yet
            if width * height > max_pixels:
                raise too_large(width, height)
            im.load()
            im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise SDError(f"cannot read {name}: not an image file (or a format Pillow cannot decode)") from None
    except Image.DecompressionBombError:  # Pillow's own bound (above ours) met while opening
        raise SDError(f"{name} has more pixels than {limit}; shrink it first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SDError(f"cannot read {name}: the file is truncated or corrupt ({exc})") from None
    return _convert(im, mode, name)


def pil_to_tensor(img: Image.Image):
    """(1, 3, H, W) float32 in [-1, 1], computed as the reference's load_img: 2 * (x / 255) - 1."""
    import torch

    x = np.asarray(_convert(img, "RGB")).astype(np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None]))  # (1, 3, H, W)
    return 2.0 * x - 1.0


def tensor_to_pil(x) -> list[Image.Image]:
    """Images from (B, 3, H, W) (or (3, H, W)) in [-1, 1], as the reference saves its samples.

    clamp((x + 1) / 2, 0, 1), times 255 in float32, then astype(uint8), which TRUNCATES (0.999 * 255
    gives 254): the reference's rounding, kept so our PNGs match its PNGs. Half/bf16 input is first
    made float32.
    """
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
    x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    arrays = 255.0 * x.numpy().transpose(0, 2, 3, 1)  # (B, H, W, 3) float32
    return [Image.fromarray(a.astype(np.uint8)) for a in arrays]


def resize_to_multiple(img: Image.Image, multiple: int, max_side: int | None = None) -> Image.Image:
    """Shrink `img` so each side is a multiple of `multiple` (rounding each side down), LANCZOS.

    With `max_side`, the image is first scaled (aspect kept, sides rounded down) so its longer side
    is at most max_side; it is never enlarged. Sides that already fit are returned unresampled (a
    copy). Like the reference img2img, which cuts each side down to a multiple of 64, the aspect
    ratio may change by less than one multiple per side. SDError if a side would become 0.
    """
    w, h = img.size
    if max_side is not None and max(w, h) > max_side:
        long_side = max(w, h)
        w, h = w * max_side // long_side, h * max_side // long_side
    w, h = w - w % multiple, h - h % multiple
    if w == 0 or h == 0:
        raise SDError(f"image {img.size[0]}x{img.size[1]} is too small: each side must be at least "
                      f"{multiple} pixels" + (f" after scaling to at most {max_side}" if max_side else ""))
    if (w, h) == img.size:
        return img.copy()
    return img.resize((w, h), resample=Image.LANCZOS)
