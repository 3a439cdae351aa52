import subprocess
import sys

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: failures reproduce."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def capscale_cli():
    """`capscale ARGS` in a fresh interpreter, as a user runs it: the CompletedProcess, output as text."""
    def run(*args, **kwargs):
        return subprocess.run([sys.executable, "-m", "capscale", *args], capture_output=True, text=True, **kwargs)
    return run
