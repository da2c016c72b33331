"""Peak extra memory of the graph build, from a reset high-water mark (see benchmarks/bench_core.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def peak_n2(what, n, d):
    from benchmarks.bench_core import MEASURE_ENV

    cmd = [sys.executable, "-m", "benchmarks.bench_core", "--inner", what, "--n", str(n), "--d", str(d), "--repeats", "1", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=MEASURE_ENV, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_n2"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_graph_peak_memory_in_the_core_and_through_the_node():
    # N x N float32 buffers beyond the inputs: W_attn plus chunk temporaries in the core; the
    # node's layer mean on top (2 layers averaged without a [G, N, N] copy)
    assert peak_n2("graph_ours", 4096, 64) <= 1.7
    assert peak_n2("graph_node", 4096, 64) <= 2.3


def test_live_tensor_peak_counts_new_storage_only():
    """benchmarks/live_memory.py: new outputs count until freed; inputs, views and in-place results never."""
    import torch

    from benchmarks.live_memory import LiveTensorPeak

    n = 256
    a = torch.randn(n, n)
    with LiveTensorPeak() as live:
        x = torch.empty(n, n)
        y = x + 1
        del x
        z = y * 2
        del y, z
        view, _, t = a[:10], a.add_(1), a.t()
    assert live.peak == 2 * 4 * n * n and live.live == 0
