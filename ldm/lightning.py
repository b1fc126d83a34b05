"""What sd's two PyTorch Lightning users (`sd train`, the DDP batch runner) share: a quiet stderr."""
from __future__ import annotations

import logging
import warnings

# Lightning's start-up banner (accelerators, tips) and its own use of a torch API that torch deprecated.
_COMMON = (r".*LeafSpec.*",)


def quiet_lightning(*messages: str) -> None:
    """Hide Lightning's info logging and its warnings that say nothing to an sd user, plus `messages`
    (regular expressions of further warnings the caller expects); other warnings and errors still show."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in _COMMON + messages:
        warnings.filterwarnings("ignore", message=message)
