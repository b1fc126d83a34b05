"""Image files and what they carry: pictures in and out, atomic PNG writes, the watermark and grids
(imageio.py); AUTOMATIC1111's "parameters" text, PNG text chunks and the model hash (metadata.py)."""
