"""pytest runs with one worker per core (pytest-xdist, `-n auto --dist loadfile` in pytest.ini: a file's tests and its
module fixtures stay on one worker). Each worker then uses one torch thread: two workers with two threads each on two
cores oversubscribe, and torch's thread hand-offs slow small tensors down by up to 13x (measured on the toy)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
