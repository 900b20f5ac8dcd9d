"""metrics: balancedness as DESIGN defines it (mean / max rank load, each replica carrying
load / logcnt), against the reference (tests/reference) on random placements and loads."""

import numpy as np
import pytest
from reference.cli import balancedness as ref_balancedness  # (tests/ is on sys.path)

from eplb_native import metrics


def test_balancedness_matches_the_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        E, R = int(rng.integers(1, 12)), int(rng.integers(1, 6))
        S = int(rng.integers(max(1, -(-E // R)), 5 + E // R))
        L = int(rng.integers(1, 4))
        phy2log = np.stack([np.concatenate([np.arange(E), rng.integers(0, E, R * S - E)])
                            [rng.permutation(R * S)] for _ in range(L)])  # repeats on a rank too
        load = rng.integers(0, 50, (L, E)) * (rng.random((L, E)) < 0.8)
        np.testing.assert_allclose(metrics.balancedness(load, phy2log, R),
                                   ref_balancedness(load, phy2log, R), rtol=1e-12)


def test_measured_balancedness_edges():
    got = metrics.measured_balancedness([[0, 0], [2, 2], [1, 3], [np.nan, 1]])
    np.testing.assert_allclose(got[:3], [1.0, 1.0, 2 / 3])
    assert np.isnan(got[3])  # a NaN count is no perfect balance (it read 1.0)
    with pytest.raises(ValueError, match="rank_tokens must be"):
        metrics.measured_balancedness([1, 2])


@pytest.mark.parametrize("load, phy2log, ranks, match", [
    ([[1, 1]], [[0, 1, 1]], 2, "num_ranks must be a positive divisor"),
    ([[1, 1]], [[0, 2]], 2, r"phy2log ids must lie in \[0, 2\)"),
    ([[1, 5]], [[0, 0]], 2, "no slot of expert 1 in layer 0, which has load 5"),
    ([[1, 1], [1, 1]], [[0, 1]], 1, "same layers"),
    # (were accepted: a negative balancedness, an id truncated to 0, numpy's TypeError)
    ([[-5, 1, 1, 1]], [[0, 1, 2, 3]], 2, "load must be finite and >= 0"),
    ([[5, 1]], [[0.7, 1]], 2, "phy2log must hold integer expert ids, got dtype float64"),
    ([[5, 1]], np.array([[0, 2**64 - 1]], np.uint64), 2, "ids must lie in \\[0, 2\\), got "
                                                          "18446744073709551615"),
])
def test_rank_loads_bad_input_names_it(load, phy2log, ranks, match):
    with pytest.raises(ValueError, match=match):
        metrics.rank_loads(load, phy2log, ranks)


def test_stats_histories_keep_their_newest_entries(monkeypatch):
    """(review 18: a server's stats grew for weeks, a dict a moved layer)"""
    from eplb_native import metrics

    monkeypatch.setattr(metrics, "MAX_STATS_ENTRIES", 3)
    stats = metrics.UpdatorStats()
    for i in range(5):
        stats.moves.append({"step": i})
    assert [m["step"] for m in stats.moves] == [2, 3, 4] and stats.moves[-2:][0]["step"] == 3
