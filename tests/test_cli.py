"""The data commands, run as a user would: the console script and python -m distgen."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path



def distgen_exe() -> str:
    exe = Path(sys.executable).parent / "distgen"
    return str(exe) if exe.exists() else shutil.which("distgen")


def test_shard_command_and_bench(tmp_path, env_with_repo, fm_test_shards):
    out = tmp_path / "shards"
    r = subprocess.run([distgen_exe(), "data", "shard", "fashion-mnist", str(out), "--split", "test",
                        "--samples-per-shard", "4000"], capture_output=True, text=True, env=env_with_repo)
    assert r.returncode == 0, r.stderr
    assert "10000 samples in 3 shard(s), 28x28x1, 10 classes" in r.stdout
    m = json.loads((out / "test.manifest.json").read_text())
    assert [s["count"] for s in m["shards"]] == [4000, 4000, 2000]

    r = subprocess.run([sys.executable, "-m", "distgen", "data", "bench", str(out / "test.manifest.json"),
                        "--workers", "1,2", "--seconds", "0.5", "--repeats", "1", "--batch-size", "64"],
                       capture_output=True, text=True, env=env_with_repo, timeout=120)
    assert r.returncode == 0, r.stderr
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"(raw baseline|1 worker|2 worker).*?(\d+) images/s", r.stdout)}
    assert set(rates) == {"raw baseline", "1 worker", "2 worker"} and all(v > 0 for v in rates.values())
    assert re.search(r"1 worker\(s\):.*\d\.\d\dx raw", r.stdout)


def test_shard_command_error_is_clear(tmp_path, env_with_repo):
    r = subprocess.run([sys.executable, "-m", "distgen", "data", "shard", f"npz:{tmp_path}/none.npz", str(tmp_path)],
                       capture_output=True, text=True, env=env_with_repo)
    assert r.returncode == 2
    assert r.stderr.strip() == f"distgen: error: {tmp_path}/none.npz: not found"
