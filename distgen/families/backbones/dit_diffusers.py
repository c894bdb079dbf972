"""The DiT backbone's exports: diffusers' ``DiTTransformer2DModel`` folders, and ``DiTPipeline``'s folder.

distgen's :class:`~distgen.families.backbones.dit.DiT` is diffusers' ``DiTTransformer2DModel`` with one
conditioning embedder shared by every block, no label dropout inside, the null class at index ``num_classes``,
no learned sigma and, unconditional, one class that is always 0. :func:`to_diffusers_transformer` writes it as a
plain ``DiTTransformer2DModel`` (every block with its own copy of the shared embedder, which is what diffusers'
model holds), :func:`from_diffusers_transformer` / :func:`load_dit_transformer` read it back (resharing the
embedder, refusing copies that differ).

**DiTPipeline's conventions** (diffusers 0.42, ``pipelines/dit/pipeline_dit.py``), and what the export does
about each:

- The null class of classifier-free guidance is hard-coded, ``class_null = [1000] * batch_size``: with
  ``imagenet_layout=True`` the class table has 1001 rows, our classes 0..K-1 in rows 0..K-1 and our null row at
  row 1000. Rows K..999 hold *copies of the null row*: a label the model was not trained on samples the model's
  unconditional distribution (as if its label had been dropped) rather than an untrained embedding, and
  ``class_labels=[1000] * n`` (or any label >= K) with ``guidance_scale=1`` is distgen's ``guidance=0``.
  ``id2label`` in ``model_index.json`` names our K classes only (``pipe.labels``, ``pipe.get_label_ids``).
- Guidance only when ``guidance_scale > 1``: the batch is doubled as [cond, null] (distgen's order),
  uncond + g (cond - uncond) on the first ``in_channels`` output channels (all of ours). For ``guidance_scale
  <= 1`` it runs the conditional pass alone: equal to distgen at g = 1, but for 0 <= g < 1 distgen computes
  uncond + g (cond - uncond) and DiTPipeline ignores g. That is in DiTPipeline's code, not in the weights: no
  export can make it reproduce distgen there (g = 0 has the null-label route above; 0 < g < 1 has none).
- Learned sigma: split off when ``out_channels // 2 == in_channels``; ours has ``out_channels == in_channels``
  (C // 2 != C for C >= 1), so the whole output is the prediction, guided whole.
- Its latents are ``randn_tensor((B, in_channels, s, s), generator, dtype=transformer.dtype)``, not scaled by
  ``scheduler.init_noise_sigma`` (1 for DDIM and DPM-Solver, the schedulers this export writes; not for
  Euler-type ones), and ``scheduler.step`` gets no generator (DDPM's stochastic steps are unseeded there).
  distgen's ``Diffusion.sample`` draws the same ``randn_tensor`` from the same generator list.
- The timestep goes to the transformer as the scheduler gives it (the integer training timestep): distgen's
  DDPM ``noise_cond`` is the same.
- Output: ``vae.decode(1 / scaling_factor * latents)`` then ``(x / 2 + 0.5).clamp(0, 1)``; distgen's is
  ``decode(x / scaling_factor).clamp(-1, 1)`` on [-1, 1]: ``(distgen + 1) / 2`` is DiTPipeline's
  (``output_type="pt"``; NHWC for "np"), equal to float rounding (the two ways of dividing: ~1e-6).
- ``guidance_scale`` defaults to 4.0 there (distgen: ``model.guidance_scale``); pass it. diffusers logs
  "Expected types for id2label ... got Dict[str, str]" on loading (JSON keys are strings; the hub's DiT too).

Everything read back is untrusted: the config is checked (types, bounds, the fixed architecture fields of our
DiT) and the weight shapes against it before any module is built for real; weights are read with safetensors.

Calls from the diffusion family (``Diffusion.export`` / ``load_export``), with ``dit = backbone(nets["unet"])``:

- latent diffusion, ``formulation: ddpm``, class-conditional: ``write_dit_pipeline(out_dir, dit, nets["ae"],
  self.scheduler, sampler=self.cfg.default_sampler)`` writes transformer/, vae/, scheduler/, model_index.json;
- every other DiT: ``save_dit_transformer(Path(out_dir) / "transformer", dit)`` (latent diffusion adds vae/);
- reading either back: ``load_dit_transformer(Path(out_dir) / "transformer", self.num_classes)`` (the table's
  size tells the two layouts apart).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from distgen import readback as rb
from distgen.errors import SampleError
from distgen.families.backbones.dit import DiT

IMAGENET_NULL = 1000  # DiTPipeline: class_null = torch.tensor([1000] * batch_size)
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name for a model folder's safetensors weights
_EMB = "norm1.emb."  # inside transformer_blocks.<i>.: the conditioning embedder (timestep MLP, class table)
_TABLE = "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"

# What our DiT builds and diffusers' config records: fields DiT leaves at diffusers' defaults. A folder with
# other values is a different network (its forward differs), so it is refused rather than approximated.
FIXED = {"dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "activation_fn": "gelu-approximate",
         "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
         "norm_eps": 1e-5}
_CONFIG = rb.Obj({
    "_class_name": rb.Str(choices=("DiTTransformer2DModel",)), "_diffusers_version": rb.Str(max_len=64),
    "num_attention_heads": rb.Int(1, 1024), "attention_head_dim": rb.Int(1, 1024),
    "in_channels": rb.Int(1, 256), "out_channels": rb.Opt(rb.Int(1, 512)), "num_layers": rb.Int(1, 1024),
    "sample_size": rb.Int(1, rb.MAX_RESOLUTION), "patch_size": rb.Int(1, 64),
    "num_embeds_ada_norm": rb.Int(1, rb.MAX_CLASSES),
    "dropout": rb.Num(0, 1), "norm_num_groups": rb.Int(1, 1024), "attention_bias": rb.Bool(),
    "activation_fn": rb.Str(max_len=64), "upcast_attention": rb.Bool(), "norm_type": rb.Str(max_len=64),
    "norm_elementwise_affine": rb.Bool(), "norm_eps": rb.Num(0, 1)},
    optional=("_class_name", "_diffusers_version", "out_channels", *FIXED))
_MAX_HIDDEN = 16384  # DiT-XL is 1152 wide; bounds what a crafted config can make distgen allocate


def _transformer_config(dit: DiT, table_classes: int) -> dict:
    """The DiTTransformer2DModel arguments of ``dit`` with a class table for ``table_classes`` (+1 null row)."""
    c = dit.config
    return dict(num_attention_heads=c["num_heads"], attention_head_dim=c["hidden_size"] // c["num_heads"],
                in_channels=c["channels"], out_channels=c["channels"], num_layers=c["depth"],
                sample_size=c["resolution"], patch_size=c["patch_size"], num_embeds_ada_norm=table_classes)


def to_diffusers_transformer(dit: DiT, *, imagenet_layout: bool):
    """A plain diffusers ``DiTTransformer2DModel`` (eval mode) that computes what ``dit`` computes: every block
    holds its own copy of ``dit``'s shared embedder. Called with diffusers' convention,
    ``model(x, timestep, class_labels).sample``, labels always given (unconditional: 0).

    ``imagenet_layout``: DiTPipeline's class table (1001 rows, the null class at row 1000, rows K..999 copies of
    the null row; see the module's docstring), for a class-conditional DiT of at most 1000 classes. Without it
    the table is ``dit``'s own (null class at index K, or, unconditional, class 0 and an unused row)."""
    from diffusers import DiTTransformer2DModel

    k = dit.num_classes
    if imagenet_layout and not 1 <= k <= IMAGENET_NULL:
        raise ValueError(f"imagenet_layout: DiTPipeline's null class is index {IMAGENET_NULL}, so it takes a "
                         f"class-conditional DiT of 1 to {IMAGENET_NULL} classes; this one has {k}"
                         + (" (unconditional: export it without imagenet_layout)" if not k else ""))
    state = dict(dit.dit.state_dict())  # diffusers' keys, every block's (shared) embedder included
    if imagenet_layout:
        table = state[_TABLE]  # [K + 1, D]: classes, then the null row
        null = table[k:k + 1].expand(IMAGENET_NULL + 1 - k, -1)
        wide = torch.cat([table[:k], null]).contiguous()
        for key in [key for key in state if key.endswith("class_embedder.embedding_table.weight")]:
            state[key] = wide
    # built for real, not on the meta device: the sin-cos position table is a non-persistent buffer that no
    # state dict carries
    model = DiTTransformer2DModel(**_transformer_config(dit, IMAGENET_NULL if imagenet_layout else max(k, 1)))
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def _check_config(cfg: dict, where) -> dict:
    """The config's values (types, bounds, our DiT's fixed fields), or a SampleError naming ``where``."""
    # diffusers' other bookkeeping keys (_name_or_path, _use_default_values) describe no part of the network
    cfg = _CONFIG.check({k: v for k, v in cfg.items() if not k.startswith("_") or k in _CONFIG.fields},
                        rb.Where(where), SampleError)
    for k, want in FIXED.items():
        if k in cfg and cfg[k] != want:
            raise SampleError(f"{where}: {k} is {cfg[k]!r}; distgen's DiT is built with {want!r} (another network)")
    c = cfg["in_channels"]
    if cfg.get("out_channels") not in (None, c):
        raise SampleError(f"{where}: out_channels {cfg['out_channels']} != in_channels {c}: distgen's DiT predicts "
                          f"no sigma (a learned-sigma DiT, 2x the channels, does not load into it)")
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if hidden > _MAX_HIDDEN:
        raise SampleError(f"{where}: {hidden} hidden channels (num_attention_heads x attention_head_dim), more "
                          f"than {_MAX_HIDDEN}")
    if cfg["sample_size"] % cfg["patch_size"]:
        raise SampleError(f"{where}: sample_size {cfg['sample_size']} is not a multiple of patch_size "
                          f"{cfg['patch_size']}")
    return cfg


