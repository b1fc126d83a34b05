"""Config plumbing: build objects from OmegaConf `target:`/`params:` blocks."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.errors import SDError


def get_obj_from_str(path: str) -> Any:
    """Resolve a dotted path such as 'ldm.models.autoencoder.AutoencoderKL' to the object."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise SDError(f"config target '{path}' is not a dotted path (module.Class)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SDError(f"config target '{path}': cannot import module '{module_name}' ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise SDError(f"config target '{path}': module '{module_name}' has no '{attr}'") from exc


def instantiate_from_config(config: Any, **overrides: Any) -> Any:
    """Build `target(**params, **overrides)` from a config block.

    The reference's special values are kept: '__is_first_stage__' and '__is_unconditional__' stand
    for no object (None), as they do there.
    """
    if config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, dict) or "target" not in config:
        raise SDError("config block has no 'target:' key (expected 'target: module.Class' and optional 'params:')")
    params = dict(config.get("params") or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)


def load_config(path: str | Path) -> DictConfig:
    """Read a YAML config, turning every way it can fail into one-line SDErrors."""
    path = Path(path)
    if not path.is_file():
        raise SDError(f"config file not found: {path}")
    try:
        config = OmegaConf.load(path)
    except Exception as exc:  # yaml and OmegaConf raise many types; all mean "not a valid config"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SDError(f"cannot read config {path}: {first}") from exc
    if not isinstance(config, DictConfig) or "model" not in config or "target" not in config.model:
        raise SDError(f"config {path} has no 'model: target:' block; is it a Stable Diffusion config?")
    return config
