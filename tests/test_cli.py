"""The data commands, run as a user would: the console script and python -m distgen."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the console script in subprocesses (make test-fast leaves these out)


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
                        "--workers", "1,2", "--seconds", "0.3", "--repeats", "1", "--batch-size", "64"],
                       capture_output=True, text=True, env=env_with_repo, timeout=120)
    assert r.returncode == 0, r.stderr
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"(raw baseline|1 worker|2 worker).*?(\d+) images/s", r.stdout)}
    assert set(rates) == {"raw baseline", "1 worker", "2 worker"} and all(v > 0 for v in rates.values())
    assert re.search(r"1 worker\(s\):.*\d\.\d\dx raw", r.stdout)


def test_shard_command_error_is_clear(tmp_path, capsys):
    # In-process: the launch path (console script, python -m) and its exit code are tested above.
    from distgen.cli import main as cli_main

    assert cli_main(["data", "shard", f"npz:{tmp_path}/none.npz", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"distgen: error: {tmp_path}/none.npz: not found"
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_rounds_and_flag_errors(capsys, fm_test_shards):
    from distgen.cli import main as cli_main

    manifest = str(fm_test_shards)
    for flags, msg in ((["--repeats", "0"], "--repeats: must be >= 1, got 0"),
                       (["--seconds", "-1"], "--seconds: must be > 0, got -1.0"),
                       (["--workers", "1,-2"], "--workers: must be >= 0, got 1,-2"),
                       (["--workers", "one"], "--workers: expected N or a comma list of N, got 'one'")):
        assert cli_main(["data", "bench", manifest, *flags]) == 2
        assert capsys.readouterr().err.strip() == f"distgen: error: {msg}"

    # Several rounds: the median ratio of the paired rounds, inside the printed range of rounds.
    assert cli_main(["data", "bench", manifest, "--workers", "0", "--repeats", "3", "--seconds", "0.2",
                     "--batch-size", "32"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("median of 3 interleaved round(s) of 0.2s, batch 32, 28x28x1 images:")
    m = re.search(r"0 worker\(s\):\s+(\d+) images/s\s+(\d\.\d\d)x raw \(rounds (\d\.\d\d)-(\d\.\d\d)x\)", text)
    assert m, text
    assert float(m.group(1)) > 0 and float(m.group(3)) <= float(m.group(2)) <= float(m.group(4))


def test_only_distgens_own_info_lines_reach_the_terminal(env_with_repo):
    """Another library's INFO records stay off stderr even where that library has not set its loggers' levels yet:
    CI saw torch's fake-tensor cache statistics (an exit hook, INFO) printed after distgen's last line when a
    Ctrl-C landed during torch's import."""
    code = ("import logging; from distgen import cli; cli._logging(); "
            "logging.getLogger('torch._subclasses.fake_tensor').info('cache_misses: 0'); "
            "logging.getLogger('distgen.train').info('ours')")
    err = subprocess.run([sys.executable, "-c", code], env=env_with_repo, capture_output=True, text=True,
                         check=True).stderr
    assert err.strip().splitlines() == ["INFO distgen.train: ours"]
