"""Package data: the configs distgen's own commands pass (slurm's multinode launch, the demo) ship inside the
package, equal to the user-visible configs/ files, and are found without the source tree."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from distgen.assets import asset

COPIES = {("accelerate", "multinode.yaml"): "configs/accelerate/multinode.yaml",
          ("accelerate", "ddp.yaml"): "configs/accelerate/ddp.yaml",
          ("demo", "fashion_mnist_diffusion.yaml"): "configs/fashion_mnist_diffusion.yaml"}


@pytest.mark.parametrize("parts", list(COPIES), ids="/".join)
def test_packaged_configs_equal_the_user_visible_ones(parts):
    assert asset(*parts).read_bytes() == (REPO / COPIES[parts]).read_bytes(), \
        f"distgen/assets/{'/'.join(parts)} and {COPIES[parts]} differ: edit both"


def test_packaged_configs_are_declared_package_data():
    text = (REPO / "pyproject.toml").read_text()
    for folder in {parts[0] for parts in COPIES}:
        assert f'"assets/{folder}/*.yaml"' in text


def test_configs_are_found_outside_the_source_tree(tmp_path):
    """A copy of the package alone (as an install has it, no configs/ beside it), run from another folder."""
    shutil.copytree(REPO / "distgen", tmp_path / "site" / "distgen", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from distgen.slurm import Rendezvous, train_command\n"
            "from distgen import demo\n"
            "cmd = train_command('c.yaml', [], 1, Rendezvous(0, 1, 'h', 1))\n"
            "print(cmd[cmd.index('--config_file') + 1]); print(demo.CONFIG); print(demo.DDP_CONFIG)\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert r.returncode == 0, r.stderr
    paths = r.stdout.split()
    assert len(paths) == 3
    for p in paths:
        assert p.startswith(str(tmp_path / "site" / "distgen" / "assets")) and os.path.isfile(p), p