def _layout(table_classes: int, num_classes: int, where) -> bool:
    """Whether a table for ``table_classes`` classes is DiTPipeline's layout of a ``num_classes``-class DiT
    (False: the DiT's own; K = 1000 is both, identically)."""
    if table_classes == max(num_classes, 1):
        return False
    if table_classes == IMAGENET_NULL and 1 <= num_classes < IMAGENET_NULL:
        return True
    raise SampleError(f"{where}: its class table is for {table_classes} classes; the model has {num_classes} "
                      f"({'unconditional: 1' if not num_classes else f'{num_classes}, or {IMAGENET_NULL} in DiTPipeline layout'} expected)")


def _to_dit(cfg: dict, state: dict, num_classes: int, where) -> DiT:
    """Our DiT from a checked diffusers config and its state dict: the blocks' embedder copies must be equal
    (one shared embedder), an ImageNet-layout table folded back to K + 1 rows."""
    depth = cfg["num_layers"]
    imagenet = _layout(cfg["num_embeds_ada_norm"], num_classes, where)
    for i in range(1, depth):
        for key in [key for key in state if key.startswith(f"transformer_blocks.0.{_EMB}")]:
            other = key.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1)
            if not torch.equal(state[other], state[key]):
                raise SampleError(f"{where}: block {i}'s conditioning embedder differs from block 0's ({other}): "
                                  f"distgen's DiT shares one embedder across blocks, so this network is not one "
                                  f"it can load (was it trained outside distgen, or edited?)")
    state = {k: v for k, v in state.items() if not (k.startswith("transformer_blocks.") and f".{_EMB}" in k
                                                     and not k.startswith(f"transformer_blocks.0.{_EMB}"))}
    if imagenet:
        table, k = state[_TABLE], num_classes
        if not torch.equal(table[k:IMAGENET_NULL], table[IMAGENET_NULL:].expand(IMAGENET_NULL - k, -1)):
            raise SampleError(f"{where}: rows {k}..{IMAGENET_NULL - 1} of the class table (classes the {k}-class model "
                              f"was not trained on) must be copies of the null row {IMAGENET_NULL}, as distgen "
                              f"writes them; they are not")
        state[_TABLE] = torch.cat([table[:k], table[IMAGENET_NULL:]])
    net = DiT(cfg["in_channels"], cfg["sample_size"], num_classes, patch_size=cfg["patch_size"],
              hidden_size=cfg["num_attention_heads"] * cfg["attention_head_dim"], depth=depth,
              num_heads=cfg["num_attention_heads"])
    net.load_state_dict({f"dit.{k}": v for k, v in state.items()}, strict=True)  # fills the other blocks' names
    return net.eval()


