"""eplb_native.plan's Python-side argument checks that tests/test_planner.py does not cover."""

import numpy as np
import pytest
import torch

import eplb_native


@pytest.mark.parametrize("load", [np.full((1, 4), 1 + 1j), torch.ones(1, 4, dtype=torch.complex64)])
def test_complex_load_is_refused(load):
    # the cast to float64 used to drop the imaginary part, with only a ComplexWarning
    with pytest.raises(TypeError, match="load must hold real numbers"):
        eplb_native.plan(load, num_ranks=2, num_replicas=4)
