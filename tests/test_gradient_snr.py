"""The statistics of benchmarks/gradient_snr.py: hand-worked values and plain-loop references."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gradient_snr.py"
_spec = importlib.util.spec_from_file_location("gradient_snr", _PATH)
gs = importlib.util.module_from_spec(_spec)
sys.modules["gradient_snr"] = gs  # dataclasses look their module up while the file executes
_spec.loader.exec_module(gs)

# Three 2-d gradients worked by hand: mean (2, 1); deviations (-1, -1), (1, -1), (0, 2) with
# squared norms 2, 2, 4 (sum 8); standard error sqrt(8 / (3 * 2)) = 2 / sqrt(3); norm of the
# mean sqrt(5); SNR sqrt(5) * sqrt(3) / 2 = sqrt(15) / 2.
G3 = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]], dtype=torch.float64)


def _loop_snr(G):
    N = len(G)
    mean = [sum(g[i] for g in G) / N for i in range(len(G[0]))]
    spread = sum(sum((g[i] - mean[i]) ** 2 for i in range(len(g))) for g in G)
    return math.sqrt(sum(m * m for m in mean)) / math.sqrt(spread / (N * (N - 1)))


def _loop_cosine(a, b):
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return sum(x * y for x, y in zip(a, b)) / norms if norms else math.nan


def _loop_loo(G):
    out = []
    for b, g in enumerate(G):
        others = [h for c, h in enumerate(G) if c != b]
        mean = [sum(h[i] for h in others) / len(others) for i in range(len(g))]
        out.append(_loop_cosine(g, mean))
    return out


def test_snr_hand_worked():
    assert gs.snr(G3) == pytest.approx(math.sqrt(15) / 2, rel=1e-12)


def test_snr_matches_a_plain_loop():
    G = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.3
    assert gs.snr(G) == pytest.approx(_loop_snr(G.tolist()), rel=1e-12)


def test_snr_is_scale_free_and_grows_with_the_square_root_of_n():
    G = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 1.0
    assert gs.snr(3.7 * G) == pytest.approx(gs.snr(G), rel=1e-12)
    # Every batch twice: the same mean, twice the squared spread over 2N (2N - 1) instead of
    # N (N - 1), so the SNR grows by sqrt((2N - 1) / (N - 1)) = 3 / 2 for N = 5.
    assert gs.snr(torch.cat([G, G])) == pytest.approx(1.5 * gs.snr(G), rel=1e-12)


def test_snr_degenerate_spreads():
    same = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
    assert gs.snr(same) == math.inf
    assert math.isnan(gs.snr(torch.zeros(3, 2, dtype=torch.float64)))
    with pytest.raises(ValueError):
        gs.snr(G3[:1])


def test_batch_snr_hand_worked():
    # ||gbar||^2 = 5 less se^2 = 8 / 6 leaves 11 / 3; tr S estimated by 8 / 2 = 4: sqrt(11 / 12).
    assert gs.batch_snr(G3) == pytest.approx(math.sqrt(11 / 12), rel=1e-12)
    # The same through the SNR: sqrt((15 / 4 - 1) / 3).
    assert gs.batch_snr(G3) == pytest.approx(math.sqrt((gs.snr(G3) ** 2 - 1) / 3), rel=1e-12)


def test_batch_snr_matches_a_plain_loop_and_floors_at_zero():
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(6, 5, generator=gen, dtype=torch.float64) + 0.8
    G_ = G.tolist()
    N = len(G_)
    mean = [sum(g[i] for g in G_) / N for i in range(5)]
    spread = sum(sum((g[i] - mean[i]) ** 2 for i in range(5)) for g in G_)
    signal2 = sum(m * m for m in mean) - spread / (N * (N - 1))
    assert gs.batch_snr(G) == pytest.approx(math.sqrt(signal2 / (spread / (N - 1))), rel=1e-12)
    # Rows whose mean is no larger than its standard error: no signal left.
    centred = G - G.mean(dim=0)
    assert gs.snr(centred) < 1e-12 and gs.batch_snr(centred) == 0.0
    assert gs.batch_snr(torch.ones(3, 2, dtype=torch.float64)) == math.inf
    assert math.isnan(gs.batch_snr(torch.zeros(3, 2, dtype=torch.float64)))


def test_leave_one_out_cosines_hand_worked():
    # g1 = (1, 0) vs (2.5, 1.5): 2.5 / sqrt(8.5); g2 = (3, 0) vs (1.5, 1.5): 1 / sqrt(2);
    # g3 = (2, 3) vs (2, 0): 4 / (2 sqrt(13)).
    expected = [2.5 / math.sqrt(8.5), 1 / math.sqrt(2), 2 / math.sqrt(13)]
    assert gs.leave_one_out_cosines(G3).tolist() == pytest.approx(expected, rel=1e-12)


def test_leave_one_out_cosines_match_a_plain_loop():
    G = torch.randn(6, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert gs.leave_one_out_cosines(G).tolist() == pytest.approx(_loop_loo(G.tolist()), rel=1e-12)


def test_leave_one_out_cosine_of_a_zero_batch_is_undefined_and_skipped():
    G = torch.cat([G3, torch.zeros(1, 2, dtype=torch.float64)])
    loo = gs.leave_one_out_cosines(G)
    reference = _loop_loo(G.tolist())
    assert math.isnan(loo[3]) and math.isnan(reference[3])
    assert loo[:3].tolist() == pytest.approx(reference[:3], rel=1e-12)
    assert gs.gradient_stats(G).loo_cosine == pytest.approx(sum(reference[:3]) / 3, rel=1e-12)


def test_cosine_matrix_matches_pairwise_cosines():
    V = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    M = gs.cosine_matrix(V)
    for i in range(4):
        for j in range(4):
            assert float(M[i, j]) == pytest.approx(_loop_cosine(V[i].tolist(), V[j].tolist()), rel=1e-12)
            assert float(M[i, j]) == pytest.approx(gs.cosine(V[i], V[j]), rel=1e-12)
    # Hand-worked: (1, 0) and (1, 1) at 45 degrees, opposite vectors at -1.
    H = gs.cosine_matrix(torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]], dtype=torch.float64))
    r = 1 / math.sqrt(2)
    assert H.flatten().tolist() == pytest.approx([1, r, -1, r, 1, -r, -1, -r, 1], rel=1e-12)


def test_zero_vectors_have_no_cosine():
    zero, v = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    assert math.isnan(gs.cosine(zero, v))
    assert gs.cosine_matrix(torch.stack([zero, v])).isnan().tolist() == [[True, True], [True, False]]


def test_kept_fraction():
    keep = [torch.tensor([True, False, True, True]), torch.tensor([False, False])]
    assert gs.kept_fraction(keep) == pytest.approx(3 / 6)


def test_gradient_stats_hand_worked():
    st = gs.gradient_stats(G3)
    assert st.pooled_norm == pytest.approx(math.sqrt(5), rel=1e-12)
    assert st.batch_norm == pytest.approx((1 + 3 + math.sqrt(13)) / 3, rel=1e-12)
    assert st.snr == pytest.approx(math.sqrt(15) / 2, rel=1e-12)
    assert st.batch_snr == pytest.approx(math.sqrt(11 / 12), rel=1e-12)
    assert st.loo_cosine == pytest.approx((2.5 / math.sqrt(8.5) + 1 / math.sqrt(2) + 2 / math.sqrt(13)) / 3, rel=1e-12)
