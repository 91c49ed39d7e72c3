import os

# One intra-op thread: on 2 shared cores a second torch/ORT thread makes small forwards many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
