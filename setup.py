from setuptools import find_packages, setup

setup(
    name="sd",
    version="0.1.0",
    description="Stable Diffusion 2.x toolkit: config-driven ldm package, strict checkpoint loading, CPU fast path",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "pytorch-lightning>=2.0",
        "omegaconf>=2.1",
        "open_clip_torch>=2.20",  # the BPE vocabulary and architecture configs it ships (read, not imported)
        "ftfy",  # prompt cleaning in our CLIP tokenizer, as open_clip does it
        "regex",
        "timm>=0.9",
        "einops",
        "invisible-watermark>=0.2",
        # ControlNet's canny and blur-based preprocessors (the extension's own calls); invisible-watermark needs it too
        "opencv-python",
        "pillow",
        "typer>=0.9",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        # sd serve: the page (gradio, the reference's own choice for its demos, current version) and
        # AUTOMATIC1111's HTTP API (FastAPI + uvicorn, what A1111 itself is built on)
        "gradio>=6,<7",
        "fastapi",
        "uvicorn",
        "python-multipart",
        # --backend openvino: Intel's maintained CPU runtime (IPEX, the older path, is end-of-life);
        # nncf: its int8 weight compression (--precision int8)
        "openvino>=2025",
        "nncf>=3",
        # Stable unCLIP's image preprocessing is kornia's antialiased bicubic resize (the reference's own call)
        "kornia",
    ],
    extras_require={
        # webuiapi: a real A1111 client to drive the server; playwright: drives Debian's chromium (never its own);
        # peft: diffusers' LoRA loading, the independent implementation the LoRA merge is checked against
        "test": ["pytest", "diffusers>=0.30", "transformers>=4.40", "webuiapi", "playwright", "requests", "peft"],
        # sd serve --ray: the replicas as a Ray Serve deployment (routing by checkpoint through its model
        # multiplexing, autoscaling, a cluster across machines); the pool backend needs nothing extra
        "ray": ["ray[serve]>=2.40"],
    },
    entry_points={"console_scripts": ["sd=ldm.cli.entry:main"]},
)
