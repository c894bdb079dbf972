"""distgen.checkpoint_dcp in one process, without a process group: a network and its optimizer written with DCP
read back whole and into a fresh network bit for bit; metadata that names code refused without running it; a
truncated or missing shard or a corrupt metadata file named, and a checkpoint folder holding one passed over by
load_newest. (Two processes, FSDP2, resharding and the training loop: tests/test_fsdp2.py.)"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from distgen import checkpoint as ckpt
from distgen import checkpoint_dcp as dcp_ckpt
from distgen.errors import CheckpointError


def _net_and_optimizer(seed: int):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    return net, opt


@pytest.fixture
def saved(tmp_path) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    """A checkpoint folder with a network (one Adam step taken) written sharded, as a training run would."""
    net, opt = _net_and_optimizer(0)
    net(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    dcp_ckpt.save(net, opt, folder, "net")
    return folder, net, opt


def test_a_network_and_its_optimizer_come_back_bit_for_bit(saved):
    folder, net, opt = saved
    whole = dcp_ckpt.read_weights(folder, "net")
    assert whole.keys() == net.state_dict().keys()
    assert all(torch.equal(whole[k], v) for k, v in net.state_dict().items())
    fresh, fresh_opt = _net_and_optimizer(1)
    dcp_ckpt.apply(fresh, fresh_opt, *dcp_ckpt.read(fresh, fresh_opt, folder, "net"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert all(torch.equal(want["state"][i][k], got["state"][i][k]) for i in want["state"] for k in want["state"][i])


def test_weights_of_another_shape_are_another_config_not_damage(saved):
    """As for full checkpoints (checkpoint.misfit): a TrainingError that stops a resume, not a CheckpointError that
    would set the checkpoint aside."""
    from distgen.errors import TrainingError

    folder, _, _ = saved
    wider = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5))
    with pytest.raises(TrainingError) as e:
        dcp_ckpt.read(wider, torch.optim.AdamW(wider.parameters()), folder, "net")
    assert not isinstance(e.value, CheckpointError)
    assert str(e.value).startswith(f"{ckpt.sharded_weights_dir(folder, 'net')}: does not fit the configured network")
    assert "0.weight: saved (4, 3), the network's (5, 3)" in str(e.value)


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("reader", ["whole", "resume"])
def test_metadata_carrying_a_pickled_callable_is_refused_naming_the_file_not_run(saved, tmp_path, reader):
    folder, _, _ = saved
    marker = tmp_path / "ran"
    for d in (ckpt.sharded_weights_dir(folder, "net"), ckpt.sharded_optimizer_dir(folder, "net")):
        (d / ".metadata").write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(CheckpointError) as e:
        if reader == "whole":
            dcp_ckpt.read_weights(folder, "net")
        else:
            net, opt = _net_and_optimizer(1)
            dcp_ckpt.read(net, opt, folder, "net")
    assert str(e.value).startswith(f"{ckpt.sharded_weights_dir(folder, 'net') / '.metadata'}: refused: it names ")
    assert "system" in str(e.value)
    assert not marker.exists()


def test_a_value_carrying_a_pickled_callable_is_refused_not_run(tmp_path):
    """DCP writes non-tensor values (an optimizer's param groups) with torch.save, and its planner would load them
    with weights_only=False: distgen's reads them as data only."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    with dcp_ckpt._quiet():
        dcp.save({"w": torch.ones(2), "param_groups": _RunsACommand(marker)},
                 storage_writer=dcp.FileSystemWriter(tmp_path / "x.dcp"))
    with pytest.raises(CheckpointError) as e:
        dcp_ckpt.read_full(tmp_path / "x.dcp")
    assert str(e.value).startswith(f"{tmp_path / 'x.dcp'}: does not load") and "weights_only" in str(e.value).lower()
    assert not marker.exists()


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-7])


def _garble(p: Path) -> None:
    p.write_bytes(b"\x80\x04not a pickle")


DAMAGE = {  # what is done to the network's DCP folder, the file named, the words that say why
    "truncated shard": ("__0_0.distcp", _truncate, "truncated"),
    "missing shard": ("__0_0.distcp", Path.unlink, "missing"),
    "corrupt metadata": (".metadata", _garble, "not readable DCP metadata"),
    "missing metadata": (".metadata", Path.unlink, "missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_sharded_checkpoint_is_named_and_passed_over(saved, damage, capsys):
    folder, net, opt = saved
    older = folder.with_name("step-00000000")
    older.mkdir()
    dcp_ckpt.save(net, opt, older, "net")
    name, spoil, why = DAMAGE[damage]
    spoil(ckpt.sharded_weights_dir(folder, "net") / name)
    with pytest.raises(CheckpointError) as e:
        dcp_ckpt.read(*_net_and_optimizer(1), folder, "net")
    assert str(e.value).startswith(str(ckpt.sharded_weights_dir(folder, "net") / name)) and why in str(e.value)
    got, _ = ckpt.load_newest(folder.parent, lambda f: dcp_ckpt.read(*_net_and_optimizer(1), f, "net"))
    assert got == older
    assert f"{folder} does not load ({ckpt.sharded_weights_dir(folder, 'net') / name}" in capsys.readouterr().out


def test_a_tensor_larger_than_its_stored_bytes_is_refused_before_anything_is_allocated(saved):
    """A size in the metadata is read against the bytes the shard files hold for that tensor: a crafted 2^40
    elements is refused, naming the file and the tensor, instead of being allocated for the whole read."""
    folder, _, _ = saved
    meta = ckpt.sharded_weights_dir(folder, "net") / ".metadata"
    md = dcp_ckpt.read_metadata(meta)
    md.state_dict_metadata["0.weight"].size = torch.Size([2 ** 20, 2 ** 20])
    meta.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError) as e:
        dcp_ckpt.read_weights(folder, "net")
    assert str(e.value).startswith(f"{meta}: 0.weight is (1048576, 1048576) torch.float32, more than its ")
