"""RunningMoments.update merges batch statistics exactly across 2 gloo processes."""

from __future__ import annotations

import json
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moss_rlhf.losses import RunningMoments

# Different sizes per rank, and very different means, so an average of means would be wrong.
SIZES = {0: [3, 50], 1: [17, 0]}  # rank 1's second batch is empty: it must still join the collectives
MEANS = {0: 10.0, 1: -4.0}


def _batches(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [MEANS[rank] + 3.0 * torch.randn(n, generator=g, dtype=torch.float64) for n in SIZES[rank]]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rm = RunningMoments()
        batch_stats = [rm.update(x) for x in _batches(rank)]
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"state": rm.state_dict(), "batch_stats": batch_stats}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_running_moments_all_reduce_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # every rank holds bit-identical moments
    assert results[0] == results[1]

    ref = RunningMoments()  # single process, one update per step with both ranks' batches
    flat: list[float] = []
    for step in range(2):
        step_batch = torch.cat([_batches(r)[step] for r in range(2)])
        ref.update(step_batch)
        flat += step_batch.tolist()
        bm, bs = results[0]["batch_stats"][step]
        n = len(step_batch)
        mu = sum(step_batch.tolist()) / n
        assert math.isclose(bm, mu, rel_tol=1e-12)
        assert math.isclose(bs, math.sqrt(sum((v - mu) ** 2 for v in step_batch.tolist()) / (n - 1)), rel_tol=1e-12)
    state = results[0]["state"]
    assert state["count"] == len(flat) == 70
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / (len(flat) - 1)
    assert math.isclose(state["mean"], mean, rel_tol=1e-12)
    assert math.isclose(state["m2"] / (state["count"] - 1), var, rel_tol=1e-12)
    for k in ("count", "mean", "m2"):
        assert math.isclose(state[k], ref.state_dict()[k], rel_tol=1e-12)
