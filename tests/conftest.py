import os

import pytest
import torch

# Two cores are shared by everything on CI machines: one intra-op thread keeps
# tests from oversubscribing them.
torch.set_num_threads(int(os.environ.get("DNO_TEST_THREADS", "2")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
