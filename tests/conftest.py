"""Thread budget under pytest-xdist: each worker gets its share of the cores (torch and the recipes it launches),
so N workers run N × (cores / N) threads instead of N × cores spinning against each other."""

import os

import torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
