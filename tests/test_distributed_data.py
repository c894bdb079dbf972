"""Two real processes (torch.distributed, gloo), 2 DataLoader workers each, over Fashion-MNIST test shards."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from distgen.dist import free_port

pytestmark = pytest.mark.e2e  # 2 real processes (make test-fast leaves these out)


def test_two_ranks_see_each_key_once_in_eval_and_differ_in_training(fm_test_shards, tmp_path, env_with_repo):
    out = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests/scripts/data_dist.py"), str(fm_test_shards), str(out)]
    r = subprocess.run(cmd, env=env_with_repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    ranks = res["ranks"]
    keys = ranks[0]["eval"] + ranks[1]["eval"]
    assert len(keys) == 10000 and len(set(keys)) == 10000  # every key exactly once
    assert res["total"] == 10000  # the reported exact count, summed over ranks
    assert [r["count"] for r in ranks] == [5000, 5000]
    t0, t1 = set(ranks[0]["train"]), set(ranks[1]["train"])
    assert len(ranks[0]["train"]) == 512
    assert len(t0 & t1) < 50  # each rank draws its own samples
