"""Run with 2 processes (torch.distributed.run): FSDP2's pieces on their own (tests/test_fsdp2.py).

A network sharded by distgen.engines_fsdp.FSDP2 and an EMA of it kept as shards: each rank holds only part of every
EMA, an update moves the shards as a whole-tensor update moves the whole tensors, gathered_emas gives back the whole
tensors (and the shards after), and EDM2's projection applied to each rank's rows equals the projection of the whole
weight. Prints "fsdp_shards: ok" on rank 0.
"""

import copy

import torch
import torch.distributed as td
from torch import nn

from distgen.ema import EMASet, gathered_emas
from distgen.engines_fsdp import FSDP2, ShardLayout, local, project_local
from distgen.families.backbones.edm2 import normalize

td.init_process_group("gloo")
torch.manual_seed(0)
net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 6, 3), nn.SiLU()), nn.Linear(5, 3), nn.Conv2d(6, 1, 1))
whole = copy.deepcopy(net)
emas = {"n": EMASet(net, halflives_kimg=[0.01], rampup=None)}
reference = EMASet(whole, halflives_kimg=[0.01], rampup=None)  # the same EMA kept whole
FSDP2(torch.device("cpu"), "bf16").shard(net, [net[0]])
emas["n"].shard(ShardLayout(list(net.parameters())))

held = sum(s.numel() for s in emas["n"].emas[0].shadow_params)
total = sum(p.numel() for p in whole.parameters())
assert 0 < held < total, (held, total)  # a shard of every EMA, not a copy of the network
# ... and the module to sample from holds no parameter storage until the EMAs are gathered
assert sum(p.numel() for p in emas["n"].module.parameters()) == 0

with torch.no_grad():  # move the network, then the EMAs, both ways
    for p, q in zip(net.parameters(), whole.parameters()):
        local(p).add_(1.0)
        q.add_(1.0)
emas["n"].update(list(net.parameters()), 1000, 8)
reference.update(list(whole.parameters()), 1000, 8)
with gathered_emas(emas):
    got = list(emas["n"].emas[0].shadow_params)
    state, _ = emas["n"].state()
    sampled = emas["n"].materialize(0)  # whole again, holding the gathered EMA
    assert all(torch.equal(a, b) for a, b in zip(sampled.parameters(), reference.emas[0].shadow_params))
assert [t.shape for t in got] == [p.shape for p in whole.parameters()]
assert all(torch.equal(a, b) for a, b in zip(got, reference.emas[0].shadow_params))
assert set(state[0]) == set(whole.state_dict())
assert sum(s.numel() for s in emas["n"].emas[0].shadow_params) == held  # shards again after
assert sum(p.numel() for p in emas["n"].module.parameters()) == 0

conv = net[2].weight  # 1 output row over 2 ranks: one rank holds it, the other none
for p, q in ((net[0][0].weight, whole[0][0].weight), (net[1].weight, whole[1].weight), (conv, whole[2].weight)):
    project_local([(p, normalize)])
    with torch.no_grad():
        q.copy_(normalize(q))
    assert torch.equal(p.full_tensor(), q), "the projection of the shards is not the shard of the projection"
if td.get_rank() == 0:
    print("fsdp_shards: ok", held, total, flush=True)
td.destroy_process_group()
