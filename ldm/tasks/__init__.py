"""The generating tasks: txt2img, img2img, depth2img, inpaint, upscale and variations (see ldm.tasks.base)."""
from ldm.tasks.base import BatchInputs, ImageTask, Task, Txt2Img, check_size, task_sets_size
from ldm.tasks.img2img import Depth2Img, Img2Img
from ldm.tasks.inpaint import Inpaint, LatentBlend
from ldm.tasks.upscale import Upscale
from ldm.tasks.unclip import PriorTxt2Img, Variations

__all__ = ["BatchInputs", "Depth2Img", "ImageTask", "Img2Img", "Inpaint", "LatentBlend", "Task", "Txt2Img",
           "PriorTxt2Img", "Upscale", "Variations", "check_size", "task_sets_size"]
