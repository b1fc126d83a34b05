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

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def progress(self, step: int) -> float:
        """Fraction of the budget used, in [0, 1]: the larger of the step share and the time share."""
        shares = [0.0]
        if self.budget_steps:
            shares.append(step / self.budget_steps)
        if self.budget_seconds and self._t0 is not None:
            shares.append((time.perf_counter() - self._t0) / self.budget_seconds)
        return min(1.0, max(shares))

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup_steps))
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
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "loss", "seconds"])

    def record(self, loss: torch.Tensor) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", newline="") as f:
                csv.writer(f).writerow([self.global_step + 1, f"{loss.item():.6f}",
                                        f"{time.perf_counter() - self._t0:.1f}"])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # global_step already counts this step's optimizer update here.
        if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
            self.export()

    def on_train_end(self) -> None:
        self.export()

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
                                {"step": self.global_step, "format": "AutoencoderKL"})


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
        step = self.global_step
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
        return save_safetensors(state, self.output, {"step": self.global_step, "format": "LatentDiffusion"})


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
          init_from: Optional[str | Path] = None) -> Path:
    """Train what a YAML config describes and write its safetensors checkpoint; returns the path.

    The config has three sections: `model` (a target/params block: AutoencoderKL or LatentDiffusion;
    or `trainer.model_config: path` to take the model block from an inference config), `data`
    (ShapesDataset params) and `trainer` (module: autoencoder|diffusion, batch_size, lr, max_steps,
    max_minutes, precision, output, log, checkpoint_every, ...). Keyword arguments override the
    trainer section. Relative paths are relative to the current directory.
    """
    from ldm.data.shapes import ShapesDataset

    model_config, data_cfg, tcfg, kind = _training_config(config_path, dict(
        max_minutes=max_minutes, max_steps=max_steps, output=output, seed=seed, threads=threads, init_from=init_from))
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
        with torch.autocast("cpu", torch.bfloat16, enabled=precision.startswith("bf16")):
            moments, scenes = module.encode_dataset(ShapesDataset(**data_cfg))
        scale = module.set_scale_factor(moments, torch.Generator().manual_seed(run_seed))
        print(f"encoded {len(scenes)} scenes in {time.perf_counter() - t0:.0f}s; scale_factor {scale:.4f}", flush=True)
        dataset = LatentCache(moments, scenes, steps * batch_size, run_seed)
    # Shuffled: consecutive items share colours and shape, and such correlated batches stall training.
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=0, collate_fn=_collate, drop_last=True,
                                         generator=torch.Generator().manual_seed(run_seed))
    module.budget_steps = steps
    module.budget_seconds = None if minutes is None else 60.0 * float(minutes)
    from ldm.lightning import quiet_lightning

    # Lightning's warning about modules in eval mode is about the intentionally frozen first stage.
    quiet_lightning(r".*module\(s\) in eval mode.*")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, precision=precision,
                         max_time=None if minutes is None else {"minutes": float(minutes)},
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    return Path(tcfg["output"])
