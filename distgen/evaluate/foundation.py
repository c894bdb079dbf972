"""DINOv2 and CLIP feature extractors (torch-fidelity's), from local weight files only.

FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics"; the headline metric of
EDM2) and FD-CLIP are FID's maths in another feature space. torch-fidelity provides both extractors, but
loads them in ways an offline cluster node cannot or should not use:

- DINOv2: only through ``torch.hub.load("facebookresearch/dinov2", ...)``, which downloads the repository and
  runs its code (a weights path raises NotImplementedError), and the current model code is in no pip package.
  So the eval forward of the official ViT (facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``
  and ``dinov2/layers``, hub settings of ``dinov2/hub/backbones.py``) is written out below, with the official
  checkpoints' parameter names; torch-fidelity's own resize, normalisation and metrics run around it.
- CLIP: torch-fidelity's model code (``build_model``) and forward are used as they are, but its loader is
  ``torch.jit.load`` of OpenAI's TorchScript archives, i.e. code. distgen reads the tensors itself: a plain
  state dict (``torch.load(weights_only=True)``), safetensors, or OpenAI's archive through
  :func:`read_torchscript_tensors`, which rebuilds tensors without running anything from the file.

Weights are never downloaded: a missing file raises :class:`WeightsUnavailable` naming the file, where to get
it and how to point distgen at it (``--extractor-weights`` / ``eval.extractor_weights``).
"""

from __future__ import annotations

import math
import pickle
import warnings
import zipfile
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_clip import MODEL_METADATA as CLIP_METADATA
from torch_fidelity.feature_extractor_clip import MODEL_URLS as CLIP_URLS
from torch_fidelity.feature_extractor_clip import FeatureExtractorCLIP, build_model
from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA as DINOV2_HUB_NAMES
from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

from distgen.config.schema import FOUNDATION_EXTRACTORS
from distgen.errors import EvalError
from distgen.evaluate.weights import WeightsUnavailable, check_weights_size, load_weights

# torch hub names -> (embed_dim, depth, num_heads, ffn): dinov2/models/vision_transformer.py's vit_small ...
# vit_giant2 with dinov2/hub/backbones.py's settings (patch 14, 518 px, LayerScale 1.0, no registers)
DINOV2_ARCH = {"dinov2_vits14": (384, 12, 6, "mlp"), "dinov2_vitb14": (768, 12, 12, "mlp"),
               "dinov2_vitl14": (1024, 24, 16, "mlp"), "dinov2_vitg14": (1536, 40, 24, "swiglu")}
DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
FLAG = "--extractor-weights PATH (or eval.extractor_weights)"
# the storage classes of a TorchScript archive's tensors
STORAGE_DTYPES = {f"{n}Storage": getattr(torch, d) for n, d in (
    ("Float", "float32"), ("Half", "float16"), ("BFloat16", "bfloat16"), ("Double", "float64"), ("Long", "int64"),
    ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"), ("Bool", "bool"))}
assert set(FOUNDATION_EXTRACTORS) <= set(DINOV2_HUB_NAMES) | set(CLIP_METADATA), "not in torch-fidelity"


# --------------------------------------------------------------------------- the weights files
def official(name: str) -> tuple[str, list[str]]:
    """The URL of ``name``'s official weights and the file names looked for in torch hub's cache (the URL's
    own name first; for CLIP also the name torch-fidelity caches OpenAI's file under)."""
    if name in DINOV2_HUB_NAMES:
        hub = DINOV2_HUB_NAMES[name]
        return f"{DINOV2_BASE_URL}/{hub}/{hub}_pretrain.pth", [f"{hub}_pretrain.pth"]
    meta = CLIP_METADATA[name]
    return CLIP_URLS[name], [f"{meta['filename']}.pt", f"{name}-{meta['hash']}.pt"]


def weights_file(name: str, configured: Optional[str] = None) -> Path:
    """The local weights file of a DINOv2 / CLIP extractor: ``configured``, else torch hub's cache
    ($TORCH_HOME/hub/checkpoints). Never downloads; raises WeightsUnavailable saying what to fetch."""
    url, names = official(name)
    if configured:
        if not Path(configured).is_file():
            raise WeightsUnavailable(f"{name} weights file {configured} (from --extractor-weights / "
                                     f"eval.extractor_weights) does not exist; the official file is {url}")
        return Path(configured)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for n in names:
        if (cache / n).is_file():
            return cache / n
    raise WeightsUnavailable(f"{name} weights are not on this machine (looked for {cache / names[0]}); distgen "
                             f"never downloads them: fetch {url} on a machine with internet, copy it here and "
                             f"set {FLAG}, or put it at that path")


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive (OpenAI's CLIP ``.pt`` files) by dotted attribute name, read without
    executing anything in it: its ``data.pkl`` is unpickled with module objects as inert records, and only
    tensor-rebuilding globals are allowed (``torch.jit.load`` would compile and run the archive's code).
    The members' unpacked sizes are bounded first, and no tensor is rebuilt larger than its storage."""
    check_weights_size(Path(path))
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise EvalError(f"{path}: not a TorchScript archive (no top-level data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        storages: dict[str, torch.Tensor] = {}

        class Record:  # a scripted module's attributes, and nothing it could run
            pass

        def rebuild(storage, offset, size, stride, *_):
            if not torch.is_tensor(storage):
                raise ValueError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
            n = math.prod(size)  # a view of more elements than its storage (stride 0) would clone into any size
            if n > storage.numel():
                raise ValueError(f"a tensor of {list(size)} on a storage of {storage.numel()} elements")
            return storage.as_strided(size, stride, offset).clone() if n else storage.new_zeros(size)

        class Reader(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "__torch__" or module.startswith("__torch__."):
                    return Record
                if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                    return rebuild
                if (module, name) == ("collections", "OrderedDict"):
                    return OrderedDict
                if module == "torch.jit._pickle" and name.startswith(("build_", "restore_type_tag")):
                    return lambda data, *_: data  # typed lists and type tags: the plain value (as torch does)
                if module == "torch" and name in STORAGE_DTYPES:
                    return STORAGE_DTYPES[name]
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

            def persistent_load(self, pid):
                _, dtype, key, _location, numel = pid
                if dtype not in STORAGE_DTYPES.values() or not isinstance(key, str) or not isinstance(numel, int):
                    raise ValueError(f"a storage record {str(pid)[:100]} distgen does not read")
                if key not in storages:
                    data = bytearray(z.read(f"{prefix}data/{key}"))
                    storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.zeros(0, dtype=dtype)
                return storages[key][:numel]

        out: dict[str, torch.Tensor] = {}
        try:
            root = Reader(z.open(pkl[0])).load()
            if not isinstance(root, Record):
                raise ValueError(f"its root is a {type(root).__name__}, not a module")
            todo = [("", root)]
            while todo:  # module records -> the dotted names of their tensors, as state_dict() names them
                name, obj = todo.pop()
                if name.count(".") > 100:  # a cycle (a pickle can make one), not a network
                    raise ValueError(f"modules nested too deeply: {name[:200]}...")
                for k, v in vars(obj).items():
                    if isinstance(v, Record):
                        todo.append((f"{name}{k}.", v))
                    elif torch.is_tensor(v):
                        out[name + k] = v
        except Exception as e:
            raise EvalError(f"{path}: not a TorchScript archive distgen can read safely ({type(e).__name__}: {e})")
    return out


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, a plain torch file (weights only), or a TorchScript archive."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
        if scripted:
            return read_torchscript_tensors(path)
    return load_weights(path, also=" or OpenAI's TorchScript archive")


def _fit(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    want = model.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    wrong = [k for k in want if k in state and state[k].shape != want[k].shape]
    if missing or extra or wrong:
        what = "; ".join(f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                         for label, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
                         if keys)
        raise EvalError(f"{path}: not {name} weights ({what})")
    model.load_state_dict({k: v.to(want[k].dtype) for k, v in state.items()})


# --------------------------------------------------------------------------- DINOv2 (eval forward only)
class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))  # hub init_values 1.0

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # MemEffAttention without xFormers = Attention.forward
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(x.transpose(1, 2).contiguous().view(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """ViT-g's FFN (SwiGLUFFNFused: hidden width 2/3 of the MLP's, rounded up to a multiple of 8)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn: type):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1, self.attn, self.ls1 = norm(dim), Attention(dim, num_heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = norm(dim), ffn(dim, 4 * dim), LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """DINOv2's ViT as torch hub builds it (``dinov2_vits14`` ...), in eval mode: the output is the
    layer-normed class token (``x_norm_clstoken``; the head is the identity)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, ffn: str = "mlp", patch_size: int = 14,
                 img_size: int = 518, interpolate_offset: float = 0.1):
        super().__init__()
        self.patch_size, self.interpolate_offset = patch_size, interpolate_offset
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # training only; in the checkpoints
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, SwiGLUFFN if ffn == "swiglu" else Mlp)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        # the official init (trunc_normal_ 0.02 on pos_embed and Linear weights), for random test weights
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """The position embeddings (made for 518 px, 37x37 patches) resampled bicubically to the input's patch
        grid, with the official scale-factor offset of 0.1 (a DINO v1 work-around the checkpoints expect)."""
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        dim, w0, h0, M = x.shape[-1], w // self.patch_size, h // self.patch_size, int(math.sqrt(N))
        assert N == M * M
        if self.interpolate_offset:
            kw = {"scale_factor": ((w0 + self.interpolate_offset) / M, (h0 + self.interpolate_offset) / M)}
        else:
            kw = {"size": (w0, h0)}
        patch = F.interpolate(pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=False, **kw)
        assert (w0, h0) == patch.shape[-2:]
        patch = patch.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((pos[:, 0].unsqueeze(0), patch), dim=1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def dinov2_model(name: str) -> DinoVisionTransformer:
    """An (untrained) DINOv2 backbone of torch-fidelity's ``name`` (dinov2-vit-s-14 ...)."""
    return DinoVisionTransformer(*DINOV2_ARCH[DINOV2_HUB_NAMES[name]])


# --------------------------------------------------------------------------- torch-fidelity's extractors, loaded here
class DinoV2Extractor(FeatureExtractorDinoV2):
    """torch-fidelity's DINOv2 extractor (its resize to 224, normalisation and forward) around
    :class:`DinoVisionTransformer` with weights read from a local file."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)  # not torch-fidelity's: it calls torch.hub.load
        self.feature_extractor_internal_dtype = torch.float32
        self.model = dinov2_model(name)
        path = Path(feature_extractor_weights_path)
        _fit(self.model, read_tensors(path), path, name)
        self.requires_grad_(False)
        self.eval()


class ClipExtractor(FeatureExtractorCLIP):
    """torch-fidelity's CLIP extractor (``build_model`` and forward) with weights read by distgen."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)  # not torch-fidelity's: it calls torch.jit.load
        self.feature_extractor_internal_dtype = torch.float32
        path = Path(feature_extractor_weights_path)
        state = read_tensors(path)
        if "text_projection" not in state:  # a visual-only file: build_model reads the embedding width there
            if "visual.proj" in state:  # ViT: width x embedding
                state["text_projection"] = torch.zeros(1, state["visual.proj"].shape[1])
            elif "visual.attnpool.c_proj.weight" in state:  # ResNet: embedding x width
                state["text_projection"] = torch.zeros(1, state["visual.attnpool.c_proj.weight"].shape[0])
        try:
            # Built on the meta device first: build_model sizes the network from shapes and key counts in the
            # file, and a few small tensors could describe a huge one. On meta it costs nothing and its strict
            # load_state_dict checks every shape, so the real one is no larger than the file's tensors.
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": the point here
                build_model(dict(state), self.feature_extractor_internal_dtype)
            self.model = build_model(state, self.feature_extractor_internal_dtype)
        except (KeyError, RuntimeError, ValueError, AssertionError, IndexError, TypeError) as e:
            raise EvalError(f"{path}: not {name} weights ({type(e).__name__}: {str(e)[:300]})") from None
        self.resolution = self.model.visual.input_resolution
        self.requires_grad_(False)
        self.eval()


def foundation_class(name: str) -> type:
    return DinoV2Extractor if name in DINOV2_HUB_NAMES else ClipExtractor
