"""Lightning modules that train the project's own model classes, and the `train(config)` entry point.

Stage 1, AutoencoderTrainer: an AutoencoderKL on image crops, L1 (+ optional L2) reconstruction plus a
small KL term (no GAN). Stage 2, DiffusionTrainer: a LatentDiffusion whose first stage comes from stage 1;
the UNet (and, with cond_stage_trainable, the text tower) learn eps or v targets on noised latents,
with the caption dropped to "" at `ucg_rate` so that classifier-free guidance has an unconditional model.

Checkpoints are written as safetensors in the original key layout (encoder.* for a lone VAE;
first_stage_model.*, model.diffusion_model.*, cond_stage_model.model.*, schedule buffers for the full
model), so ldm.loading.checkpoint.load_model loads them exactly as it loads SD 2.x files.
"""
from __future__ import annotations

import csv
import random
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.errors import SDError
from ldm.util import instantiate_from_config, load_config

try:
    import pytorch_lightning as pl
except ImportError as exc:  # pragma: no cover - the venv has it; a plain install may not
    raise SDError("training needs pytorch-lightning: pip install pytorch-lightning") from exc


def export_state_dict(module: torch.nn.Module, dtype: Optional[torch.dtype] = None,
                      keep_float32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors; floating parameters cast to `dtype` except keys
    that start with one of `keep_float32` (the schedule buffers keep their float32 precision)."""
    out = {}
    for key, value in module.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point() and not key.startswith(keep_float32):
            value = value.to(dtype)
        out[key] = value.contiguous()
    return out


def save_safetensors(state_dict: dict[str, torch.Tensor], path: Path, metadata: Optional[dict] = None) -> Path:
    """Write atomically (temp file + rename) so a reader never sees a half-written checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state_dict, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


class _Logged(pl.LightningModule):
    """Shared bits: AdamW with linear warm-up, constant rate, optionally a linear decay to zero over the last
    part of the run's budget; a CSV of (step, loss, seconds), periodic export."""

    def __init__(self, lr: float, weight_decay: float, warmup_steps: int, log_path: Optional[str],
                 checkpoint_every: int, output: Optional[str], lr_decay_fraction: float = 0.0):
        super().__init__()
        if not 0.0 <= lr_decay_fraction <= 1.0:
            raise SDError(f"trainer.lr_decay_fraction must be between 0 and 1, not {lr_decay_fraction}")
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.lr_decay_fraction = lr_decay_fraction
        self.log_path = Path(log_path) if log_path else None
        self.checkpoint_every = checkpoint_every
        self.output = Path(output) if output else None
        self._t0: Optional[float] = None
        # The run's budget (set by train()): the decay ends where the run ends, whichever of the step limit
        # and the time limit comes first.
        self.budget_steps: Optional[int] = None
        self.budget_seconds: Optional[float] = None
        # A resumed run (train(..., resume=True)) continues the counts of the run it picks up: its steps
        # and training seconds come first in the schedule, the budget, the log and the checkpoint cadence.
        self.step_offset = 0
        self.seconds_offset = 0.0
        self.resume_optimizer: Optional[dict[str, torch.Tensor]] = None
        self.state_path: Optional[Path] = None  # the training state written beside each export

    @property
    def trained(self) -> torch.nn.Module:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def total_step(self) -> int:
        return self.global_step + self.step_offset

    def elapsed(self) -> float:
        """Training seconds of the whole run, the resumed parts included."""
        return self.seconds_offset + (0.0 if self._t0 is None else time.perf_counter() - self._t0)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def progress(self, step: int) -> float:
        """Fraction of the budget used, in [0, 1]: the larger of the step share and the time share (`step`
        counts this process's steps; a resumed run adds the earlier ones)."""
        shares = [0.0]
        if self.budget_steps:
            shares.append((step + self.step_offset) / self.budget_steps)
        if self.budget_seconds and (self._t0 is not None or self.seconds_offset):
            shares.append(self.elapsed() / self.budget_seconds)
        return min(1.0, max(shares))

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + self.step_offset + 1) / max(1, self.warmup_steps))
        if self.lr_decay_fraction == 0.0:
            return warm
        # Warm-up, stable, decay: a full rate while the model is far from converged, then an anneal to zero
        # at the end of the budget (the budget is often wall time, hence progress()).
        remaining = 1.0 - self.progress(step)
        return warm * min(1.0, remaining / self.lr_decay_fraction)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter()
        if self.resume_optimizer is not None:
            load_optimizer_state(self.trainer.optimizers[0], self.resume_optimizer)
            self.resume_optimizer = None
        if self.log_path is not None and not (self.step_offset and self.log_path.is_file()):
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "loss", "seconds"])

    def record(self, loss: torch.Tensor) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", newline="") as f:
                csv.writer(f).writerow([self.total_step + 1, f"{loss.item():.6f}", f"{self.elapsed():.1f}"])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # global_step already counts this step's optimizer update here.
        if self.checkpoint_every and self.total_step % self.checkpoint_every == 0:
            self.save()

    def on_train_end(self) -> None:
        self.save()

    def save(self) -> None:
        """The export, then the state a cut-off run resumes from (written second: a state never names a
        step whose export is missing)."""
        self.export()
        if self.state_path is not None:
            save_training_state(self, self.state_path)

    def export(self) -> Optional[Path]:  # pragma: no cover - overridden
        raise NotImplementedError


