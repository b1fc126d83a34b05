"""`sd serve`: one loaded model behind a web page (gradio) and AUTOMATIC1111's HTTP API (FastAPI).

- worker.py: the one thread that runs jobs on the model, in arrival order, with progress and interrupt;
- a1111.py: the /sdapi/v1 request fields, sampler names and responses, mapped onto ldm.pipeline;
- masks.py: AUTOMATIC1111's inpainting options (mask blur and invert, fill, "only masked") as picture work;
- jobs.py: a generating job handed to the worker (Prepared), run on the checkpoint it names (generate -> Ran);
- api.py: the /sdapi/v1 routes; options.py, styles.py, extras.py: A1111's options, styles.csv and extras;
- page.py: the gradio page; painter.py: its inpaint mask painter;
- app.py: the API and the page on one FastAPI app, with auth, body limits and one log line per request.

This package imports nothing itself, so `sd serve --help` stays light; what the command line and the server
share is here.
"""

# Live previews every this many steps, made only while the page or a /progress client shows them, when they
# are decoded (TAESD's, or the full VAE's: about two UNet steps' time for SD at 512 in bf16 on a CPU); the
# cheap previews (A1111's Approx cheap, the default without TAESD) come every step. `sd serve --preview-every 0`
# turns them off, 10 is A1111's default.
PREVIEW_EVERY = 5
