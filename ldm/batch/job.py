"""A batch job: a Request, the model it runs on, and the batch layer's own options.

The commands build one from their flags (ldm.cli.command); everything here that is not the Request is
about files and processes: where the images go and how they are named, the prompt file, resuming, and
scale-out over processes and nodes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional

from ldm.errors import SDError
from ldm.request import Request
from ldm.runtime.policy import RuntimeOptions

if TYPE_CHECKING:
    from ldm.pipeline import Session

ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


@dataclass
class BatchJob:
    """A generating command's run, validated up front by `check()` before any model is loaded."""
    request: Request
    ckpt: Optional[Path]
    config: Optional[Path] = None  # None: chosen from the checkpoint's keys (ldm.loading.detect)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)  # --device, --precision, the fast paths
    outdir: Path = Path("outputs")
    from_file: Optional[Path] = None  # a prompt file (ldm.batch.prompts): its lines become the request's
    repeat: int = 1  # images of each prompt-file line per pass
    n_rows: int = 0  # the grid's rows (0: the batch size)
    skip_existing: bool = False  # resume: skip images whose file exists with matching metadata
    devices: Optional[int] = None  # processes per node (Lightning DDP); None: one process, no Lightning
    num_nodes: int = 1
    accelerator: Optional[str] = None  # cpu | gpu | auto; None: from --device
    from_image: Optional[Path] = None  # rebuild the request from this PNG's parameters (ldm.batch.reproduce)
    taesd: Optional[Path] = None  # TAESD's files (--taesd), for decode / encode "taesd"
    control_midas: Optional[Path] = None  # MiDaS for ControlNet's depth preprocessor (--control-midas)
    names: Mapping[str, str] = field(default_factory=dict)  # the front end's names of request fields (flags)

    @property
    def distributed(self) -> bool:
        """Run through Lightning's DDP predict loop (any scale-out flag given)."""
        return self.devices is not None or self.num_nodes != 1 or self.accelerator is not None

    @property
    def indexed_names(self) -> bool:
        """Sample names are base + k (resume, several processes) instead of the next free numbers."""
        return self.skip_existing or self.distributed

    def with_prompt_file(self) -> "BatchJob":
        """This job with its prompt file's lines (each `repeat` times) as the request's prompts."""
        if self.from_file is None:
            return self
        from ldm.batch.prompts import read_prompt_lines

        if not self.repeat >= 1:
            raise SDError(f"--repeat must be at least 1 (got {self.repeat})")
        # every line makes at least `repeat` images: a file of more lines than that allows is refused as it is
        # read, before millions of lines are parsed
        limit = self.request.limits.max_images
        lines = tuple(dataclasses.replace(line, repeat=self.repeat) for line in read_prompt_lines(
            self.from_file, limit // self.repeat,
            f" (each makes at least {self.repeat} image(s) and {self.names.get('max_images', '--max-images')} is "
            f"{limit:,})"))
        return dataclasses.replace(self, request=dataclasses.replace(self.request, lines=lines))

    def check(self) -> None:
        """Validate the batch options and the request (call with_prompt_file first)."""
        self.runtime.check()
        for name in ("repeat", "num_nodes"):
            if getattr(self, name) < 1:
                raise SDError(f"--{name} must be at least 1 (got {getattr(self, name)})")
        if self.devices is not None and self.devices < 1:
            raise SDError(f"--devices must be at least 1 (got {self.devices})")
        if self.accelerator is not None and self.accelerator not in ACCELERATORS:
            raise SDError(f"--accelerator must be one of {', '.join(ACCELERATORS)} (got '{self.accelerator}')")
        if self.n_rows < 0:
            raise SDError("--n_rows must be 0 (= the batch size) or more")
        self.request.check(self.names, self.timesteps())
        wanted = [key for key in ("decode", "encode") if getattr(self.request, key) == "taesd"]
        if wanted and self.taesd is None:
            raise SDError(f"{self.names.get(wanted[0], wanted[0])} taesd needs TAESD's files: --taesd PATH "
                          "(taesd_decoder.pth or .safetensors, or a diffusers AutoencoderTiny folder)")
        if self.taesd is not None:
            from ldm.models.taesd import find_files

            find_files(self.taesd)  # a missing file is one line before the model loads
        depth = [i for i, unit in enumerate(self.request.control) if unit.module in ("depth", "depth_midas")]
        if depth and self.control_midas is None:
            raise SDError(f"{self.names.get(f'control.{depth[0]}.module', 'module')} depth_midas needs MiDaS: "
                          "--control-midas PATH (the depth2img checkpoint)")
        if self.control_midas is not None and not Path(self.control_midas).is_file():
            raise SDError(f"--control-midas {self.control_midas}: no such file")
        if self.ckpt is None:
            raise SDError("no checkpoint given: pass --ckpt FILE (.ckpt or .safetensors; see checkpoints/README.md)")
        if not Path(self.ckpt).exists():
            raise SDError(f"checkpoint not found: {self.ckpt} (see checkpoints/README.md)")
        if self.config is not None and not Path(self.config).is_file():
            raise SDError(f"config file not found: {self.config}")

    def open_session(self, device=None) -> "Session":
        """Load the job's model (on `device`, default the job's) and prepare its request on it: a batch run's
        start, in each process. The session's request is resolved for the model (its native size where none
        was given)."""
        from ldm.pipeline import Pipeline

        options = self.runtime if device is None else dataclasses.replace(self.runtime, device=str(device))
        pipeline = Pipeline.open(self.ckpt, self.config, options, task=self.request.task.name)
        if self.taesd is not None:
            pipeline.load_taesd(self.taesd)
        if self.control_midas is not None:
            pipeline.load_midas(self.control_midas)
        return pipeline.session(pipeline.resolve(self.request), self.names)

    def timesteps(self) -> int:
        """The model's number of diffusion timesteps, read from the config (no model is built)."""
        from ldm.util import load_config

        if self.config is None or not Path(self.config).is_file():
            return 1000
        params = load_config(self.config).model.get("params", {}) or {}
        value = params.get("timesteps", 1000)
        return value if isinstance(value, int) and value > 1 else 1000
