"""A ComfyUI API-format prompt reduced to one sd job: the graph's nodes are read as a description (a checkpoint
title, texts, a latent size or an input picture, one sampler's settings) and become one Pipeline call; what
does not reduce is a node error naming the node, never a different picture.

Nodes served (NODES): CheckpointLoaderSimple, CLIPTextEncode, CLIPSetLastLayer, LoraLoader, EmptyLatentImage,
LoadImage, ImageScale, VAEEncode, KSampler, KSamplerAdvanced, VAEDecode, SaveImage, PreviewImage, ControlNetLoader,
ControlNetApply (on both prompts), ControlNetApplyAdvanced; VAELoader is
listed (no files: the checkpoint's own VAE decodes), and a graph that uses it is a node error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# ComfyUI's sampler and scheduler names for what sd runs (sd's own names as the values)
SAMPLERS = {"euler": "euler", "euler_ancestral": "euler_a", "heun": "heun", "dpm_2": "dpm2", "dpmpp_2m": "dpmpp_2m",
            "dpmpp_2m_sde": "dpmpp_2m_sde", "ddim": "ddim"}
SCHEDULERS = {"normal": "uniform", "karras": "karras", "exponential": "exponential", "sgm_uniform": "sgm_uniform",
              "ddim_uniform": "ddim_uniform"}
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
OUTPUT_NODES = ("SaveImage", "PreviewImage")
MAX_NODES = 256


class NodeError(Exception):
    """A node that does not reduce: ComfyUI's node_errors entry for it."""

    def __init__(self, node: str, class_type: str, message: str, kind: str = "value_not_valid"):
        super().__init__(message)
        self.node, self.class_type, self.kind = node, class_type, kind


class PromptError(Exception):
    """The prompt as a whole is wrong (no outputs, not a graph): ComfyUI's top-level error."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Plan:
    """What a prompt asks of sd: one generation, and the output nodes that show its images."""
    checkpoint: Optional[str]  # the ckpt_name (a models-folder title)
    prompt: str
    negative: str
    sampling: dict  # seed, steps, scale, sampler, schedule
    width: Optional[int] = None
    height: Optional[int] = None
    batch_size: int = 1
    init_image: Optional[str] = None  # LoadImage's name in the input folder
    init_size: Optional[tuple] = None  # ImageScale's (method, width, height, crop)
    strength: float = 1.0
    clip_skip: Optional[int] = None
    loras: list = field(default_factory=list)  # (name, strength_model)
    outputs: dict = field(default_factory=dict)  # output node id -> (class_type, filename_prefix)
    sampler_node: str = ""
    checkpoint_node: str = ""  # the CheckpointLoaderSimple that names it
    image_node: str = ""  # the LoadImage that names the picture
    controls: list = field(default_factory=list)  # Control: the ControlNets applied, in order


@dataclass
class Control:
    """A ControlNet applied to both prompts (ControlNetApplyAdvanced, or ControlNetApply on each): its file's
    name, its hint picture (LoadImage's name, ImageScale's size), strength, and the steps' share it acts on."""
    node: str
    net: str
    net_node: str
    image: str
    image_node: str
    size: Optional[tuple]
    strength: float
    start: float
    end: float


def reduce(prompt: Any, loras: Callable[[], dict]) -> Plan:
    """The Plan of an API-format prompt {id: {"class_type", "inputs"}}; NodeError / PromptError otherwise.
    `loras()` lists the LoRA names the server has."""
    if not isinstance(prompt, dict) or not prompt:
        raise PromptError("no_prompt", "No prompt provided")
    if len(prompt) > MAX_NODES:
        raise PromptError("invalid_prompt", f"a prompt of at most {MAX_NODES} nodes")
    for node, spec in prompt.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("inputs", {}), dict):
            raise PromptError("invalid_prompt", f"node {node} is not an object with class_type and inputs")
        if "class_type" not in spec:
            raise PromptError("invalid_prompt", f"Cannot execute because a node is missing the class_type "
                                                f"property.: Node ID '#{node}'")
        if spec["class_type"] not in NODES:
            raise PromptError("invalid_prompt", f"Cannot execute because node {spec['class_type']} does not exist.: "
                                                f"Node ID '#{node}'")
    outputs = {node: spec for node, spec in prompt.items() if spec["class_type"] in OUTPUT_NODES}
    if not outputs:
        raise PromptError("prompt_no_outputs", "Prompt has no outputs")
    reader = _Reader(prompt, loras)
    plans = {}
    for node, spec in outputs.items():
        images = reader.link(node, "images")
        plan = reader.images(images)
        plans[id(plan)] = plan
        prefix = spec["inputs"].get("filename_prefix", "ComfyUI") if spec["class_type"] == "SaveImage" else "ComfyUI"
        plan.outputs[node] = (spec["class_type"], reader.text(node, "filename_prefix", prefix))
    if len(plans) > 1:
        raise NodeError(next(iter(outputs)), "SaveImage", "sd runs one sampler per prompt: these outputs come from "
                        "different samplers")
    return next(iter(plans.values()))


