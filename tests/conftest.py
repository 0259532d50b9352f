"""Test-session settings shared by every test file."""

import torch

# One intra-op thread: the tests use small tensors, where a second thread gains little, and on a busy
# 2-core machine OpenMP threads spin-wait for each other and a one-minute test can take half an hour.
torch.set_num_threads(1)