class AutoencoderTrainer(_Logged):
    """Trains an AutoencoderKL: mean |x - x_rec| + l2_weight * mean (x - x_rec)^2 + kl_weight * KL / pixels.

    The KL term is the reference's (summed over the latent, per image) divided by the number of image
    values, the same scaling that turns the reference's summed L1 into a mean.
    """

    def __init__(self, model_config: Any, kl_weight: float = 1e-6, l2_weight: float = 1.0, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 50, log_path: Optional[str] = None,
                 checkpoint_every: int = 0, output: Optional[str] = None, save_dtype: str = "float32",
                 train_encoder: bool = True, lr_decay_fraction: float = 0.0):
        super().__init__(lr, weight_decay, warmup_steps, log_path, checkpoint_every, output, lr_decay_fraction)
        self.vae = instantiate_from_config(model_config)
        if not train_encoder:
            # Decoder-only fine-tuning (as SD's vae-ft-mse): the latents, and so a diffusion model trained
            # on them, stay valid.
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        self.kl_weight, self.l2_weight = kl_weight, l2_weight
        self.save_dtype = getattr(torch, save_dtype)

    @property
    def trained(self) -> torch.nn.Module:
        return self.vae

    def loss(self, image: torch.Tensor) -> torch.Tensor:
        rec, posterior = self.vae(image)  # (B, 3, H, W), posterior over (B, 4, H/f, W/f)
        rec = rec.float()
        l1 = (image - rec).abs().mean()
        l2 = (image - rec).pow(2).mean()
        kl = posterior.kl().float().mean() / image[0].numel()
        return l1 + self.l2_weight * l2 + self.kl_weight * kl

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch["image"])
        self.record(loss)
        return loss

    def export(self) -> Optional[Path]:
        if self.output is None:
            return None
        return save_safetensors(export_state_dict(self.vae, self.save_dtype), self.output,
                                {"step": self.total_step, "format": "AutoencoderKL"})


class LatentCache(torch.utils.data.Dataset):
    """Posterior moments of a fixed set of scenes (encoded once: the frozen VAE is the costly part of a
    step) paired with a freshly worded caption per item, so repeated passes see new phrasings."""

    def __init__(self, moments: torch.Tensor, scenes: list, length: int, seed: int):
        from ldm.data.shapes import caption_for

        self.moments, self.scenes, self.length, self.seed = moments, scenes, length, seed
        self._caption_for = caption_for

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        k = index % len(self.scenes)
        caption = self._caption_for(self.scenes[k], random.Random(f"{self.seed}:{index}:caption"))
        return {"moments": self.moments[k], "caption": caption}


