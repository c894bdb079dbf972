"""One rank of the actnorm test (tests/test_likelihood.py): kept apart so spawned processes import little."""

import torch

from distgen.families.glow import Glow


def init_on_rank(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial weights on both ranks, as the trainer gives them
    net = Glow(1, 8, levels=2, steps=2, hidden=8)
    y = torch.rand(3 + rank, 1, 8, 8, generator=torch.Generator().manual_seed(10 + rank)) - 0.5  # different data
    net.data_init(y)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()
