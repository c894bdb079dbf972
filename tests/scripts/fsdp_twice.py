"""Run with 2 processes (torch.distributed.run): backward passes through networks sharded by FSDP2 that read the
weights outside the usual forward-then-backward (tests/test_fsdp2.py), each network sharded as the engine shards it
(the family's blocks, then the root) and held gathered through the phase where the phase says so (Phase.twice,
FSDP2.gathered), twice (the second step's all-gather after the reshard); each time the gathered gradient of every
parameter equals the mean of the ranks' gradients of the whole network, and after it every parameter is a shard
again. Prints "fsdp_twice: ok" on rank 0.

- R1 on DCGAN's discriminator (a double backward, its weights held gathered), in float32.
- FFJORD, one FSDP2 unit, in the engine's bf16 precision, where it gathers float32 weights and runs float32
  (autocast off) as the reference does; its weights perturbed (the last layers start at zero) and each rank's
  solves taking a different number of steps: Hutchinson's double backward through the solve, and with
  model.adjoint odeint_adjoint's backward solve, which evaluates the dynamics again and returns the weights'
  gradients from its autograd Function.
"""

import contextlib
import copy

import torch
import torch.distributed as td
from torch.distributed.tensor import DTensor

from distgen.config import load_config
from distgen.engines_fsdp import FSDP2, full
from distgen.families import DataInfo, build_family
from distgen.families.base import PhaseNets, StepContext
from distgen.families.gan.losses import r1_penalty

td.init_process_group("gloo")


def check(family, name, phase, loss, draw, precision, perturb=0.0):
    """The gradients of ``loss(net, draw())`` through the sharded network against the whole one's, two steps."""
    torch.manual_seed(0)
    (twice,) = [p.twice for p in family.phases() if p.name == phase]
    net = family.build_networks()[name]
    if perturb:  # every weight off its initial value (FFJORD's last layers start at zero: no gradient before them)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(perturb * torch.randn_like(p))
    whole = copy.deepcopy(net)
    fsdp = FSDP2(torch.device("cpu"), precision)
    fsdp.shard(net, family.shard_blocks(name, net))
    for step in range(2):
        torch.manual_seed(10 * step + td.get_rank())
        x = draw()
        whole.zero_grad(set_to_none=True)
        with fsdp.autocast():  # what the engine runs the reference's loss in too (DDP's autocast)
            ref = loss(whole, x)
        ref.backward()
        with fsdp.gathered(net) if twice else contextlib.nullcontext():
            with fsdp.autocast():
                got_loss = loss(net, x)
            got_loss.backward()
        assert all(isinstance(p, DTensor) for p in net.parameters())  # sharded again
        for (n, p), q in zip(net.named_parameters(), whole.parameters()):
            want = q.grad.clone()
            td.all_reduce(want)
            want /= 2
            got = full(p.grad)
            # the same float32 operations as the reference, then (a + b) / 2 both ways: equal up to a few ulps of the
            # largest element; a gradient lost or counted twice on a rank is off by half of it or more
            scale = float(want.abs().max())
            assert scale > 0 or not perturb, (name, step, n)  # perturbed: every parameter has a gradient to compare
            assert float((got - want).abs().max()) <= 1e-6 * scale, \
                (name, step, n, float(got.norm()), float(want.norm()), float((got - want).abs().max()))
            p.grad = None


def r1(net, x):
    x = x.detach().requires_grad_(True)
    scores, _ = net(x)
    return (r1_penalty(scores, x) + scores.float() * 0).mean()  # "+ 0 x scores" as the family's loss


gan = build_family(load_config(None, ["model.family=gan", "model.arch=dcgan", "model.preset=tiny",
                                      "data.resolution=16", "model.r1_gamma=1"]).model, DataInfo(16, 1, 10))
assert [p.twice for p in gan.phases() if p.name == "D_r1"] == [True]
D = gan.build_networks()["D"]
assert gan.shard_blocks("D", D)  # the engine's own sharding: blocks, then the root
check(gan, "D", "D_r1", r1, lambda: torch.randn(4, 1, 16, 16), "no")

for adjoint in (False, True):  # Hutchinson's double backward through the solve; odeint_adjoint's backward solve
    ffjord = build_family(load_config(None, ["model.family=ffjord", "model.preset=tiny", "data.resolution=8",
                                             f"model.adjoint={adjoint}", "model.rtol=0.001", "model.atol=0.001",
                                             "model.kinetic_energy=0.01", "model.jacobian_norm=0.01"]).model,
                          DataInfo(8, 1, 0))
    calls = []

    def nll(net, x, ffjord=ffjord, calls=calls):
        g = torch.Generator().manual_seed(5)
        per_sample, _ = ffjord.loss(StepContext("nll"), PhaseNets({"ffjord": net}, {"ffjord": net}), {"image": x}, g)
        calls.append((net, net.last_nfe))
        return per_sample.float().mean()

    check(ffjord, "ffjord", "nll", nll, lambda: torch.rand(4, 1, 8, 8) * 2 - 1, "bf16", perturb=0.5)
    sharded = calls[1::2]  # each step: the whole network's call, then the sharded one's
    ranks = [None, None]
    td.all_gather_object(ranks, [nfe for _, nfe in sharded])
    # the ranks' solves took different numbers of steps (a CNF block sharded as a unit went out of step there)
    assert ranks[0] != ranks[1], ranks
    net, forward = sharded[-1]
    if adjoint:  # the backward solve evaluated the dynamics too (counted since the forward began)
        assert sum(c.nfe for c in net.cnfs) > forward
if td.get_rank() == 0:
    print("fsdp_twice: ok", flush=True)
td.destroy_process_group()
