"""Loading a model: checkpoint files read safely (checkpoint.py), the family and config from the keys and the
eps/v probe (detect.py), each family's defaults and the demo model's files (families.py), and the one load
path: build on meta, check keys, assign, cast, device, fast path (build.py)."""
