"""TAESD, the tiny autoencoder for SD 1/2 latents (madebyollin/taesd): a decoder of about 1.2 M parameters
(the SD VAE's has 49.5 M) and its encoder, under the key names of the published weight files.

The decoder takes the sampler's latents as they are (already times the model's scale factor, 0.18215) and
gives pictures in [0, 1]; the encoder takes [0, 1] pictures and gives sampler-space latents. `decode` and
`encode` here speak sd's convention instead: pictures in [-1, 1], like decode_first_stage.

Three file forms are read, each strictly by its keys: taesd_decoder.pth / .safetensors (a plain
nn.Sequential state_dict; the encoder file beside it when present: taesd_encoder.*), and a diffusers
AutoencoderTiny folder (config.json + diffusion_pytorch_model.safetensors, keys decoder.layers.N / encoder.layers.N).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ldm.errors import SDError

WIDTH = 64  # every TAESD layer's channels
LATENT_CHANNELS = 4
MAX_FILE_BYTES = 64 * 2 ** 20  # the files are 4.9 MB each


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """tanh(x / 3) * 3: latents beyond about +-3 are squashed before decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """ReLU(conv-ReLU-conv-ReLU-conv(x) + skip(x)); skip is a 1x1 conv without bias where the widths differ."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def make_encoder() -> nn.Sequential:
    """[0, 1] pictures (B, 3, H, W) -> latents (B, 4, H / 8, W / 8): conv, Block, then three times a stride-2
    conv and three Blocks, then conv to the latent channels."""
    layers: list[nn.Module] = [_conv(3, WIDTH), Block(WIDTH, WIDTH)]
    for _ in range(3):
        layers += [_conv(WIDTH, WIDTH, stride=2, bias=False), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH),
                   Block(WIDTH, WIDTH)]
    return nn.Sequential(*layers, _conv(WIDTH, LATENT_CHANNELS))


def make_decoder() -> nn.Sequential:
    """Latents (B, 4, h, w) -> [0, 1] pictures (B, 3, 8h, 8w): Clamp, conv, ReLU, three times three Blocks, a
    2x nearest upsample and a conv without bias, then a Block and the conv to RGB."""
    layers: list[nn.Module] = [Clamp(), _conv(LATENT_CHANNELS, WIDTH), nn.ReLU()]
    for _ in range(3):
        layers += [Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), Block(WIDTH, WIDTH), nn.Upsample(scale_factor=2),
                   _conv(WIDTH, WIDTH, bias=False)]
    return nn.Sequential(*layers, Block(WIDTH, WIDTH), _conv(WIDTH, 3))


class TinyAutoencoder(nn.Module):
    """TAESD's decoder and (when its file was given) encoder, in sd's [-1, 1] picture convention."""

    def __init__(self, with_encoder: bool = True):
        super().__init__()
        self.decoder = make_decoder()
        self.encoder = make_encoder() if with_encoder else None
        self.files: tuple[str, ...] = ()  # what it was read from, for messages and the infotext

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Sampler-space latents (B, 4, h, w) -> pictures (B, 3, 8h, 8w) in [-1, 1]."""
        return self.decoder(z.to(self.dtype)).clamp(0, 1) * 2 - 1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pictures (B, 3, H, W) in [-1, 1] -> sampler-space latents (B, 4, H / 8, W / 8)."""
        self.require_encoder()
        return self.encoder(((x + 1) / 2).to(self.dtype))

    def require_encoder(self) -> None:
        """SDError saying which file is missing when only the decoder was loaded."""
        if self.encoder is None:
            raise SDError("TAESD's encoder was not loaded: put taesd_encoder.pth (or .safetensors) beside "
                          f"{self.files[0] if self.files else 'the decoder file'}, or give a diffusers AutoencoderTiny folder")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype


# -- reading the files ------------------------------------------------------------------------------------

def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A TAESD file's tensors, read as checkpoints are (no code runs; regular files only; bounded)."""
    from ldm.files.reading import regular_size
    from ldm.loading.checkpoint import read_safetensors, read_torch_file

    size = regular_size(path, "TAESD file")
    if size > MAX_FILE_BYTES:
        raise SDError(f"{path} is {size:,} bytes: too large to be a TAESD file (they are about 5 MB)")
    with open(path, "rb") as f:
        head = f.read(2)
    data = read_torch_file(path, "TAESD file", MAX_FILE_BYTES) if head == b"PK" else read_safetensors(path)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise SDError(f"{path} does not hold a state_dict of tensors")
    return {str(k): v for k, v in data.items()}


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Strict: every key of `module`, no other, each of the module's shape; SDError naming what differs."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"] if unexpected else []
        parts += [f"{len(shapes)} with another shape ({', '.join(shapes[:2])})"] if shapes else []
        raise SDError(f"{path} is not a TAESD file for SD 1/2 latents: keys {'; '.join(parts)}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise SDError(f"{path}: tensor {bad[0]} holds NaN or infinite values")
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)


