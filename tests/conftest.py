"""Every test starts from the same global random state, whatever ran before it.

pytest-randomly (a dev dependency) shuffles the order of the tests and reseeds ``random``
and NumPy per test; torch's global generator (which Pyro and ``nn`` initialisers use) is
reseeded here, before each test and again after it, so that a module-scoped fixture, set up
between two tests, also starts from a fixed state. Tests that need a particular stream still
seed their own ``torch.Generator``.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_torch():
    torch.manual_seed(0)
    yield
    torch.manual_seed(0)
