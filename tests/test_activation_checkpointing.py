"""train.activation_checkpointing: every phase's loss and every parameter's gradient as without it (the same ops,
recomputed; random draws inside a block replayed: dropout from the global RNG, StyleGAN2's and the hierarchical
VAE's from explicit generators), with fewer activations saved for the backward; the refusals; the config's form.
Exact resume with it on is test_resume's (tests/matrix.py VARIANTS: hvae-stabilised)."""

from __future__ import annotations

import copy

import pytest
import torch

from distgen.config import ConfigError, build_config, load_config
from distgen.errors import TrainingError
from distgen.families import DataInfo, PhaseNets, StepContext, build_family
from distgen.families.backbones.edm2 import Block
from distgen.families.checkpointing import is_checkpointed
from distgen.speed import resolve
from matrix import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")


def _family(name: str, over: dict | None = None, classes: int = 0):
    model, res = MODELS[name]
    cfg = build_config({"model": {**model, **(over or {})}, "data": {"resolution": res, "channels": 1}})
    return build_family(cfg.model, DataInfo(res, 1, classes)), res


def _phase_run(family, nets: dict, phase, batch: dict, seed: int):
    """One phase's loss and backward as the loop runs it (the trained network alone takes gradients; the noise
    and the global RNG seeded per phase): the loss, each parameter's gradient, the activations saved."""
    for n, m in nets.items():
        m.train().requires_grad_(n == phase.network)
        m.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    noise = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = family.loss(StepContext(phase.name, 0, 0, 0), PhaseNets(nets, nets), batch, noise)[0].float().mean()
    loss.backward()
    grads = {f"{n}.{k}": p.grad for n, m in nets.items() for k, p in m.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved[0]


# (matrix entry, model overrides, classes): a diffusers U-Net, DiT (class-conditional), EDM2's U-Net (with
# dropout, put in below), StyleGAN2 (G and D; R1's and path length's double backwards), BigGAN (batch and spectral
# norms), the hierarchical VAE (its latent groups draw from the loss's generator), CycleGAN's ResNet generator
CASES = [("diffusion", None, 0), ("diffusion-flow", None, 10), ("diffusion-edm", None, 0),
         ("gan-stylegan2", {"pl_weight": 2.0, "pl_every": 1, "r1_every": 1}, 0), ("gan-biggan", None, 0),
         ("hvae", None, 0), ("cyclegan", None, 0)]


@pytest.mark.parametrize("name,over,classes", CASES, ids=[c[0] for c in CASES])
def test_the_same_losses_and_gradients_with_fewer_activations_saved(name, over, classes):
    family, res = _family(name, over, classes)
    torch.manual_seed(0)
    plain = family.build_networks()
    if name == "diffusion-edm":  # randomness inside the checkpointed blocks: replayed from the RNG's saved state
        for b in plain["unet"].modules():
            if isinstance(b, Block):
                b.dropout = 0.5
    with torch.no_grad():  # zero-initialised outputs (EDM2's gains, DiT's adaLN-Zero) would zero the blocks' gradients
        for p in (p for m in plain.values() for p in m.parameters() if not p.any()):
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    ckpt = copy.deepcopy(plain)
    trained = list(dict.fromkeys(p.network for p in family.phases()))
    done = {n: family.checkpoint_activations(n, ckpt[n]) for n in trained}
    assert any(w is None for w in done.values()), done
    assert list(plain["G" if "G" in plain else trained[0]].state_dict()) == \
        list(ckpt["G" if "G" in ckpt else trained[0]].state_dict())  # the switch leaves the names as they were
    g = torch.Generator().manual_seed(3)
    image = torch.rand(4, 1, res, res, generator=g) * 2 - 1
    batch = ({"a": image, "b": image.flip(-1)} if family.data_layout != "images" else
             {"image": image, **({"label": torch.arange(4) % classes} if classes else {})})
    for i, phase in enumerate(family.phases()):
        # family state that a loss moves (StyleGAN2's path-length mean, CycleGAN's image histories): both runs
        # start from the same
        state, ranks = copy.deepcopy(family.state_dict()), copy.deepcopy(family.rank_state())
        la, ga, sa = _phase_run(family, plain, phase, batch, 10 * i)
        after = family.state_dict()
        family.load_state_dict(copy.deepcopy(state))
        family.load_rank_state(ranks)
        lb, gb, sb = _phase_run(family, ckpt, phase, batch, 10 * i)
        assert family.state_dict() == after, phase.name
        assert torch.equal(la, lb) or torch.allclose(la, lb, rtol=1e-6, atol=1e-7), (phase.name, la, lb)
        assert ga.keys() == gb.keys() and ga, phase.name
        bad = [k for k in ga if not torch.allclose(ga[k], gb[k], rtol=1e-5, atol=1e-6)]
        assert not bad, (phase.name, bad[:5])
        if done[phase.network] is None:
            assert sb < sa, (phase.name, sb, sa)  # activations inside the blocks were not kept
    # state the forward updates (BatchNorm's statistics, spectral norms' vectors) as without checkpointing
    for n in plain:
        for (k, a), b in zip(plain[n].named_buffers(), ckpt[n].buffers()):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (n, k)


def test_true_checkpoints_what_it_can_and_a_family_that_cannot_is_refused(tmp_path):
    cfg = load_config(None, ["model.family=autoencoder", "model.preset=tiny", "model.disc_weight=0.1",
                             "train.activation_checkpointing=true", "data.resolution=16"])
    family = build_family(cfg.model, DataInfo(16, 1))
    fast = resolve(cfg.train, torch.device("cpu"), family, ["ae", "disc"], deepspeed=False)
    nets = family.build_networks()
    fast.checkpoint_activations(family, nets)
    assert fast.checkpointed == ["ae"] and "disc" in fast.not_checkpointed
    assert "activation checkpointing ae; not checkpointed: disc (PatchDiscriminator" in fast.describe()
    assert nets["ae"].ae.encoder.gradient_checkpointing  # diffusers' own
    # by name, a network that cannot is refused; so is a name the model does not train
    named = load_config(None, ["model.family=autoencoder", "model.disc_weight=0.1",
                               "train.activation_checkpointing=[ae, disc]"])
    fast = resolve(named.train, torch.device("cpu"), family, ["ae", "disc"], deepspeed=False)
    with pytest.raises(TrainingError, match=r"^train\.activation_checkpointing: .*disc: PatchDiscriminator has no "
                                            r"blocks.*name only ae"):
        fast.checkpoint_activations(family, family.build_networks())
    with pytest.raises(TrainingError, match=r"^train\.activation_checkpointing: G is not a network this autoencoder "
                                            r"model trains; it trains ae, disc"):
        resolve(build_config({"train": {"activation_checkpointing": ["G"]}}).train, torch.device("cpu"), family,
                ["ae", "disc"], deepspeed=False)
    # a family none of whose networks can: refused at start, naming the field and the reason
    pixel, _ = _family("pixelcnn")
    fast = resolve(cfg.train, torch.device("cpu"), pixel, ["pixelcnn"], deepspeed=False)
    with pytest.raises(TrainingError, match=r"^train\.activation_checkpointing: the pixelcnn family cannot "
                                            r"checkpoint the activations of pixelcnn: .*no blocks.*set it false$"):
        fast.checkpoint_activations(pixel, pixel.build_networks())
    dcgan, _ = _family("gan-dcgan")
    assert dcgan.checkpoint_activations("G", dcgan.build_networks()["G"]).startswith("the dcgan arch's G is a few")
    off = resolve(build_config({}).train, torch.device("cpu"), pixel, ["pixelcnn"], deepspeed=False)
    off.checkpoint_activations(pixel, nets := pixel.build_networks())
    assert "activation" not in off.describe() and not any(is_checkpointed(m) for m in nets["pixelcnn"].modules())


def test_the_config_form():
    assert load_config(None, ["train.activation_checkpointing=[G]"]).train.activation_checkpointing == ("G",)
    assert load_config(None, ["train.activation_checkpointing=G"]).train.activation_checkpointing == ("G",)
    assert load_config(None, ["train.activation_checkpointing=true"]).train.activation_checkpointing is True
    assert build_config({}).train.activation_checkpointing is False
    for bad, why in (([], "non-empty list"), (["G", "G"], "twice"), ([" "], "non-empty list"), (3, "is not a")):
        with pytest.raises(ConfigError, match=rf"^train\.activation_checkpointing: .*{why}"):
            build_config({"train": {"activation_checkpointing": bad}})
