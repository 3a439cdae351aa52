import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state: failures reproduce."""
    torch.manual_seed(0)
    np.random.seed(0)
