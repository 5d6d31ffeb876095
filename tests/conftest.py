"""pytest runs with one worker per core (pytest-xdist, `-n auto --dist loadfile` in pytest.ini: a file's tests and its
module fixtures stay on one worker). Each worker then uses one torch thread: two workers with two threads each on two
cores oversubscribe, and torch's thread hand-offs slow small tensors down by up to 13x (measured on the toy).
The text-to-image prompt-embedding cache goes to a temporary folder of the test session, never to ~/.cache."""

import os
import tempfile

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
os.environ.setdefault("T2I_CACHE_DIR", tempfile.mkdtemp(prefix="t2i-cache-tests-"))
