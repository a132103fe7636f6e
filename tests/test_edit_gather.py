"""gather_to_main (edit predict's gather): the main process gets every process's rows in rank order, the others
nothing (gloo, 2 processes on CPU)."""

import json

import torch
import torch.multiprocessing as mp
from llamafactory_vision.distributed import gather_to_main


def _gather(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        got = gather_to_main([{"index": i, "png": bytes([i]).hex()} for i in range(rank, 5, world)], world)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(got, f)
    finally:
        torch.distributed.destroy_process_group()


def test_rows_reach_the_main_process_only(tmp_path):
    out = str(tmp_path / "rank")
    mp.spawn(_gather, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2)
    rank_order = [0, 2, 4, 1, 3]  # rank 0's rows, then rank 1's
    assert json.loads((tmp_path / "rank.0").read_text()) == [{"index": i, "png": bytes([i]).hex()} for i in rank_order]
    assert json.loads((tmp_path / "rank.1").read_text()) is None


def test_one_process_keeps_its_rows():
    rows = [{"index": 2}, {"index": 0}]
    assert gather_to_main(rows, 1) == rows
