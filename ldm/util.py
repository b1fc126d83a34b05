"""Config plumbing: build objects from OmegaConf `target:`/`params:` blocks."""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.errors import SDError


# What a config may build without --trust-config. A config's `target:` names any Python callable, so a
# config from the internet (they travel with checkpoints) could otherwise run `os.system`. Classes of this
# package are allowed, plus the few others the reference configs name.
ALLOWED_TARGETS = frozenset({"torch.nn.Identity", "torchvision.transforms.Resize", "torchvision.transforms.RandomCrop"})
ALLOWED_PACKAGE = "ldm."
_TRUST_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar("trust_config", default=False)


@contextlib.contextmanager
def trusted_config(trust: bool = True):
    """Within this block configs may name any target (the user's --trust-config)."""
    token = _TRUST_CONFIG.set(trust)
    try:
        yield
    finally:
        _TRUST_CONFIG.reset(token)


def check_target(path: str) -> None:
    """SDError unless `path` may be built: a dotted name on the allow-list or in this package, unless trusted."""
    if not isinstance(path, str) or not path.replace(".", "").replace("_", "").isalnum():
        raise SDError(f"config target {path!r} is not a dotted path (module.Class)")
    if _TRUST_CONFIG.get() or path in ALLOWED_TARGETS or path.startswith(ALLOWED_PACKAGE):
        return
    raise SDError(f"config target '{path}' is not one sd builds (classes of ldm.* and {', '.join(sorted(ALLOWED_TARGETS))}); "
                  "a config can name any Python code, so pass --trust-config only for a config you trust")


def get_obj_from_str(path: str) -> Any:
    """Resolve a dotted path such as 'ldm.models.autoencoder.AutoencoderKL' to the object (after check_target)."""
    check_target(path)
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise SDError(f"config target '{path}' is not a dotted path (module.Class)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SDError(f"config target '{path}': cannot import module '{module_name}' ({exc})") from exc
    try:
        obj = getattr(module, attr)
    except AttributeError as exc:
        raise SDError(f"config target '{path}': module '{module_name}' has no '{attr}'") from exc
    if not _TRUST_CONFIG.get() and not inspect.isclass(obj):
        raise SDError(f"config target '{path}' is not a class; pass --trust-config only for a config you trust")
    return obj


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