class DiffusionTrainer(_Logged):
    """Trains a LatentDiffusion's UNet (and its text tower when cond_stage_trainable) on a frozen VAE.

    One step: z = scale_factor * posterior sample; t ~ U{0..T-1}; x_t = sqrt(a_t) z + sqrt(1 - a_t) eps;
    the target is eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) z; the loss is their mean squared error.
    Captions are replaced by "" with probability ucg_rate (classifier-free guidance dropout).
    An EMA of the trained weights (ema_decay > 0) is what gets exported.
    """

    def __init__(self, model_config: Any, first_stage_ckpt: Optional[str] = None, ucg_rate: float = 0.1,
                 ema_decay: float = 0.0, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 100,
                 log_path: Optional[str] = None, checkpoint_every: int = 0, output: Optional[str] = None,
                 save_dtype: str = "float16", lr_decay_fraction: float = 0.0):
        super().__init__(lr, weight_decay, warmup_steps, log_path, checkpoint_every, output, lr_decay_fraction)
        params = model_config.get("params", {})
        self.ldm = instantiate_from_config(model_config)
        if first_stage_ckpt is not None:
            from ldm.loading.checkpoint import read_state_dict

            state = {k: v.float() for k, v in read_state_dict(first_stage_ckpt).items()}
            self.ldm.first_stage_model.load_state_dict(state, strict=True)
        self.ldm.first_stage_model.eval().requires_grad_(False)
        self.text_trainable = bool(params.get("cond_stage_trainable", False))
        self.ldm.cond_stage_model.requires_grad_(self.text_trainable)
        self.scale_by_std = bool(params.get("scale_by_std", False))
        self.ucg_rate = ucg_rate
        self.save_dtype = getattr(torch, save_dtype)
        self.ema_decay = ema_decay
        self.ema: Optional[dict[str, torch.Tensor]] = None
        if ema_decay > 0:
            self.ema = {k: p.detach().clone() for k, p in self.ldm.named_parameters() if p.requires_grad}

    @property
    def trained(self) -> torch.nn.Module:
        return self.ldm

    # -- data --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_dataset(self, dataset, batch_size: int = 32) -> tuple[torch.Tensor, list]:
        """Posterior moments (N, 2 * 4, h, w) and scenes of every item, rendered and encoded a batch at a
        time (all 4032 renders at once would take 3 GB)."""
        vae = self.ldm.first_stage_model
        moments, scenes = [], []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            moments.append(vae.encode(torch.stack([item["image"] for item in items])).parameters.float())
            scenes.extend(item["scene"] for item in items)
        return torch.cat(moments), scenes

    @torch.no_grad()
    def set_scale_factor(self, moments: torch.Tensor, generator: torch.Generator) -> float:
        """The reference's scale_by_std: scale_factor = 1 / std of posterior samples, so z has unit std."""
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        z = DiagonalGaussianDistribution(moments).sample(generator)
        scale = 1.0 / float(z.flatten().std())
        if self.scale_by_std:
            self.ldm.scale_factor.fill_(scale)
        return scale

    # -- training ----------------------------------------------------------------------------------
    def diffusion_loss(self, z: torch.Tensor, captions: list[str], t: Optional[torch.Tensor] = None,
                       noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        ldm = self.ldm
        b = z.shape[0]
        if t is None:
            t = torch.randint(0, ldm.num_timesteps, (b,), device=z.device)
        if noise is None:
            noise = torch.randn_like(z)
        a = ldm.alphas_cumprod[t].float().view(b, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise  # q_sample
        target = noise if ldm.parameterization == "eps" else a.sqrt() * noise - (1 - a).sqrt() * z
        context = ldm.cond_stage_model.encode(captions)  # (B, 77, width), with grad when trainable
        out = ldm.apply_model(x_t, t, ldm.make_cond(context))
        return F.mse_loss(out.float(), target)

    def training_step(self, batch, batch_idx):
        from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

        with torch.no_grad():
            z = self.ldm.get_first_stage_encoding(DiagonalGaussianDistribution(batch["moments"])).float()
        captions = ["" if random.random() < self.ucg_rate else c for c in batch["caption"]]
        loss = self.diffusion_loss(z, captions)
        self.record(loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.update_ema()
        super().on_train_batch_end(outputs, batch, batch_idx)  # periodic export, after the EMA update

    def update_ema(self) -> None:
        # Warm-up of the decay (as in the reference's LitEma): early averages are not dominated by init.
        step = self.total_step
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in self.ldm.named_parameters():
                if k in self.ema:
                    self.ema[k].lerp_(p.detach(), 1 - decay)

    def export(self) -> Optional[Path]:
        if self.output is None:
            return None
        state = export_state_dict(self.ldm, self.save_dtype, keep_float32=_SCHEDULE_KEYS)
        if self.ema is not None:
            for k, v in self.ema.items():
                state[k] = v.detach().cpu().to(self.save_dtype if v.is_floating_point() else v.dtype).contiguous()
        return save_safetensors(state, self.output, {"step": self.total_step, "format": "LatentDiffusion"})


_SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                  "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                  "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                  "posterior_mean_coef1", "posterior_mean_coef2", "scale_factor")


def _collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        if key == "scene":  # the scene descriptions are not needed by a training step
            continue
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out




def merge_first_stage(diffusion_ckpt: str | Path, vae_ckpt: str | Path, output: str | Path,
                      dtype: torch.dtype = torch.float16) -> Path:
    """A full checkpoint with its first_stage_model.* replaced by a (decoder-fine-tuned) VAE checkpoint
    whose encoder is unchanged; refuses a VAE with a different encoder, which would invalidate the UNet."""
    from ldm.loading.checkpoint import read_state_dict

    state = dict(read_state_dict(diffusion_ckpt))
    vae = read_state_dict(vae_ckpt)
    for key, value in vae.items():
        if key.startswith(("encoder.", "quant_conv.")):
            old = state[f"first_stage_model.{key}"].float()
            if not torch.allclose(old, value.float().to(old.dtype), atol=1e-3, rtol=1e-2):
                raise SDError(f"{vae_ckpt}: encoder weight {key} differs from the one the UNet was trained on")
        state[f"first_stage_model.{key}"] = value.to(dtype).contiguous()
    state = {k: v.clone().contiguous() for k, v in state.items()}
    return save_safetensors(state, Path(output), {"format": "LatentDiffusion", "first_stage": str(vae_ckpt)})


# -- resuming a cut-off run --------------------------------------------------------------------------------
# The state is safetensors, like every file sd reads: the model's full state (float32), the EMA, AdamW's
# moments by parameter index; the step and the training seconds in the header.

def save_training_state(module: _Logged, path: Path) -> Path:
    state = {f"model.{k}": v.float() if v.is_floating_point() else v
             for k, v in export_state_dict(module.trained).items()}
    for k, v in (getattr(module, "ema", None) or {}).items():
        state[f"ema.{k}"] = v.detach().float().contiguous()
    optimizer = module.trainer.optimizers[0] if module._trainer is not None and module.trainer.optimizers else None
    if optimizer is not None:
        for index, slots in optimizer.state_dict()["state"].items():
            for name, value in slots.items():
                state[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().float().contiguous()
    return save_safetensors(state, path, {"step": module.total_step, "seconds": f"{module.elapsed():.1f}"})


def read_training_state(path: Path) -> tuple[dict[str, torch.Tensor], int, float]:
    """(tensors, step, seconds) of a state written by save_training_state; SDError if it is not one."""
    from safetensors import safe_open

    from ldm.files.reading import open_regular

    with open_regular(path, "training state"):  # a FIFO or a folder is one line, not a hang
        pass
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, int(meta["step"]), float(meta["seconds"])
    except Exception as exc:  # noqa: BLE001 - any damage is the same one line
        raise SDError(f"{path}: not a training state sd can resume from ({exc})") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        slots.setdefault(int(index), {})[name] = value
    groups = optimizer.state_dict()["param_groups"]
    if set(slots) - {i for g in groups for i in g["params"]}:
        raise SDError("the training state's optimizer does not match this model's parameters")
    optimizer.load_state_dict({"state": slots, "param_groups": groups})


def resume_into(module: _Logged, path: Path) -> tuple[int, float]:
    """Load a training state into the module (weights strictly, EMA, optimizer at train start); returns
    (step, seconds) it had reached."""
    tensors, step, seconds = read_training_state(path)
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        module.trained.load_state_dict(model, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise SDError(f"{path}: the training state is of another model ({first})") from None
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    if getattr(module, "ema", None) is not None and ema:
        module.ema = {k: ema[k].clone() for k in module.ema}
    module.resume_optimizer = {k: v for k, v in tensors.items() if k.startswith("optimizer.")}
    module.step_offset, module.seconds_offset = step, seconds
    return step, seconds


def state_path_for(output: str | Path) -> Path:
    """Where a run writes the state it resumes from: beside its checkpoint."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + ".train-state.safetensors")


def _cached_moments(module: "DiffusionTrainer", data_cfg: dict, cache: Optional[str], first_stage: Optional[str],
                    precision: str) -> tuple[torch.Tensor, list]:
    """The encoded dataset, from `cache` when it was written for the same first stage and data (the encode is
    minutes of every run otherwise), else encoded and written there."""
    import hashlib
    import json

    from ldm.data.shapes import ShapesDataset

    dataset = ShapesDataset(**data_cfg)
    key = hashlib.sha256(json.dumps(data_cfg, sort_keys=True).encode()
                         + (Path(first_stage).read_bytes() if first_stage else b"no first stage")).hexdigest()
    if cache and Path(cache).is_file():
        from safetensors import safe_open

        with safe_open(cache, "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return f.get_tensor("moments"), [dataset.scene(i) for i in range(len(dataset))]
    with torch.autocast("cpu", torch.bfloat16, enabled=precision.startswith("bf16")):
        moments, scenes = module.encode_dataset(dataset)
    if cache:
        save_safetensors({"moments": moments.contiguous()}, Path(cache), {"key": key})
    return moments, scenes


def _init_from(target: torch.nn.Module, path: Optional[str]) -> bool:
    """Continue from an earlier checkpoint of the same model (same key layout), loaded strictly."""
    if not path:
        return False
    from ldm.loading.checkpoint import read_state_dict

    target.load_state_dict({k: v.float() for k, v in read_state_dict(path).items()}, strict=True)
    return True


def _training_config(config_path: str | Path, overrides: dict) -> tuple[dict, dict, dict, str]:
    """(model block, data section, trainer section with `overrides` applied, module kind) of a training
    config; SDError for a missing file or section."""
    config = OmegaConf.load(config_path) if Path(config_path).is_file() else None
    if config is None:
        raise SDError(f"training config not found: {config_path}")
    tcfg = OmegaConf.to_container(config.get("trainer") or OmegaConf.create(), resolve=True)
    if "model_config" in tcfg:
        model_config = OmegaConf.to_container(load_config(tcfg.pop("model_config")).model, resolve=True)
    elif "model" in config:
        model_config = OmegaConf.to_container(config.model, resolve=True)
    else:
        raise SDError(f"{config_path}: needs a 'model:' block or 'trainer.model_config: <inference config>'")
    data_cfg = OmegaConf.to_container(config.get("data") or OmegaConf.create(), resolve=True)
    tcfg.update({key: value for key, value in overrides.items() if value is not None})
    kind = tcfg.pop("module", None)
    if kind not in ("autoencoder", "diffusion"):
        raise SDError(f"{config_path}: trainer.module must be 'autoencoder' or 'diffusion'")
    if not tcfg.get("output"):
        raise SDError(f"{config_path}: trainer.output (the checkpoint to write) is missing")
    return model_config, data_cfg, tcfg, kind


def train(config_path: str | Path, *, max_minutes: Optional[float] = None, max_steps: Optional[int] = None,
          output: Optional[str | Path] = None, seed: Optional[int] = None, threads: Optional[int] = None,
          init_from: Optional[str | Path] = None, resume: bool = False, log: Optional[str | Path] = None) -> Path:
    """Train what a YAML config describes and write its safetensors checkpoint; returns the path.

    The config has three sections: `model` (a target/params block: AutoencoderKL or LatentDiffusion;
    or `trainer.model_config: path` to take the model block from an inference config), `data`
    (ShapesDataset params) and `trainer` (module: autoencoder|diffusion, batch_size, lr, max_steps,
    max_minutes, precision, output, log, checkpoint_every, latent_cache, ...). Keyword arguments override
    the trainer section. Relative paths are relative to the current directory.

    Every export also writes the training state beside the checkpoint (NAME.train-state.safetensors); with
    resume=True a run that was cut off continues from it (its step and seconds count against the budget;
    the learning-rate schedule, EMA and optimizer go on where they were), and one with no state starts.
    """
    from ldm.data.shapes import ShapesDataset

    model_config, data_cfg, tcfg, kind = _training_config(config_path, dict(
        max_minutes=max_minutes, max_steps=max_steps, output=output, seed=seed, threads=threads, init_from=init_from,
        log=None if log is None else str(log)))
    torch.set_num_threads(int(tcfg.pop("threads", 2)))
    run_seed = int(tcfg.pop("seed", 0))
    pl.seed_everything(run_seed, workers=True, verbose=False)
    random.seed(run_seed)
    batch_size = int(tcfg.pop("batch_size", 8))
    steps = int(tcfg.pop("max_steps", 1000))
    minutes = tcfg.pop("max_minutes", None)
    precision = str(tcfg.pop("precision", "32-true"))
    if precision.startswith("bf16"):
        from ldm.runtime.policy import bf16_on_cpu

        precision = precision if bf16_on_cpu(False, f"training ({config_path} asks for {precision})") else "32-true"
    common = {k: tcfg[k] for k in ("lr", "weight_decay", "warmup_steps", "checkpoint_every", "save_dtype",
                                   "lr_decay_fraction") if k in tcfg}
    common.update(log_path=tcfg.get("log"), output=str(tcfg["output"]))

    if kind == "autoencoder":
        module = AutoencoderTrainer(model_config, kl_weight=tcfg.get("kl_weight", 1e-6),
                                    l2_weight=tcfg.get("l2_weight", 1.0),
                                    train_encoder=tcfg.get("train_encoder", True), **common)
        _init_from(module.vae, tcfg.get("init_from"))
        dataset = ShapesDataset(length=steps * batch_size, **data_cfg)
    else:
        module = DiffusionTrainer(model_config, first_stage_ckpt=tcfg.get("first_stage_ckpt"),
                                  ucg_rate=tcfg.get("ucg_rate", 0.1), ema_decay=tcfg.get("ema_decay", 0.0), **common)
        if _init_from(module.ldm, tcfg.get("init_from")) and module.ema is not None:
            module.ema = {k: p.detach().clone() for k, p in module.ldm.named_parameters() if p.requires_grad}
        t0 = time.perf_counter()
        moments, scenes = _cached_moments(module, data_cfg, tcfg.get("latent_cache"), tcfg.get("first_stage_ckpt"),
                                          precision)
        scale = module.set_scale_factor(moments, torch.Generator().manual_seed(run_seed))
        print(f"encoded {len(scenes)} scenes in {time.perf_counter() - t0:.0f}s; scale_factor {scale:.4f}", flush=True)
        dataset = LatentCache(moments, scenes, steps * batch_size, run_seed)
    module.state_path = state_path_for(tcfg["output"])
    done = 0
    if resume and module.state_path.is_file():
        done, seconds = resume_into(module, module.state_path)
        if done >= steps or (minutes is not None and seconds >= 60.0 * float(minutes)):
            print(f"{module.state_path}: the run had finished (step {done}, {seconds / 60:.1f} min)", flush=True)
            module.export()
            return Path(tcfg["output"])
        print(f"resuming from step {done} ({seconds / 60:.1f} of the budget's minutes done)", flush=True)
        dataset.seed = run_seed + done  # new captions and order, not the first part's again
    elif resume:
        print(f"nothing to resume ({module.state_path} not found): starting", flush=True)
    # Shuffled: consecutive items share colours and shape, and such correlated batches stall training.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=0, collate_fn=_collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(run_seed + done))
    module.budget_steps = steps
    module.budget_seconds = None if minutes is None else 60.0 * float(minutes)
    from ldm.lightning import quiet_lightning

    # Lightning's warning about modules in eval mode is about the intentionally frozen first stage.
    quiet_lightning(r".*module\(s\) in eval mode.*")
    left = None if minutes is None else float(minutes) - module.seconds_offset / 60.0
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps - done, precision=precision,
                         max_time=None if left is None else {"minutes": left},
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    return Path(tcfg["output"])
