"""Checkpoint: what is loaded is validated (structure, types, finiteness, checksum); no temporary file stays."""

import os
import subprocess
import sys

import pytest
import torch

from nethessian._checkpoint import Checkpoint
from nethessian.errors import CheckpointError

SETTINGS = {"what": "test", "size": 4}


def _state():
    return {
        "kind": "k",
        "done": 2,
        "values": torch.arange(8, dtype=torch.float64).reshape(4, 2),
        "generator": torch.Generator().manual_seed(0).get_state(),
        "nested": {"a": [1, 2.5, None]},
    }


def _rewrite(path, edit):
    blob = torch.load(path, weights_only=True)
    edit(blob)
    torch.save(blob, path)


def test_round_trip_and_resume(tmp_path):
    ck = Checkpoint(tmp_path / "c.ckpt", SETTINGS, every=0)
    assert ck.load() is None
    ck.save(_state())
    got = Checkpoint(tmp_path / "c.ckpt", SETTINGS).resume({"kind": "k"})
    assert torch.equal(got["values"], _state()["values"]) and got["nested"] == {"a": [1, 2.5, None]}
    with pytest.raises(CheckpointError, match="holds another computation: kind='k' \\(now 'other'\\)"):
        Checkpoint(tmp_path / "c.ckpt", SETTINGS).resume({"kind": "other"})
    # an expected value compared with a saved tensor: refused cleanly, never "ambiguous truth value"
    with pytest.raises(CheckpointError, match="values"):
        Checkpoint(tmp_path / "c.ckpt", SETTINGS).resume({"values": 3})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b["state"]["values"].__setitem__((1, 1), float("nan")), "contains NaN or Inf"),
        (lambda b: b["state"]["values"].__setitem__((0, 0), float("inf")), "contains NaN or Inf"),
        # one flipped bit: 2.0 -> 2.0000000000000004
        (
            lambda b: (
                b["state"]["values"]
                .view(torch.int64)
                .__setitem__((1, 0), b["state"]["values"].view(torch.int64)[1, 0] ^ 1)
            ),
            "sha256 does not match",
        ),
        (lambda b: b["state"].__setitem__("done", 3), "sha256 does not match"),
        (lambda b: b.__setitem__("state", [1, 2]), "state is a list, not a dict"),
        (lambda b: b.__setitem__("state", {1: 2}), "key that is not a string"),
        (lambda b: b.pop("checksum"), "'checksum' entry is missing"),
        (lambda b: b.__setitem__("fingerprint", 7), "'fingerprint' entry is missing or not a string"),
        (lambda b: b["state"].__setitem__("values", torch.zeros(2).to_sparse()), "sparse"),
        (lambda b: b.__setitem__("magic", "nethessian-checkpoint-v1"), "older nethessian"),
        (lambda b: b.__setitem__("magic", "something else"), "not a nethessian checkpoint"),
    ],
)
def test_damaged_or_malformed_files_are_refused(tmp_path, edit, message):
    path = tmp_path / "c.ckpt"
    Checkpoint(path, SETTINGS).save(_state())
    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(path, SETTINGS).resume({"kind": "k"})


def test_other_settings_and_foreign_files(tmp_path):
    path = tmp_path / "c.ckpt"
    Checkpoint(path, SETTINGS).save(_state())
    with pytest.raises(CheckpointError, match="differs in: size"):
        Checkpoint(path, {**SETTINGS, "size": 5}).load()
    _rewrite(path, lambda b: b.__setitem__("settings", "not json"))
    with pytest.raises(CheckpointError, match="settings are not a JSON object"):
        Checkpoint(path, {**SETTINGS, "size": 5}).load()
    (tmp_path / "junk").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable nethessian checkpoint"):
        Checkpoint(tmp_path / "junk", SETTINGS).load()
    with pytest.raises(CheckpointError, match="is a folder"):
        Checkpoint(tmp_path, SETTINGS)


def test_save_refuses_what_load_would_refuse(tmp_path):
    ck = Checkpoint(tmp_path / "c.ckpt", SETTINGS)
    with pytest.raises(CheckpointError, match="NaN"):
        ck.save({"values": torch.tensor([1.0, float("nan")])})
    with pytest.raises(CheckpointError, match="string keys"):
        ck.save({1: torch.zeros(1)})
    with pytest.raises(CheckpointError, match="expected a tensor or a plain value"):
        ck.save({"x": object()})
    assert not os.path.exists(tmp_path / "c.ckpt") and os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    ck = Checkpoint(tmp_path / "c.ckpt", SETTINGS)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save(_state())
    assert os.listdir(tmp_path) == []


KILLED_WRITER = """
import os, sys, torch
from nethessian import _checkpoint
ck = _checkpoint.Checkpoint(sys.argv[1], {"what": "test"})
os.replace = lambda *a: os._exit(9)  # killed between fsync and rename
ck.save({"x": torch.zeros(3)})
"""


def test_a_writer_killed_before_the_rename_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    path = tmp_path / "c.ckpt"
    other = tmp_path / ".other.ckpt.ckpt-1@elsewhere-abc.tmp"
    other.write_bytes(b"another checkpoint's")
    rc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], timeout=120).returncode
    assert rc == 9
    left = [n for n in os.listdir(tmp_path) if n.startswith(".c.ckpt.ckpt-") and n.endswith(".tmp")]
    assert len(left) == 1 and not path.exists()
    ck = Checkpoint(path, {"what": "test"})  # the next run
    assert sorted(os.listdir(tmp_path)) == [other.name] and ck.load() is None
