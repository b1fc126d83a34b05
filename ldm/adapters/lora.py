"""LoRA: low-rank weight updates (kohya-ss and diffusers/PEFT files) merged into the loaded model.

W += weight * (alpha / rank) * (up @ down) for each targeted Linear or Conv2d (convolutions over their
flattened kernels: LoCon's 3x3 downs work the same). kohya names modules by their diffusers path with
underscores (`lora_unet_down_blocks_0_attentions_0_proj_in`), the text tower by transformers' CLIP names
(`lora_te_text_model_encoder_layers_3_self_attn_q_proj`), whose q/k/v land on rows of OpenCLIP's fused
`attn.in_proj_weight`; PEFT files use the dotted paths under `unet.` / `text_encoder.`. The names are
derived from our own modules (`targets`), so every key of a file either finds its weight or is reported.
Merging keeps the originals of the weights it touches and `restore` puts them back exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ldm.errors import SDError
from ldm.files.metadata import model_hash
from ldm.text.syntax import lora_weight

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_BYTES = 2 * 2 ** 30  # a rank-128 SD 2 LoRA is a few hundred MB
MAX_FILES = 10_000  # LoRA files listed in a folder (and its subfolders)


@dataclass(frozen=True)
class Target:
    param: nn.Parameter
    rows: Optional[slice] = None  # a part of a fused weight (q, k or v of in_proj_weight)


def _unet_paths(unet) -> dict[str, str]:
    """Our UNet module path -> diffusers' path, for every block (structure read off the model)."""
    from ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    paths = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
             "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
             "middle_block.2": "mid_block.resnets.1"}
    level, j = 0, 0
    for n, block in enumerate(unet.input_blocks):
        if n == 0:
            continue
        if isinstance(block[0], Downsample):
            paths[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, j = level + 1, 0
            continue
        paths[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{j}"
        if len(block) > 1:
            paths[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{j}"
        j += 1
    up, j = 0, 0
    for n, block in enumerate(unet.output_blocks):
        paths[f"output_blocks.{n}.0"] = f"up_blocks.{up}.resnets.{j}"
        for k, layer in enumerate(block):
            if isinstance(layer, Upsample):
                paths[f"output_blocks.{n}.{k}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
            elif k:
                paths[f"output_blocks.{n}.{k}"] = f"up_blocks.{up}.attentions.{j}"
        j += 1
        if isinstance(block[-1], Upsample):
            up, j = up + 1, 0
    return paths


def _diffusers_name(ours: str, paths: dict[str, str]) -> Optional[str]:
    for prefix in sorted(paths, key=len, reverse=True):
        if ours == prefix or ours.startswith(prefix + "."):
            rest = ours[len(prefix) + 1:]
            if ".resnets." in paths[prefix]:
                rest = next((d + rest[len(o):] for o, d in RESNET.items() if rest == o or rest.startswith(o + ".")), rest)
            return paths[prefix] + ("." + rest if rest else "")
    return None


def targets(model) -> dict[str, Target]:
    """Every name a LoRA file may use for a weight of `model` (kohya and PEFT spellings) -> that weight."""
    out: dict[str, Target] = {}
    unet = model.model.diffusion_model
    paths = _unet_paths(unet)
    for ours, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            name = _diffusers_name(ours, paths)
            if name is not None:
                out["lora_unet_" + name.replace(".", "_")] = out["unet." + name] = Target(module.weight)
    tower = model.cond_stage_model.model
    width = tower.token_embedding.weight.shape[1]
    for i, block in enumerate(tower.transformer.resblocks):
        parts = {f"self_attn_{p}_proj": Target(block.attn.in_proj_weight, slice(k * width, (k + 1) * width))
                 for k, p in enumerate("qkv")}
        parts.update({"self_attn_out_proj": Target(block.attn.out_proj.weight), "mlp_fc1": Target(block.mlp.c_fc.weight),
                      "mlp_fc2": Target(block.mlp.c_proj.weight)})
        for part, target in parts.items():
            out[f"lora_te_text_model_encoder_layers_{i}_{part}"] = target
            dotted = part.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            out[f"text_encoder.text_model.encoder.layers.{i}.{dotted}"] = target
    return out


@dataclass
class LoraFile:
    name: str
    path: Path
    hash: str  # first 12 hex digits of the file's SHA-256 (the "Lora hashes" field)
    modules: dict = field(default_factory=dict)  # prefix -> {"down", "up", "alpha"}


def read_lora(path: Path) -> LoraFile:
    """A LoRA file's update matrices by module prefix; SDError for SD 1.x/SDXL files and unreadable ones."""
    path = Path(path)
    tensors, meta = _read(path)
    base = str(meta.get("ss_base_model_version", ""))
    if base.startswith(("sd_v1", "sdxl")) or any(k.startswith(("lora_te1_", "lora_te2_")) for k in tensors):
        what = "SDXL" if "xl" in base or any(k.startswith("lora_te2_") for k in tensors) else "SD 1.x"
        raise SDError(f"LoRA {path.name} is for {what}; sd runs SD 2.x")
    modules: dict[str, dict] = {}
    for key, tensor in tensors.items():
        for suffix, role in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
                             (".lora_B.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            raise SDError(f"LoRA {path.name}: key {key} is not a LoRA update (lora_down/up, lora_A/B, alpha)")
    incomplete = [p for p, m in modules.items() if "down" not in m or "up" not in m]
    if incomplete or not modules:
        raise SDError(f"LoRA {path.name}: {'no updates' if not modules else 'half an update for ' + incomplete[0]}")
    for prefix, update in modules.items():
        _check_update(path.name, prefix, update)
    return LoraFile(path.stem, path, model_hash(path, length=12), modules)


def _read(path: Path) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a LoRA file, read without running code, its cost checked first."""
    from ldm.files.reading import regular_size
    from ldm.loading.checkpoint import read_safetensors, read_torch_file

    regular_size(path, "LoRA file")  # a FIFO or device named on the command line: one line, no hang
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        tensors = read_safetensors(path)  # header checked against the file: no tensor claims bytes it lacks
        try:
            with safe_open(str(path), "pt") as f:
                return tensors, f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise SDError(f"LoRA {path.name}: not a valid safetensors file ({exc})") from None
    data = read_torch_file(path, "LoRA", MAX_BYTES)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise SDError(f"LoRA {path.name}: not a dict of tensors")
    return data, {}


def _check_update(name: str, prefix: str, update: dict) -> None:
    """SDError unless `update` is a usable low-rank pair: down (rank, in, ...), up (out, rank, ...) with the
    same rank of at least 1, a scalar alpha, every number finite (a NaN or inf turns the image black)."""
    down, up, alpha = update["down"], update["up"], update.get("alpha")
    if down.ndim < 2 or up.ndim < 2:
        raise SDError(f"LoRA {name}: {prefix} has a {down.ndim}-D down and a {up.ndim}-D up weight; both must be "
                      "matrices (or convolution kernels)")
    if down.shape[0] < 1 or up.shape[1] != down.shape[0]:
        raise SDError(f"LoRA {name}: {prefix} has rank {down.shape[0]} in its down weight and {up.shape[1]} in its "
                      "up weight; they must agree and be at least 1")
    if alpha is not None and alpha.numel() != 1:
        raise SDError(f"LoRA {name}: {prefix}.alpha has {alpha.numel()} values, not one")
    for role, tensor in update.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise SDError(f"LoRA {name}: {prefix}'s {role} holds values that are not finite numbers (NaN or "
                          "infinity): the file is damaged")


def delta(update: dict, shape: torch.Size) -> torch.Tensor:
    """(alpha / rank) * (up @ down), in the target's shape, float32."""
    up, down = update["up"].float(), update["down"].float()
    rank = down.shape[0]
    alpha = float(update["alpha"]) if "alpha" in update else float(rank)
    product = up.flatten(1) @ down.flatten(1)  # (out, in * kh * kw)
    if product.numel() != torch.Size(shape).numel():
        raise ValueError(f"{tuple(product.shape)} does not fit {tuple(shape)}")
    return product.reshape(shape) * (alpha / rank)


class Merged:
    """The LoRAs merged into one model, and the original weights to undo them exactly."""

    def __init__(self, model):
        self.model = model
        self.targets: Optional[dict[str, Target]] = None
        self.saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self.active: tuple = ()

    def apply(self, loras: list[tuple[LoraFile, float, float]]) -> None:
        """Make exactly these (file, text weight, UNet weight) the merged ones (undoing any others)."""
        key = tuple((lora.hash, te, un) for lora, te, un in loras)
        if key == self.active:
            return
        self.restore()
        if self.targets is None:
            self.targets = targets(self.model)
        for lora, text_weight, unet_weight in loras:
            self._merge(lora, text_weight, unet_weight)
        self.active = key

    def check(self, lora: LoraFile) -> None:
        """SDError unless every update of `lora` finds a weight of its shape in this model (nothing changes)."""
        if self.targets is None:
            self.targets = targets(self.model)
        unmatched = [p for p in lora.modules if p not in self.targets]
        if unmatched:
            raise SDError(f"LoRA {lora.name}: {len(unmatched)} of {len(lora.modules)} updates match nothing in this "
                          f"model (first: {unmatched[0]})")
        for prefix, update in lora.modules.items():
            target = self.targets[prefix]
            shape = target.param.shape if target.rows is None else target.param[target.rows].shape
            try:
                delta(update, shape)
            except ValueError as exc:
                hint = " (an SD 1.x LoRA: 768-wide text)" if update["down"].shape[-1] == 768 else ""
                raise SDError(f"LoRA {lora.name}: {prefix} is {exc}{hint}") from None

    def _merge(self, lora: LoraFile, text_weight: float, unet_weight: float) -> None:
        try:
            self.check(lora)
        except SDError:
            self.restore()
            raise
        with torch.no_grad():
            for prefix, update in lora.modules.items():
                target = self.targets[prefix]
                weight = unet_weight if prefix.startswith(("lora_unet_", "unet.")) else text_weight
                param = target.param
                if id(param) not in self.saved:
                    self.saved[id(param)] = (param, param.detach().clone())
                part = param.data if target.rows is None else param.data[target.rows]
                change = delta(update, part.shape)
                part.copy_((part.float() + weight * change).to(part.dtype))

    def restore(self) -> None:
        """Put back every weight a LoRA changed, bit for bit."""
        with torch.no_grad():
            for param, original in self.saved.values():
                param.data.copy_(original)
        self.saved.clear()
        self.active = ()


def default_folder(ckpt) -> Optional[Path]:
    """loras/ beside the folder that holds the checkpoint (where <lora:NAME> looks without --lora-dir)."""
    return Path(ckpt).resolve().parent.parent / "loras" if ckpt else None


def lora_metadata(path: Path) -> dict:
    """A LoRA file's safetensors metadata (kohya's ss_* training notes), {} for other files or unreadable ones."""
    if Path(path).suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def list_loras(folder: Optional[Path]) -> dict[str, Path]:
    """{name: file} of the LoRA files in `folder` and its subfolders (ldm.files.reading.model_files)."""
    from ldm.files.reading import model_files

    return model_files(folder, SUFFIXES, MAX_FILES)


@dataclass
class LoraPlan:
    """Which LoRA files a run uses: --lora FILE[:W] for every image, and the folder <lora:NAME> tags name."""
    always: list  # [(path, weight)]
    folder: Optional[Path]
    files: dict = field(default_factory=dict)  # path -> LoraFile, read on first use
    listed: Optional[dict] = None  # name -> path of the folder's LoRAs, listed on first use

    @classmethod
    def make(cls, given: tuple, folder: Optional[Path], prompts: list[str]) -> "LoraPlan":
        """Check every --lora file and every tag's file exist (SDError naming the first that does not)."""
        from ldm.text.syntax import take_loras

        always = []
        for spec in map(str, given):
            path, sep, weight = spec.rpartition(":")
            if not sep or not weight.replace(".", "", 1).lstrip("-").isdigit():
                path, weight = spec, ""
            path = Path(path)
            if not path.is_file():
                raise SDError(f"--lora {spec}: no such file")
            always.append((path, lora_weight(weight, f"--lora {spec}") if weight else 1.0))
        plan = cls(always, folder)
        for prompt in prompts:
            for tag in take_loras(prompt)[1]:
                plan.path_of(tag.name)
        return plan

    def path_of(self, name: str) -> Path:
        """The file a tag's NAME means: a LoRA of the folder (or its subfolders) by its file name without
        extension, as A1111 lists them. Nothing else is a name (no path, no '..'), and a name that is not
        listed gets one message whether or not some file of that name exists elsewhere."""
        if self.listed is None:
            self.listed = list_loras(self.folder)
        if name not in self.listed:
            raise SDError(f"<lora:{name}>: not among the LoRAs of the LoRA folder; a name is a LoRA "
                          "file's name without extension")
        return self.listed[name]

    def all_files(self, prompts: list[str]) -> list[LoraFile]:
        """Every LoRA file the run's prompts and flags name, read (to check them before anything is written)."""
        return [lora for lora, _, _ in self.for_prompts(prompts)]

    def read(self, path: Path) -> LoraFile:
        if path not in self.files:
            self.files[path] = read_lora(path)
        return self.files[path]

    def for_prompts(self, prompts: list[str]) -> list[tuple[LoraFile, float, float]]:
        """(file, text weight, UNet weight) for a batch: the --lora files, then the tags of its prompts
        (a name tagged twice keeps its first weights, as A1111 does)."""
        from ldm.text.syntax import take_loras

        wanted = [(self.read(path), weight, weight) for path, weight in self.always]
        for prompt in prompts:
            for tag in take_loras(prompt)[1]:
                lora = self.read(self.path_of(tag.name))
                if all(lora.path != w[0].path for w in wanted):
                    wanted.append((lora, tag.text_weight, tag.unet_weight))
        return wanted
