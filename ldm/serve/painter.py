"""The page's mask painter: strokes painted over the inpaint picture, handed to the server as one PNG.

gradio's ImageEditor would do, but once it has been an event's input, gradio 6 re-reads its value on every
later status message of any event, and each read uploads its background, layers and composite again
(about 15 uploads a second while anything runs, for as long as the page is open). This painter is a
gr.HTML component: the picture stays in an ordinary gr.Image (which reads its value without uploading),
the strokes live on a canvas in the browser, and the component's value is the strokes as a PNG data URL
(a few KB: white on transparent), sent only with the Generate call.
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.errors import SDError

# The painter's markup; the picture shown under the strokes is the gr.Image's (PICTURE_ID), followed by a
# MutationObserver, so an upload, a paste or a send-to all reach it.
TEMPLATE = """
<div class="sd-painter" data-ready="0">
  <div class="sd-stack"><canvas class="sd-picture"></canvas><canvas class="sd-strokes"></canvas></div>
  <p class="sd-hint">Upload a picture above, then paint over what to repaint.</p>
  <label>Brush <input class="sd-size" type="range" min="4" max="160" value="32"></label>
  <button class="sd-clear" type="button">Clear mask</button>
</div>
"""

CSS = """
.sd-stack { position: relative; width: 100%; }
.sd-stack canvas { display: block; width: 100%; height: auto; }
.sd-strokes { position: absolute; left: 0; top: 0; opacity: 0.55; cursor: crosshair; touch-action: none; }
.sd-painter[data-ready="0"] .sd-stack { display: none; }
.sd-painter[data-ready="1"] .sd-hint { display: none; }
"""

JS = """
const picture = element.querySelector('.sd-picture'), strokes = element.querySelector('.sd-strokes');
const root = element.querySelector('.sd-painter'), size = element.querySelector('.sd-size');
let source = null, drawing = false, last = null;
function save() { props.value = root.dataset.painted === '1' ? strokes.toDataURL('image/png') : ''; }
function clear() { strokes.getContext('2d').clearRect(0, 0, strokes.width, strokes.height);
                   root.dataset.painted = '0'; save(); }
function load(src) {
  source = src;
  if (!src) { root.dataset.ready = '0'; clear(); return; }
  const img = new Image();
  img.onload = () => {
    if (source !== src) return;
    for (const c of [picture, strokes]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
    picture.getContext('2d').drawImage(img, 0, 0);
    root.dataset.ready = '1'; root.dataset.size = img.naturalWidth + 'x' + img.naturalHeight;
    clear();
  };
  img.src = src;
}
function watch() {
  const host = document.getElementById('__PICTURE_ID__');
  if (!host) { setTimeout(watch, 300); return; }
  const look = () => { const img = host.querySelector('img'); const src = img ? img.src : null;
                       if (src !== source) load(src); };
  new MutationObserver(look).observe(host, {subtree: true, childList: true, attributes: true,
                                            attributeFilter: ['src']});
  look();
}
function point(e) { const r = strokes.getBoundingClientRect();
  return [(e.clientX - r.left) * strokes.width / r.width, (e.clientY - r.top) * strokes.height / r.height]; }
function line(a, b) { const g = strokes.getContext('2d'), r = strokes.getBoundingClientRect();
  g.strokeStyle = '#ffffff'; g.fillStyle = '#ffffff'; g.lineCap = 'round'; g.lineJoin = 'round';
  g.lineWidth = Number(size.value) * strokes.width / r.width;
  g.beginPath(); g.moveTo(a[0], a[1]); g.lineTo(b[0], b[1]); g.stroke(); root.dataset.painted = '1'; }
strokes.addEventListener('pointerdown', e => { drawing = true; last = point(e); line(last, last);
                                                strokes.setPointerCapture(e.pointerId); });
strokes.addEventListener('pointermove', e => { if (!drawing) return; const p = point(e); line(last, p); last = p; });
for (const end of ['pointerup', 'pointercancel']) strokes.addEventListener(end, () => {
  if (drawing) { drawing = false; save(); } });
element.querySelector('.sd-clear').addEventListener('click', clear);
watch();
"""

MAX_MASK_BYTES = 32 * 2 ** 20  # a data URL longer than this is no stroke canvas sd made


def painter_js(picture_id: str) -> str:
    """The painter's script for the gr.Image whose elem_id is `picture_id`."""
    return JS.replace("__PICTURE_ID__", picture_id)


def mask_of(value: str, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """The painter's value -> an "L" mask of `size` (white: repaint); SDError for anything else."""
    if not value:
        raise SDError("nothing is painted yet: paint the part to repaint, then Generate")
    if not isinstance(value, str) or len(value) > MAX_MASK_BYTES or not value.startswith("data:image/png;base64,"):
        raise SDError("the mask is not a PNG the page's painter made")
    try:
        raw = base64.b64decode(value.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise SDError(f"the mask is {im.width}x{im.height} pixels, above the server's max_pixels")
            strokes = np.asarray(im.convert("RGBA"))[..., 3] > 0
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise SDError("the mask is not a PNG the page's painter made") from None
    if not strokes.any():
        raise SDError("nothing is painted yet: paint the part to repaint, then Generate")
    mask = Image.fromarray(np.where(strokes, 255, 0).astype(np.uint8))
    return mask if mask.size == size else mask.resize(size, Image.NEAREST)
