"""Run with 2 processes (torch.distributed.run): a double backward through a network sharded by FSDP2
(tests/test_fsdp2.py). R1 on DCGAN's discriminator, sharded as the engine shards it (its blocks, then the root), its weights
held gathered through the phase (FSDP2.gathered, what Phase.twice asks for): twice, for the second step's all-gather
after the reshard; each time the gathered gradients equal the mean of the ranks' gradients of the whole network
(float32), and after it every parameter is a shard again. Prints "fsdp_twice: ok" on rank 0.
"""

import copy

import torch
import torch.distributed as td
from torch.distributed.tensor import DTensor

from distgen.config import load_config
from distgen.engines_fsdp import FSDP2, full
from distgen.families import DataInfo, build_family
from distgen.families.gan.losses import r1_penalty

td.init_process_group("gloo")
torch.manual_seed(0)
cfg = load_config(None, ["model.family=gan", "model.arch=dcgan", "model.preset=tiny", "data.resolution=16",
                         "model.r1_gamma=1"])
family = build_family(cfg.model, DataInfo(16, 1, 10))
assert [p.twice for p in family.phases() if p.name == "D_r1"] == [True]
D = family.build_networks()["D"]
whole = copy.deepcopy(D)
fsdp = FSDP2(torch.device("cpu"), "no")
blocks = family.shard_blocks("D", D)
assert blocks  # the engine's own sharding: blocks, then the root
fsdp.shard(D, blocks)


def r1(net, x):
    x = x.detach().requires_grad_(True)
    scores, _ = net(x)
    return (r1_penalty(scores, x) + scores.float() * 0).mean()  # "+ 0 x scores" as the family's loss


for step in range(2):
    torch.manual_seed(10 * step + td.get_rank())
    x = torch.randn(4, 1, 16, 16)
    whole.zero_grad(set_to_none=True)
    r1(whole, x).backward()
    with fsdp.gathered(D):
        r1(D, x).backward()
    assert all(isinstance(p, DTensor) for p in D.parameters())  # sharded again
    for (name, p), q in zip(D.named_parameters(), whole.parameters()):
        want = q.grad.clone()
        td.all_reduce(want)
        got = full(p.grad)
        assert torch.allclose(got, want / 2, rtol=1e-5, atol=1e-7), (step, name, float((got - want / 2).abs().max()))
        p.grad = None
if td.get_rank() == 0:
    print("fsdp_twice: ok", flush=True)
td.destroy_process_group()
