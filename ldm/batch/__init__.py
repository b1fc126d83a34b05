"""Batch jobs: prompt files (plain and JSON Lines), run state and manifests, resume, and scale-out.

Planning lives in ldm/plan.py and sampling in ldm/pipeline.py; this package holds what a command's run
adds around them:
- run.py: `run_job`, the run of every generating command (load once, then every batch of the plan);
- prompts.py: `--from-file` parsing, one prompt a line or JSON Lines with per-line settings;
- outputs.py: output names (sequential or base + k), the manifest, `--skip-existing`, the grid;
- distributed.py: the plan run through PyTorch Lightning's predict loop with the DDP strategy;
- reproduce.py: `--from-image`, a job rebuilt from a PNG's "parameters" text;
- options.py: the Typer option types of these flags, for every generating command.
"""
