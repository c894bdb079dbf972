"""Watch a real training run step by step (one process):

    step_probe.py CONFIG.yaml OUT.json NAN_STEPS [overrides...]

For every step it records whether the networks' weights, their EMAs and the optimizers' step counts
changed, and how many times the step read a tensor back to the host (``.item()``, ``.tolist()``,
``bool()``, ``float()``, ``int()`` of a tensor: each one a wait for the GPU on a GPU). At the steps listed
in NAN_STEPS (comma-separated, 1-based) every loss of the family is made NaN, as a diverging model's
would be. OUT gets the per-step records and train()'s return code.
"""

import json
import os
import sys

import torch

import distgen.train as T
from distgen.config import load_config
from distgen.errors import ERRORS

config, out, nan_steps, overrides = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
nan_steps = {int(s) for s in nan_steps.split(",") if s}
records = []
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
originals = {name: getattr(torch.Tensor, name) for name in READS}


class HostReads:
    """Counts tensor-to-host reads made inside the block, but those of torch.optim: a non-fused AdamW keeps
    its step counters on the CPU wherever the parameters are, so reading them waits for nothing."""

    def __enter__(self):
        self.count = 0
        for name, fn in originals.items():
            def counted(t, *a, _fn=fn, **k):
                if f"{os.sep}torch{os.sep}optim{os.sep}" not in sys._getframe(1).f_code.co_filename:
                    self.count += 1
                return _fn(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def snapshot(run):
    with torch.no_grad():
        weights = [p.detach().clone() for m in run.nets.values() for p in m.parameters()]
        emas = [s.clone() for e in run.emas.values() for ema in e.emas for s in ema.shadow_params]
        steps = [st["step"].clone() for t in run.trained.values() for st in t.opt.state.values() if "step" in st]
    return weights, emas, steps


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


step_fn = T.train_step


def probed_step(run, state, cursor, lr_mult):
    n = state.step + 1
    family_loss = run.family.loss
    if n in nan_steps:
        def nan_loss(*a, **k):
            per_sample, extras = family_loss(*a, **k)
            return per_sample * float("nan"), extras
        run.family.loss = nan_loss
    before = snapshot(run)
    with HostReads() as reads:
        step_fn(run, state, cursor, lr_mult)
    run.family.loss = family_loss
    after = snapshot(run)
    records.append({"step": n, "host_reads": reads.count, "weights_same": same(before[0], after[0]),
                    "ema_same": same(before[1], after[1]), "opt_steps_same": same(before[2], after[2]),
                    "finite_weights": all(bool(torch.isfinite(p).all()) for p in after[0])})


T.train_step = probed_step
try:
    rc = T.train(load_config(config, overrides))
except ERRORS as e:  # as the CLI reports them: the message, status 2
    print(f"distgen: error: {e}", file=sys.stderr)
    rc = 2
json.dump({"rc": rc, "steps": records}, open(out, "w"))
sys.exit(rc)
