"""Files distgen ships inside the package (package data, declared in pyproject.toml), so that an installed
distgen finds them without the source tree: the bundled Fashion-MNIST domain extractor, the accelerate configs
its launchers pass (``accelerate/``: copies of ``configs/accelerate/``), and the demo's experiment config
(``demo/``: a copy of ``configs/fashion_mnist_diffusion.yaml``). tests/test_assets.py keeps the copies equal to
the user-visible ``configs/`` files."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def asset(*parts: str) -> Path:
    """The packaged file ``parts`` (e.g. ``asset("accelerate", "multinode.yaml")``), as a path another process
    (``accelerate launch --config_file``) can open."""
    ref = resources.files(__name__)
    for part in parts:
        ref = ref / part
    if not isinstance(ref, Path) or not ref.is_file():
        raise FileNotFoundError(f"distgen's packaged file {'/'.join(parts)} is not a file on disk ({ref}): "
                                f"install distgen from a wheel or source tree with its package data")
    return ref
