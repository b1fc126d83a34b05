"""Pilot timings for sizing the demo model (run by hand, not a test): VAE and UNet step times on CPU."""
import sys
import time

import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.openaimodel import UNetModel

torch.set_num_threads(2)


def timeit(fn, n=2):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def vae_case(ch, ch_mult, nrb):
    dd = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=ch, ch_mult=ch_mult,
              num_res_blocks=nrb, attn_resolutions=[], dropout=0.0)
    vae = AutoencoderKL(dd, embed_dim=4)
    print("vae", ch, ch_mult, nrb, "params", sum(p.numel() for p in vae.parameters()) / 1e6)
    crops = torch.randn(16, 3, 64, 64)

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            rec, post = vae(crops)
            loss = (rec.float() - crops).abs().mean()
        loss.backward()
    print("  vae fwd+bwd 16x64^2 bf16", timeit(step))
    x = torch.randn(8, 3, 256, 256)
    z = torch.randn(8, 4, 256 // 2 ** (len(ch_mult) - 1), 256 // 2 ** (len(ch_mult) - 1))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        print("  enc 8x256 bf16", timeit(lambda: vae.encode(x), 1))
        print("  dec 8x256 bf16", timeit(lambda: vae.decode(z), 1))


def unet_case(mc, mult, res, attn, ac):
    unet = UNetModel(image_size=res, in_channels=4, model_channels=mc, out_channels=4, num_res_blocks=1,
                     attention_resolutions=attn, channel_mult=mult, num_head_channels=32,
                     use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1,
                     context_dim=64, legacy=False)
    print("unet", mc, mult, res, attn, "params", sum(p.numel() for p in unet.parameters()) / 1e6)
    xb = torch.randn(32, 4, res, res)
    t = torch.randint(0, 1000, (32,))
    ctx = torch.randn(32, 77, 64)

    def ustep():
        with torch.autocast("cpu", torch.bfloat16, enabled=ac):
            out = unet(xb, t, ctx)
            loss = (out.float() - xb).pow(2).mean()
        loss.backward()
    print("  unet fwd+bwd b32 bf16", ac, timeit(ustep))


# The shipped demo model's shapes (configs/demo/demo-inference.yaml): f = 8 VAE, 32x32 latents.
if sys.argv[1] == "vae":
    vae_case(64, [1, 1, 1, 1], 0)
    vae_case(96, [1, 1, 1, 1], 0)
else:
    unet_case(32, [1, 2, 2], 32, [2, 4], False)
    unet_case(32, [1, 2, 2], 32, [2, 4], True)
