"""Chunked nearest-code search: same codes as the direct path, bounded extra memory."""

import subprocess
import sys
import textwrap

import pytest
import torch

from vqcore.ops import nearest_code, nearest_feature_per_code, squared_distances


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunked_equals_direct(metric):
    torch.manual_seed(0)
    x, e = torch.randn(1000, 16), torch.randn(64, 16)
    # a budget of 3 rows per chunk forces many uneven chunks
    codes, dist = nearest_code(x, e, metric, budget_elements=3 * 64)
    if metric == "cosine":
        x, e = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(e, dim=1)
    direct = squared_distances(x, e)
    assert torch.equal(codes, direct.argmin(1))
    expected = direct.min(1).values / (2 if metric == "cosine" else 1)
    torch.testing.assert_close(dist, expected, atol=1e-4, rtol=1e-4)


def test_nearest_feature_per_code_matches_brute_force():
    torch.manual_seed(1)
    x, e = torch.randn(500, 8), torch.randn(32, 8)
    got = nearest_feature_per_code(x, e, budget_elements=7 * 32)
    assert torch.equal(got, x[squared_distances(x, e).argmin(0)])


@pytest.mark.slow
def test_large_search_stays_under_one_gib_extra():
    """N = 65,536, K = 8,192, D = 256: the full distance matrix alone would be 2 GiB."""
    script = textwrap.dedent(
        """
        import resource, torch
        from vqcore.ops import nearest_code
        torch.manual_seed(0)
        x = torch.randn(65536, 256); e = torch.randn(8192, 256)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        codes, _ = nearest_code(x, e)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024, int(codes.max()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    extra_bytes, max_code = map(int, out.stdout.split())
    print(f"extra peak RSS: {extra_bytes / 2**20:.0f} MiB")
    assert extra_bytes < 1 << 30, f"extra peak {extra_bytes / 2**20:.0f} MiB"
    assert 0 <= max_code < 8192
