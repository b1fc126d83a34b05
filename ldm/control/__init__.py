"""ControlNet: steering a picture by a hint (edges, a scribble, depth) for every SD 2.x txt2img, img2img and
inpaint model.

- units.py: ControlUnit, what a request asks of one ControlNet (file, hint picture, preprocessor, weight,
  start/end, control mode, resize mode), with A1111's names for its enums; checked by itself.
- preprocess.py: the preprocessors that need no weights of their own (canny, invert, threshold, scribble
  XDoG, standard line art) and the depth map from sd's own MiDaS; `detect` runs one on a picture.
- apply.py: reading ControlNet files strictly (alone or inside a ControlLDM checkpoint, with or without the
  `control_model.` prefix), the hint at the latent's size by the resize mode, and `Controller`, which the
  model's apply_model consults at every call: each active unit's residuals, weighted by its mode, go to the
  UNet (ldm.modules.diffusionmodules.controlnet holds the network).
"""