def from_diffusers_transformer(model, num_classes: int, *, where: str = "the DiTTransformer2DModel") -> DiT:
    """Our DiT (eval mode) from a diffusers ``DiTTransformer2DModel`` that :func:`to_diffusers_transformer` made
    (either layout, told apart by the table's size) for a ``num_classes``-class model. A SampleError naming
    ``where`` if it is not one: another architecture, a table of another size, embedder copies that differ."""
    from diffusers import DiTTransformer2DModel

    if not isinstance(model, DiTTransformer2DModel):
        raise SampleError(f"{where}: a {type(model).__name__}, not a DiTTransformer2DModel")
    cfg = _check_config(dict(model.config), where)
    want = _expected_shapes(cfg)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    _check_shapes(want, got, where)
    return _to_dit(cfg, {k: v.detach() for k, v in model.state_dict().items()}, num_classes, where)


def _expected_shapes(cfg: dict) -> dict:
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):  # no memory: the shapes a checked config describes
        model = DiTTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(want: dict, got: dict, where) -> None:
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise SampleError(f"{where}: its tensors do not fit the network its config.json describes ({len(diff)} "
                          f"differ, e.g. {diff[0]}: {got.get(diff[0])} stored, {want.get(diff[0])} described)")


def save_dit_transformer(folder: Union[str, Path], dit: DiT, *, imagenet_layout: bool = False) -> None:
    """A diffusers ``DiTTransformer2DModel`` folder of ``dit`` (config.json, safetensors): diffusers'
    ``DiTTransformer2DModel.from_pretrained(folder)`` loads it, :func:`load_dit_transformer` reads it back."""
    to_diffusers_transformer(dit, imagenet_layout=imagenet_layout).save_pretrained(folder, safe_serialization=True)


