"""`sd serve`: one loaded model behind a web page (gradio) and AUTOMATIC1111's HTTP API (FastAPI).

- worker.py: the one thread that runs jobs on the model, in arrival order, with progress and interrupt;
- a1111.py: the /sdapi/v1 request fields, sampler names and responses, mapped onto ldm.pipeline;
- masks.py: AUTOMATIC1111's inpainting options (mask blur and invert, fill, "only masked") as picture work;
- api.py: the /sdapi/v1 routes; page.py: the gradio page; app.py: both on one FastAPI app, with auth,
  body limits and one log line per request.
"""
