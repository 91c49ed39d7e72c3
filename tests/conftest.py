import os

# One intra-op thread: on 2 shared cores a second torch/ORT thread makes small forwards many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from hypothesis import settings  # noqa: E402

# CI must not turn red on a newly drawn example: the same examples every run, no example database.
settings.register_profile("edgeport", derandomize=True, database=None, deadline=None)
settings.load_profile("edgeport")
