"""Where and how the model runs: device, precision, backend and threads policy (policy.py), the torch fast
paths (fastpath.py: torch.compile, TorchScript, IPEX) and the OpenVINO backend (openvino.py)."""
