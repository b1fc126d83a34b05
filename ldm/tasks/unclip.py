"""Stable unCLIP's two tasks: variations of pictures (or a weighted mix of several), and text-to-image with
unCLIP-L through the Karlo prior (PriorTxt2Img, at the end).

Each input picture is cut to multiples of 64 per side (LANCZOS, the reference demo's step) and embedded by
the checkpoint's CLIP image tower; the embeddings are mixed by weighted mean (weights count whether or
not noise is added, unlike the demo), noised to --noise-level with each image's own seed, and condition the
UNet beside the text prompt. The output size is --H/--W (768, the models' native side), not the input's.

The CLIP statistics unCLIP-L standardises with (ViT-L-14_stats.th, in no checkpoint) come from --clip-stats,
else the config's path (checkpoints/karlo_models/ViT-L-14_stats.th, as the reference), else karlo_models/
beside the checkpoint; without them level 0 runs with mean 0 / std 1 and higher levels are refused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional, Sequence, TYPE_CHECKING

import torch
from PIL import Image

from ldm.files import imageio
from ldm.errors import SDError, note
from ldm.tasks.base import BatchInputs, ImageInput, Txt2Img, extra_cond, repeat_batch, require_model, shrink_to_work_size

if TYPE_CHECKING:
    from ldm.loading.detect import ModelChoice
    from ldm.request import Item, Request

CLIP_STATS_NAME = "ViT-L-14_stats.th"
MAX_LEVEL = 999  # the embedding noise's schedule has 1000 levels
INPUT_MULTIPLE = 64


def pixel_hash(img: Image.Image) -> str:
    """12 hex digits of the SHA-256 of an RGB picture's size and pixels: the same for a file and for the
    PIL image read from it, and blind to metadata."""
    digest = hashlib.sha256(f"{img.size[0]}x{img.size[1]}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()[:12]


def clip_stats_file(model, ckpt: Optional[Path], given: Optional[Path], also: tuple[Path, ...] = ()) -> Optional[Path]:
    """Load the CLIP statistics unCLIP-L needs into `model` (given, or found where the reference keeps them);
    the file used, or None. Statistics for a model whose config takes none (unCLIP-H) are refused."""
    aug = model.noise_augmentor
    if aug is None or aug.clip_stats_path is None:
        if given is not None:
            raise SDError("--clip-stats is for unCLIP-L (and the Karlo prior); this unCLIP model's config "
                          "standardises its embeddings with mean 0 / std 1")
        return None
    if given is None and aug.stats_source is not None:  # loaded before (a pipeline's earlier call)
        return aug.stats_source
    path = given
    if path is None:  # the reference's path (relative to the working folder), then karlo_models/ by the checkpoint
        found = [Path(aug.clip_stats_path)] + ([Path(ckpt).parent / "karlo_models" / CLIP_STATS_NAME] if ckpt else [])
        found += list(also)
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            return None
    if not Path(path).is_file():
        raise SDError(f"--clip-stats: file not found: {path}")
    if aug.stats_source is None or aug.stats_source.resolve() != Path(path).resolve():
        aug.use_stats(path)
    return Path(path)


class Variations(Txt2Img):
    """Images in the manner of one picture, or of several mixed with weights (an unCLIP checkpoint)."""
    name = "variations"

    def __init__(self, images: Sequence[ImageInput], weights: Optional[Sequence[float]] = None, noise_level: int = 0,
                 clip_stats: Optional[str | Path] = None):
        if not isinstance(images, (list, tuple)):  # one picture: a path or a PIL image
            images = [images]
        if not images:
            raise SDError("give at least one input picture (--image FILE)")
        self.pictures = [_input_picture(img, f"input image {k + 1}" if len(images) > 1 else "the input image")
                         for k, img in enumerate(images)]
        self.weights = [1.0] * len(self.pictures) if not weights else [float(w) for w in weights]
        self.noise_level = int(noise_level)
        self.clip_stats = Path(clip_stats) if clip_stats is not None else None
        self.hashes = [pixel_hash(p) for p in self.pictures]
        self.embedding: Optional[torch.Tensor] = None

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        from ldm.models.diffusion.conditioned import check_mix_weights

        super().check(request, name)
        check_mix_weights(self.weights, len(self.pictures))
        _check_level_and_files(self.noise_level, {"--clip-stats": self.clip_stats}, name)

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        from ldm.models.diffusion.conditioned import ImageEmbeddingConditionedLatentDiffusion as Unclip

        require_model(model, Unclip, "variations", "a Stable unCLIP checkpoint (sd21-unclip-h.ckpt or sd21-unclip-l.ckpt)",
                      choice.config)
        used = clip_stats_file(model, choice.ckpt, self.clip_stats)
        model.check_noise_level(self.noise_level)  # above 0 without the statistics: says where the file comes from
        if used is None and model.noise_augmentor is not None and model.noise_augmentor.clip_stats_path is not None:
            note(f"no CLIP statistics ({CLIP_STATS_NAME}; --clip-stats FILE): noise level 0 runs with mean 0 / std 1, "
                 "which changes little there (level 0 keeps 0.99998 of the embedding and adds noise of std 0.0064)")
        embeddings = torch.cat([model.embed_images(imageio.pil_to_tensor(p).to(device)) for p in self.pictures])
        self.embedding = model.mix(embeddings, self.weights)  # (1, D)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        cond = model.build_conditioning(repeat_batch(self.embedding, len(items)), self.noise_level, generators=generators)
        return BatchInputs(extra_cond=extra_cond(model, cond))

    def reproduce(self, fields: dict) -> None:
        """--from-image: the recorded weights and noise level; the pictures must be the recorded ones."""
        recorded = [h.strip() for h in fields.get("Image hashes", "").split(",") if h.strip()]
        if recorded and len(recorded) != len(self.pictures):
            raise SDError(f"it mixes {len(recorded)} pictures; give them with --image, in the same order")
        try:
            if "Image weights" in fields:
                self.weights = [float(w) for w in fields["Image weights"].split(",")]
            self.noise_level = int(fields.get("Noise level", self.noise_level))
        except ValueError:
            raise SDError("its Image weights / Noise level are not numbers") from None
        for k, (ours, theirs) in enumerate(zip(self.hashes, recorded)):
            if ours != theirs:
                note(f"input image {k + 1} has hash {ours}, the image was made from {theirs}: the result will differ")

    def settings(self) -> dict:
        return {"Noise level": self.noise_level, "Image hashes": ", ".join(self.hashes),
                "Image weights": ", ".join(repr(float(w)) for w in self.weights)}  # repr: reads back exactly


def _check_level_and_files(noise_level: int, files: dict[str, Optional[Path]], name=lambda key: key) -> None:
    """The checks both unCLIP tasks make before the model loads: the noise level's range, the files named."""
    if not 0 <= noise_level <= MAX_LEVEL:
        raise SDError(f"{name('noise_level')} must be in 0..{MAX_LEVEL} (got {noise_level})")
    for flag, path in files.items():
        if path is not None and not path.is_file():
            raise SDError(f"{flag}: file not found: {path}")