def load_dit_transformer(folder: Union[str, Path], num_classes: int) -> DiT:
    """Our DiT (eval mode) from a ``transformer/`` folder distgen wrote (:func:`save_dit_transformer` or
    :func:`write_dit_pipeline`), for a ``num_classes``-class model (0: unconditional; the export's
    ``distgen.json`` says). The config is checked before anything is built, the weights' shapes against it
    (on the meta device), and the weights are read with safetensors only. A SampleError names the folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = rb.read_json(folder / "config.json", rb.Map(rb.Anything(), max_len=100), error=SampleError,
                       max_bytes=rb.MiB, what="DiT config")
    if raw.get("_class_name") != "DiTTransformer2DModel":
        raise SampleError(f"{folder / 'config.json'}: _class_name is {raw.get('_class_name')!r}, not "
                          f"'DiTTransformer2DModel'")
    cfg = _check_config(raw, folder / "config.json")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise SampleError(f"{folder}: no {WEIGHTS} (distgen reads DiT weights from one safetensors file only)")
    try:
        with safe_open(str(weights), "pt") as f:
            got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # missing, truncated, not safetensors
        raise SampleError(f"{weights}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
    _check_shapes(_expected_shapes(cfg), got, weights)
    if not dtypes <= {"F32", "F16", "BF16", "F64"}:
        raise SampleError(f"{weights}: holds {', '.join(sorted(dtypes))} tensors; a DiT's weights are floats")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    return _to_dit(cfg, state, num_classes, folder)


def write_dit_pipeline(out_dir: Union[str, Path], dit: DiT, vae, train_scheduler, *, sampler: str = "ddim",
                       class_names: Optional[Sequence[str]] = None) -> None:
    """``DiTPipeline``'s folder for a class-conditional latent-diffusion DiT of ``formulation: ddpm``:
    ``transformer/`` (ImageNet layout), ``vae/`` (the AutoencoderKL), ``scheduler/`` (``sampler``: ddim,
    dpmsolver or ddpm, from the training DDPMScheduler's config, as distgen samples) and ``model_index.json``
    with ``id2label`` (``class_names``, default "class <i>"; commas separate synonyms in DiTPipeline).
    ``DiTPipeline.from_pretrained(out_dir)`` loads it; ``pipe(class_labels, guidance_scale, num_inference_steps,
    generator)`` samples what distgen does (see the module's docstring for ``guidance_scale`` < 1)."""
    from diffusers import DiTPipeline

    from distgen.families.formulations import make_sampler

    k = dit.num_classes
    if k < 1:
        raise ValueError("DiTPipeline needs a class-conditional DiT (it always passes class labels and guides "
                         "against class 1000); export an unconditional one with save_dit_transformer")
    if vae.config.latent_channels != dit.channels:
        raise ValueError(f"the DiT denoises {dit.channels}-channel latents, the autoencoder's are "
                         f"{vae.config.latent_channels}")
    names = [f"class {i}" for i in range(k)] if class_names is None else list(class_names)
    if len(names) != k or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"class_names: {k} non-empty names expected, got {names!r}")
    out = Path(out_dir)
    pipe = DiTPipeline(transformer=to_diffusers_transformer(dit, imagenet_layout=True), vae=vae,
                       scheduler=make_sampler(sampler, train_scheduler))
    pipe.save_pretrained(out, safe_serialization=True)
    # id2label is DiTPipeline's __init__ argument, not a module: from_pretrained passes it from model_index.json
    index = json.loads((out / "model_index.json").read_text())
    index["id2label"] = {str(i): n for i, n in enumerate(names)}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