def _split_diffusers(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A diffusers AutoencoderTiny's keys as the two Sequential state_dicts (its decoder has no Clamp module:
    layer N is TAESD's N + 1); keys of neither half stay in the decoder's, so they are reported."""
    decoder, encoder = {}, {}
    for key, value in tensors.items():
        part, _, rest = key.partition(".layers.")
        index, dot, tail = rest.partition(".")
        if part == "decoder" and index.isdigit() and dot:
            decoder[f"{int(index) + 1}.{tail}"] = value
        elif part == "encoder" and index.isdigit() and dot:
            encoder[f"{index}.{tail}"] = value
        else:
            decoder[key] = value
    return decoder, encoder


def find_files(path: Path) -> tuple[Path, Optional[Path], bool]:
    """(decoder file, encoder file or None, diffusers folder?) for what --taesd names."""
    path = Path(path)
    if path.is_dir():
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if (path / name).is_file():
                return path / name, None, True
        raise SDError(f"{path} is a folder without diffusion_pytorch_model.safetensors (a diffusers AutoencoderTiny "
                      "folder holds it beside config.json)")
    if not path.exists():
        raise SDError(f"TAESD file not found: {path}")
    encoder = None
    if "decoder" in path.name:
        for suffix in (path.suffix, ".safetensors", ".pth"):
            candidate = path.with_name(path.name.replace("decoder", "encoder")).with_suffix(suffix)
            if candidate.is_file():
                encoder = candidate
                break
    return path, encoder, False


def load_taesd(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """TAESD from `path` (see the module's text); SDError (one line) for a missing, wrong or corrupt file."""
    decoder_file, encoder_file, diffusers = find_files(Path(path))
    tensors = _read_tensors(decoder_file)
    if diffusers:
        config = decoder_file.parent / "config.json"
        if config.is_file():
            from ldm.files.reading import read_text_capped

            try:
                settings = json.loads(read_text_capped(config, 1 << 20, "config file"))
            except ValueError as exc:
                raise SDError(f"{config} is not valid JSON ({exc})") from None
            if isinstance(settings, dict) and settings.get("_class_name") not in (None, "AutoencoderTiny"):
                raise SDError(f"{config} describes a {settings.get('_class_name')}, not an AutoencoderTiny (TAESD)")
        decoder_tensors, encoder_tensors = _split_diffusers(tensors)
    else:
        decoder_tensors = tensors
        encoder_tensors = _read_tensors(encoder_file) if encoder_file is not None else {}
    model = TinyAutoencoder(with_encoder=bool(encoder_tensors))
    _assign(model.decoder, decoder_tensors, decoder_file)
    if model.encoder is not None:
        _assign(model.encoder, encoder_tensors, encoder_file or decoder_file)
    model.files = tuple(str(p) for p in (decoder_file, encoder_file) if p is not None)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