def _input_picture(image: ImageInput, what: str) -> Image.Image:
    """An input picture as the reference demo prepares it: sides cut down to multiples of 64 (LANCZOS)."""
    img = shrink_to_work_size(imageio.load_image(image, what=what), what)
    if min(img.size) < INPUT_MULTIPLE:
        raise SDError(f"{what} is {img.size[0]}x{img.size[1]}: each side must be at least {INPUT_MULTIPLE} pixels")
    return imageio.resize_to_multiple(img, INPUT_MULTIPLE)


class PriorTxt2Img(Txt2Img):
    """unCLIP-L text-to-image: the Karlo prior turns each prompt into a CLIP image embedding (one per image,
    from its seed), which is noised to `noise_level` and conditions unCLIP-L beside the prompt's text features.

    `prior` is a loaded ldm.karlo.TextToImageEmbedding (the Python API loads it once), or it is loaded in
    prepare() from `prior_ckpt` (+ `prior_clip`, the statistics as for variations, then beside the prior)."""
    name = "txt2img"

    def __init__(self, prior=None, prior_ckpt: Optional[str | Path] = None, prior_clip: Optional[str | Path] = None,
                 clip_stats: Optional[str | Path] = None, noise_level: int = 0, prior_steps: Optional[int] = None,
                 prior_scale: Optional[float] = None):
        from ldm.karlo import PRIOR_SCALE, PRIOR_STEPS

        if prior is None and prior_ckpt is None:
            raise SDError("text-to-image with unCLIP-L needs the Karlo prior: --prior-ckpt FILE")
        self.prior, self.prior_ckpt = prior, Path(prior_ckpt) if prior_ckpt is not None else None
        self.prior_clip = Path(prior_clip) if prior_clip is not None else None
        self.clip_stats = Path(clip_stats) if clip_stats is not None else None
        self.noise_level = int(noise_level)
        self.prior_steps = PRIOR_STEPS if prior_steps is None else int(prior_steps)
        self.prior_scale = PRIOR_SCALE if prior_scale is None else float(prior_scale)

    def check(self, request: "Request", name: Callable[[str], str] = lambda key: key) -> None:
        from ldm.karlo import spaced_steps

        super().check(request, name)
        _check_level_and_files(self.noise_level, {"--prior-ckpt": self.prior_ckpt, "--prior-clip": self.prior_clip,
                                                  "--clip-stats": self.clip_stats}, name)
        spaced_steps(self.prior_steps)
        if self.prior_scale != self.prior_scale or abs(self.prior_scale) > 100:
            raise SDError(f"--prior-scale must be a number in -100..100 (got {self.prior_scale})")

    def prepare(self, model, request: "Request", device: torch.device, choice: "ModelChoice") -> None:
        from ldm.models.diffusion.conditioned import ImageEmbeddingConditionedLatentDiffusion as Unclip

        require_model(model, Unclip, "text-to-image through the Karlo prior", "Stable unCLIP-L (sd21-unclip-l.ckpt)",
                      choice.config)
        if model.noise_augmentor is None or model.noise_augmentor.clip_stats_path is None:
            raise SDError("the Karlo prior makes CLIP ViT-L embeddings, which only unCLIP-L takes; "
                          f"this checkpoint fits {Path(choice.config).name}")
        beside = (self.prior_ckpt.parent / CLIP_STATS_NAME,) if self.prior_ckpt is not None else ()
        if clip_stats_file(model, choice.ckpt, self.clip_stats, also=beside) is None:
            raise SDError(f"the Karlo prior needs the CLIP statistics {CLIP_STATS_NAME} (Karlo v1 alpha's, in no "
                          "checkpoint): put it beside the prior or pass --clip-stats FILE")
        model.check_noise_level(self.noise_level)
        if self.prior is None:
            from ldm.karlo import load_prior

            aug = model.noise_augmentor
            self.prior = load_prior(self.prior_ckpt, (aug.data_mean, aug.data_std), self.prior_clip,
                                    text_model=model.embedder.model).to(device)

    def batch(self, model, items: list[Item], generators, device) -> BatchInputs:
        from ldm.text.syntax import parse_weights, take_loras

        # the prior reads plain text: LoRA tags and (word:1.2) weights are the SD text encoder's syntax
        texts = ["".join(t for t, w in parse_weights(take_loras(it.prompt)[0]) if w >= 0) for it in items]
        embedding = self.prior(texts, generators, self.prior_steps, self.prior_scale)  # (B, 768)
        cond = model.build_conditioning(embedding.to(device), self.noise_level, generators=generators)
        return BatchInputs(extra_cond=extra_cond(model, cond))

    def reproduce(self, fields: dict) -> None:
        try:
            self.noise_level = int(fields.get("Noise level", self.noise_level))
            self.prior_steps = int(fields.get("Prior steps", self.prior_steps))
            self.prior_scale = float(fields.get("Prior scale", self.prior_scale))
        except ValueError:
            raise SDError("its Noise level / Prior steps / Prior scale are not numbers") from None

    def settings(self) -> dict:
        from ldm.files import metadata

        return {"Prior": "Karlo v1 alpha", "Prior hash": metadata.model_hash(self.prior.ckpt if self.prior is not None
                                                                              else self.prior_ckpt),
                "Prior steps": self.prior_steps, "Prior scale": self.prior_scale, "Noise level": self.noise_level}
