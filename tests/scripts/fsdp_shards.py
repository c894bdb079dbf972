"""Run with 2 processes (torch.distributed.run): FSDP2's pieces on their own (tests/test_fsdp2.py).

A network sharded by distgen.engines_fsdp.FSDP2 and an EMA of it kept as shards: each rank holds only part of every
EMA, an update moves the shards as a whole-tensor update moves the whole tensors, gathered_emas gives back the whole
tensors (and the shards after), and EDM2's projection applied to each rank's rows equals the projection of the whole
weight. Under fp16, an overflow on one rank skips the update on both (ShardedGradScaler's inf check is all-reduced),
is counted and halves the scale; a finite step then updates. fully_shard still refuses a channels_last weight (why
train.channels_last is refused). Prints "fsdp_shards: ok" on rank 0.
"""

import copy
from types import SimpleNamespace

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

# fp16: the loss scaled, the shards unscaled before the clip, an overflow on rank 1 alone skipped on both ranks
class Tally:
    def __init__(self):
        self.counts = {}

    def count(self, name, flag):
        self.counts[name] = self.counts.get(name, 0) + int(flag)


half = FSDP2(torch.device("cpu"), "fp16")
small = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 2))
half.shard(small, [small[0]])
t = SimpleNamespace(raw=small, opt=torch.optim.AdamW(small.parameters(), lr=1e-2), projections=[])
tc, tally = SimpleNamespace(grad_clip=1.0, skip_grad_norm=0), Tally()
for step, overflow in ((1, True), (2, False)):
    before = [p.full_tensor().clone() for p in small.parameters()]
    with half.autocast():
        loss = small(torch.randn(3, 4)).float().square().mean()
    if overflow and td.get_rank() == 1:
        loss = loss * float("inf")
    half.scale(loss).backward()
    bad, _ = half.step(t, torch.zeros((), dtype=torch.bool), tc, tally)
    moved = any(not torch.equal(a, p.full_tensor()) for a, p in zip(before, small.parameters()))
    assert moved != overflow and not bool(bad), (step, moved, bool(bad))
    assert tally.counts.get("overflow_total", 0) == 1, tally.counts
    assert half.scaler.get_scale() == 2.0 ** 15, half.scaler.get_scale()  # 2**16 halved once, not grown yet
# Why train.channels_last stays refused under FSDP2 (engines_fsdp.config_problem): fully_shard takes no channels_last
# weight. If a torch release takes one, this fails, and the refusal should be measured again.
try:
    FSDP2(torch.device("cpu"), "no").shard(nn.Conv2d(4, 4, 3).to(memory_format=torch.channels_last), [])
    raise AssertionError("fully_shard took a channels_last weight: try train.channels_last under FSDP2 again")
except NotImplementedError as e:
    assert "non-contiguous parameters" in str(e), e

if td.get_rank() == 0:
    print("fsdp_shards: ok", held, total, flush=True)
td.destroy_process_group()