class _Reader:
    def __init__(self, prompt: dict, loras: Callable[[], dict]):
        self.prompt, self.loras, self.plans = prompt, loras, {}
        self.checkpoint_node = self.image_node = ""

    def spec(self, node: str) -> dict:
        return self.prompt[node]

    def raw(self, node: str, name: str):
        inputs = self.spec(node).get("inputs", {})
        if name not in inputs:
            raise NodeError(node, self.spec(node)["class_type"], f"Required input is missing: {name}",
                            "required_input_missing")
        return inputs[name]

    def link(self, node: str, name: str) -> tuple[str, int]:
        """The (node, output index) an input is wired to."""
        value = self.raw(node, name)
        if not (isinstance(value, list) and len(value) == 2 and str(value[0]) in self.prompt
                and isinstance(value[1], int)):
            raise NodeError(node, self.spec(node)["class_type"], f"{name} must be a link [node id, output index] "
                            "to a node of the prompt", "bad_linked_input")
        return str(value[0]), value[1]

    def number(self, node: str, name: str, default=None, kind=float, low=None, high=None):
        value = self.spec(node).get("inputs", {}).get(name, default)
        if value is None:
            return self.raw(node, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
                (kind is int and float(value) != int(value)):
            raise NodeError(node, self.spec(node)["class_type"], f"{name} must be {'an integer' if kind is int else 'a number'} "
                            f"(got {value!r})")
        value = kind(value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise NodeError(node, self.spec(node)["class_type"], f"{name} must be from {low} to {high} (got {value})",
                            "value_bigger_than_max" if high is not None and value > high else "value_smaller_than_min")
        return value

    def text(self, node: str, name: str, default=None) -> str:
        value = self.spec(node).get("inputs", {}).get(name, default)
        if value is None:
            value = self.raw(node, name)
        if not isinstance(value, str):
            raise NodeError(node, self.spec(node)["class_type"], f"{name} must be a string (got {type(value).__name__})")
        return value

    def choice(self, node: str, name: str, choices) -> str:
        value = self.text(node, name)
        if value not in choices:
            raise NodeError(node, self.spec(node)["class_type"], f"Value not in list: {name}: '{value}' not in "
                            f"{list(choices)}")
        return value

    def expect(self, link: tuple[str, int], types: dict, what: str) -> str:
        """The class of the linked node, one of `types` {class_type: output index}."""
        node, index = link
        class_type = self.spec(node)["class_type"]
        if class_type not in types or types[class_type] != index:
            raise NodeError(node, class_type, f"sd reads {what} only from {', '.join(types)} here "
                            f"(output {index} of {class_type} is not one)", "return_type_mismatch")
        return class_type

    # -- the chain, from the output back -------------------------------------------------------------------
    def images(self, link: tuple[str, int]) -> Plan:
        self.expect(link, {"VAEDecode": 0}, "IMAGE for an output")
        decode = link[0]
        self.model_source(self.link(decode, "vae"), "VAE", 2)
        samples = self.link(decode, "samples")
        self.expect(samples, {"KSampler": 0, "KSamplerAdvanced": 0}, "the LATENT a VAEDecode decodes")
        if samples[0] not in self.plans:
            self.plans[samples[0]] = self.sampler(samples[0])
        return self.plans[samples[0]]

    def model_source(self, link: tuple[str, int], what: str, index: int) -> tuple[Optional[str], Optional[int], list]:
        """(ckpt_name, clip skip, loras) of a MODEL / CLIP / VAE input, through LoraLoader and CLIPSetLastLayer."""
        node, out = link
        class_type = self.spec(node)["class_type"]
        if class_type == "CheckpointLoaderSimple" and out == index:
            self.checkpoint_node = node
            return self.text(node, "ckpt_name"), None, []
        if class_type == "LoraLoader" and what in ("MODEL", "CLIP") and out == (0 if what == "MODEL" else 1):
            name = self.text(node, "lora_name")
            stem = name.rsplit(".", 1)[0] if name.endswith((".safetensors", ".pt", ".ckpt")) else name
            if stem not in self.loras():
                raise NodeError(node, class_type, f"Value not in list: lora_name: '{name}' not in the LoRA folder")
            weight = self.number(node, "strength_model" if what == "MODEL" else "strength_clip", 1.0, low=-10, high=10)
            ckpt, skip, loras = self.model_source(self.link(node, "model" if what == "MODEL" else "clip"), what,
                                                  0 if what == "MODEL" else 1)
            return ckpt, skip, loras + [(stem, weight)]
        if class_type == "CLIPSetLastLayer" and what == "CLIP" and out == 0:
            layer = self.number(node, "stop_at_clip_layer", -1, int, -24, -1)
            ckpt, _, loras = self.model_source(self.link(node, "clip"), what, 1)
            return ckpt, -layer, loras
        raise NodeError(node, class_type, f"sd reads a {what} only from CheckpointLoaderSimple"
                        f"{', LoraLoader' if what != 'VAE' else ''}{' or CLIPSetLastLayer' if what == 'CLIP' else ''}",
                        "return_type_mismatch")

    def conditioning(self, link: tuple[str, int], side: str) -> tuple[str, tuple, dict]:
        """(text, its CLIP's source, {apply node: Control}) of a KSampler's positive or negative input."""
        class_type = self.expect(link, {"CLIPTextEncode": 0, "ControlNetApply": 0,
                                        "ControlNetApplyAdvanced": 0 if side == "positive" else 1}, "CONDITIONING")
        node = link[0]
        if class_type == "CLIPTextEncode":
            return self.text(node, "text"), self.model_source(self.link(node, "clip"), "CLIP", 1), {}
        inner = self.link(node, "conditioning" if class_type == "ControlNetApply" else side)
        text, clip, controls = self.conditioning(inner, side)
        return text, clip, {**controls, node: self.control(node, class_type)}

    def control(self, node: str, class_type: str) -> Control:
        net = self.link(node, "control_net")
        self.expect(net, {"ControlNetLoader": 0}, "a CONTROL_NET")
        image, size = self.picture(self.link(node, "image"))
        advanced = class_type == "ControlNetApplyAdvanced"
        start = self.number(node, "start_percent", 0.0, low=0.0, high=1.0) if advanced else 0.0
        end = self.number(node, "end_percent", 1.0, low=0.0, high=1.0) if advanced else 1.0
        if start > end:
            raise NodeError(node, class_type, f"start_percent {start} is after end_percent {end}")
        return Control(node, self.text(net[0], "control_net_name"), net[0], image, self.image_node, size,
                       self.number(node, "strength", 1.0, low=0.0, high=2.0), start, end)

    def sampler(self, node: str) -> Plan:
        class_type = self.spec(node)["class_type"]
        model = self.model_source(self.link(node, "model"), "MODEL", 0)
        prompt, clip, controls = self.conditioning(self.link(node, "positive"), "positive")
        negative, clip_negative, negative_controls = self.conditioning(self.link(node, "negative"), "negative")
        for apply, control in {**controls, **negative_controls}.items():
            if apply in controls and apply in negative_controls:
                continue
            twin = [c for c in (negative_controls if apply in controls else controls).values()
                    if (c.net, c.image, c.size, c.strength) == (control.net, control.image, control.size, control.strength)]
            if not twin:
                raise NodeError(apply, self.spec(apply)["class_type"], "sd applies a ControlNet to both prompts (A1111's "
                                "Balanced mode): use ControlNetApplyAdvanced, or the same ControlNetApply on the "
                                "negative too")
        if clip[0] != model[0] or clip_negative[0] != model[0] or clip[1] != clip_negative[1]:
            raise NodeError(node, class_type, "sd runs one checkpoint's MODEL and CLIP together, with one clip skip "
                            "for both prompts")
        steps = self.number(node, "steps", None, int, 1, 10000)
        seed_name = "noise_seed" if class_type == "KSamplerAdvanced" else "seed"
        sampling = {"seed": self.number(node, seed_name, None, int, 0, 2 ** 64 - 1), "steps": steps,
                    "scale": self.number(node, "cfg", 8.0, low=0.0, high=100.0),
                    "sampler": SAMPLERS[self.choice(node, "sampler_name", SAMPLERS)],
                    "schedule": SCHEDULERS[self.choice(node, "scheduler", SCHEDULERS)]}
        strength = self.number(node, "denoise", 1.0, low=0.0, high=1.0) if class_type == "KSampler" else 1.0
        if class_type == "KSamplerAdvanced":
            start = self.number(node, "start_at_step", 0, int, 0, 10000)
            end = self.number(node, "end_at_step", 10000, int, 0, 10000)
            if self.text(node, "add_noise", "enable") != "enable" or start != 0 or end < steps or \
                    self.text(node, "return_with_leftover_noise", "disable") != "disable":
                raise NodeError(node, class_type, "sd runs KSamplerAdvanced as KSampler: add_noise enable, "
                                "start_at_step 0, end_at_step at least steps, no leftover noise")
        plan = Plan(model[0], prompt, negative, sampling, strength=strength, clip_skip=clip[1],
                    loras=_merged(model[2], clip[2]), sampler_node=node, checkpoint_node=self.checkpoint_node,
                    controls=list(controls.values()))
        latent = self.link(node, "latent_image")
        source = self.expect(latent, {"EmptyLatentImage": 0, "VAEEncode": 0}, "the LATENT a sampler starts from")
        if source == "EmptyLatentImage":
            if strength != 1.0:
                raise NodeError(node, class_type, "denoise below 1 needs a picture (VAEEncode), not an empty latent")
            plan.width = self.number(latent[0], "width", 512, int, 64, 16384)
            plan.height = self.number(latent[0], "height", 512, int, 64, 16384)
            plan.batch_size = self.number(latent[0], "batch_size", 1, int, 1, 4096)
        else:
            self.model_source(self.link(latent[0], "vae"), "VAE", 2)
            plan.init_image, plan.init_size = self.picture(self.link(latent[0], "pixels"))
            plan.image_node = self.image_node
        return plan

    def picture(self, link: tuple[str, int]) -> tuple[str, Optional[tuple]]:
        class_type = self.expect(link, {"LoadImage": 0, "ImageScale": 0}, "an IMAGE to encode")
        node = link[0]
        if class_type == "LoadImage":
            self.image_node = node
            return self.text(node, "image"), None
        size = (self.choice(node, "upscale_method", UPSCALE_METHODS), self.number(node, "width", None, int, 0, 16384),
                self.number(node, "height", None, int, 0, 16384), self.choice(node, "crop", ("disabled", "center")))
        inner = self.link(node, "image")
        self.expect(inner, {"LoadImage": 0}, "the IMAGE an ImageScale scales")
        self.image_node = inner[0]
        return self.text(inner[0], "image"), size


def _merged(model: list, clip: list) -> list:
    """One LoRA list: sd applies a LoRA to the UNet and the text encoder with one weight (the model's)."""
    names = dict(model)
    for name, weight in clip:
        names.setdefault(name, weight)
    return list(names.items())


# The served nodes as /object_info describes them (inputs: [type or choices, options]).
def _input(kind, **options):
    return [kind, options] if options else [kind]


def object_info(checkpoints: list[str], loras: list[str], inputs: list[str], controlnets: list[str] = ()) -> dict:
    """ComfyUI's /object_info for the nodes sd serves, with the server's checkpoints, LoRAs, input files and
    ControlNets."""
    seed = _input("INT", default=0, min=0, max=2 ** 64 - 1)
    sampler_inputs = {"model": _input("MODEL"), "seed": seed, "steps": _input("INT", default=20, min=1, max=10000),
                      "cfg": _input("FLOAT", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                      "sampler_name": [list(SAMPLERS)], "scheduler": [list(SCHEDULERS)],
                      "positive": _input("CONDITIONING"), "negative": _input("CONDITIONING"),
                      "latent_image": _input("LATENT")}
    nodes = {
        "CheckpointLoaderSimple": ({"ckpt_name": [checkpoints]}, ["MODEL", "CLIP", "VAE"], "loaders"),
        "CLIPTextEncode": ({"text": _input("STRING", multiline=True, dynamicPrompts=True), "clip": _input("CLIP")},
                           ["CONDITIONING"], "conditioning"),
        "CLIPSetLastLayer": ({"clip": _input("CLIP"), "stop_at_clip_layer": _input("INT", default=-1, min=-24, max=-1)},
                             ["CLIP"], "conditioning"),
        "LoraLoader": ({"model": _input("MODEL"), "clip": _input("CLIP"), "lora_name": [loras],
                        "strength_model": _input("FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01),
                        "strength_clip": _input("FLOAT", default=1.0, min=-10.0, max=10.0, step=0.01)},
                       ["MODEL", "CLIP"], "loaders"),
        "EmptyLatentImage": ({"width": _input("INT", default=512, min=64, max=16384, step=8),
                              "height": _input("INT", default=512, min=64, max=16384, step=8),
                              "batch_size": _input("INT", default=1, min=1, max=4096)}, ["LATENT"], "latent"),
        "LoadImage": ({"image": [inputs, {"image_upload": True}]}, ["IMAGE", "MASK"], "image"),
        "ImageScale": ({"image": _input("IMAGE"), "upscale_method": [list(UPSCALE_METHODS)],
                        "width": _input("INT", default=512, min=0, max=16384, step=1),
                        "height": _input("INT", default=512, min=0, max=16384, step=1),
                        "crop": [["disabled", "center"]]}, ["IMAGE"], "image/upscaling"),
        "VAEEncode": ({"pixels": _input("IMAGE"), "vae": _input("VAE")}, ["LATENT"], "latent"),
        "VAEDecode": ({"samples": _input("LATENT"), "vae": _input("VAE")}, ["IMAGE"], "latent"),
        "KSampler": ({**sampler_inputs, "denoise": _input("FLOAT", default=1.0, min=0.0, max=1.0, step=0.01)},
                     ["LATENT"], "sampling"),
        "KSamplerAdvanced": ({"model": _input("MODEL"), "add_noise": [["enable", "disable"]], "noise_seed": seed,
                              **{k: v for k, v in sampler_inputs.items() if k not in ("model", "seed")},
                              "start_at_step": _input("INT", default=0, min=0, max=10000),
                              "end_at_step": _input("INT", default=10000, min=0, max=10000),
                              "return_with_leftover_noise": [["disable", "enable"]]}, ["LATENT"], "sampling"),
        "ControlNetLoader": ({"control_net_name": [controlnets]}, ["CONTROL_NET"], "loaders"),
        "ControlNetApply": ({"conditioning": _input("CONDITIONING"), "control_net": _input("CONTROL_NET"),
                             "image": _input("IMAGE"), "strength": _input("FLOAT", default=1.0, min=0.0, max=2.0,
                                                                          step=0.01)}, ["CONDITIONING"], "conditioning"),
        "ControlNetApplyAdvanced": ({"positive": _input("CONDITIONING"), "negative": _input("CONDITIONING"),
                                     "control_net": _input("CONTROL_NET"), "image": _input("IMAGE"),
                                     "strength": _input("FLOAT", default=1.0, min=0.0, max=2.0, step=0.01),
                                     "start_percent": _input("FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
                                     "end_percent": _input("FLOAT", default=1.0, min=0.0, max=1.0, step=0.001)},
                                    ["CONDITIONING", "CONDITIONING"], "conditioning"),
        # listed with no files, for the clients that read its list: sd decodes with the checkpoint's own VAE
        "VAELoader": ({"vae_name": [[]]}, ["VAE"], "loaders"),
        "SaveImage": ({"images": _input("IMAGE"), "filename_prefix": _input("STRING", default="ComfyUI")}, [], "image"),
        "PreviewImage": ({"images": _input("IMAGE")}, [], "image"),
    }
    return {name: {"input": {"required": required, "optional": {}, "hidden": {}},
                   "input_order": {"required": list(required)}, "output": outputs,
                   "output_is_list": [False] * len(outputs), "output_name": outputs, "name": name,
                   "display_name": name, "description": "", "python_module": "nodes", "category": category,
                   "output_node": name in OUTPUT_NODES}
            for name, (required, outputs, category) in nodes.items()}


NODES = tuple(object_info([], [], []))
