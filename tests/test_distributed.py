"""Two gloo processes on 127.0.0.1 give the single-process numbers; faults end with a clear error."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import nethessian as nh
from dist_worker import problem, results

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(mode, out="", timeout=120, env_extra=None):
    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(r), "2", port, mode, out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = []
    for p in procs:  # rank 0 first; a rank still running after rank 0 ended gets `timeout` more
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate())
        timeout = 5 if mode == "hang" else timeout
    return procs, outs


def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "res")
    procs, outs = _launch("compare", out)
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    ref = results(*problem())
    for r in (0, 1):
        got = torch.load(f"{out}.{r}")
        for key, val in ref.items():
            torch.testing.assert_close(
                got[key], val, rtol=1e-12, atol=1e-14 * max(1.0, float(val.abs().max())), msg=f"rank {r}: {key}"
            )


def test_shard_splits_data_exactly():
    X, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = [nh.shard((X, y), r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert [len(p[1]) for p in parts] == [3, 3, 4]
    batches = [(X[i : i + 2], y[i : i + 2]) for i in range(0, 10, 2)]
    got = [b for r in range(2) for b in nh.shard(batches, r, 2)]
    assert sorted(int(b[1][0]) for b in got) == [0, 2, 4, 6, 8]
    with pytest.raises(nh.InputError, match="every rank needs one"):
        nh.shard((X[:1], y[:1]), 0, 2)
    with pytest.raises(nh.InputError, match="rank must be a whole number, got 0.5"):
        nh.shard((X, y), 0.5, 2)  # was truncated to rank 0
    with pytest.raises(nh.InputError, match="world must be a whole number"):
        nh.shard((X, y), 0, "2")
    with pytest.raises(nh.InputError, match="rank 2 is not in"):
        nh.shard((X, y), 2, 2)
    with pytest.raises(nh.InputError, match="timeout_s must be positive"):
        nh.distributed.init_from_env(timeout_s=0)


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_dead_or_hung_rank_gives_clear_error_within_timeout(mode):
    procs, outs = _launch(mode, timeout=90, env_extra={"NH_TIMEOUT": "5"})
    err0 = outs[0][1]
    assert procs[0].returncode == 1, err0[-3000:]
    assert "another rank died, hung past the process group's timeout" in err0
    elapsed = float(err0.split("ELAPSED ")[1].split()[0])  # rank 0: from the fault to the error
    assert elapsed < 30, err0


def test_mismatched_models_detected_at_start():
    procs, outs = _launch("mismatch")
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 1, e[-3000:]
        assert "differ across ranks" in e and "parameter 0.weight: rank 0 shape (5, 4), rank 1 shape (6, 4)" in e


def test_cli_under_torchrun_prints_once_and_matches_one_process():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed beside this python")
    prob = os.path.join(os.path.dirname(__file__), "dist_problem.py")
    args = ["trace", prob, "--exact", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "nethessian", *args], capture_output=True, text=True, timeout=120, env=env
    )
    two = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-port", _port(), "-m", "nethessian", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: only rank 0 printed
    assert r2["settings"]["world_size"] == 2
    assert r2["result"]["value"] == pytest.approx(r1["result"]["value"], rel=1e-12)


# -- C5 without processes: the single-process path -------------------------------------------------
def test_common_seed_single_process():
    assert nh.distributed.common_seed(7) == 7
    assert nh.distributed.common_seed(7.0) == 7
    drawn = {nh.distributed.common_seed(None) for _ in range(4)}
    assert len(drawn) == 4 and all(0 <= s < 2**63 for s in drawn)  # fresh, and fits an int64
    for bad in ("abc", 2.7, True):
        with pytest.raises(nh.InputError, match="seed"):
            nh.distributed.common_seed(bad)


def test_check_same_single_process_checks_plain_values_only():
    nh.distributed.check_same("trace", num_matvecs=20, tol=1e-3, method="hutchinson", shape=(3, None))
    with pytest.raises(nh.InputError, match="v must be plain values"):
        nh.distributed.check_same("trace", v=torch.ones(2))


def test_agree_single_process_raises_own_error():
    nh.distributed.agree(None)
    assert nh.distributed.common_value([1, "a"], how="rank0") == [1, "a"]
    with pytest.raises(nh.InputError, match="how must be"):
        nh.distributed.common_value(1, how="mean")
    err = nh.InputError("data is empty")
    with pytest.raises(nh.InputError, match="data is empty"):
        nh.distributed.agree(err)
    with pytest.raises(KeyError):
        with nh.distributed.agreeing():
            raise KeyError("x")
    with nh.distributed.agreeing():
        pass


def test_state_facts_name_what_ranks_must_share():
    model, loss_fn, data = problem()
    data = (torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data]))  # train-mode BN: no batch of 1
    model = torch.nn.Sequential(model, torch.nn.BatchNorm1d(3).double())
    obj = nh.Objective(model, loss_fn, data, params=["0.*"])
    facts = nh.distributed.state_facts(obj)
    assert facts["dtype"] == "float64" and facts["parameter 0.0.weight"] == "shape (5, 4)"
    assert facts["number of parameters"] == "43 in 4 tensors"
    assert facts["loss.ignore_index"] == "-100" and facts["train/eval mode"] == "all train"
    assert "buffer 1.running_mean" in facts and "fixed parameter 1.weight" in facts
    nh.distributed.check_state(obj)  # a no-op in one process
    model[1].eval()
    assert nh.distributed.state_facts(nh.Objective(model, loss_fn, data))["train/eval mode"] == "eval: 1"
    before = facts["buffer 1.running_mean"]
    obj._buffers["1.running_mean"] += 1.0
    assert nh.distributed.state_facts(obj)["buffer 1.running_mean"] != before


# -- ranks that disagree: every rank stops, and the message names what differs ----------------------
def _run_scenarios(mode, tmp_path_factory, timeout=120):
    out = str(tmp_path_factory.mktemp(mode) / "found")
    procs, outs = _launch(mode, out, timeout=timeout, env_extra={"NH_TIMEOUT": "30"})
    found = []
    for r, (p, (o, e)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}: {e[-3000:]}"
        with open(f"{out}.{r}") as f:
            found.append(json.load(f))
    return found


@pytest.fixture(scope="module")
def disagree(tmp_path_factory):
    return _run_scenarios("disagree", tmp_path_factory)


def _both_refuse(found, name, *needles):
    """Both ranks raised DistributedError, and each message names every needle."""
    for r, ranks in enumerate(found):
        msg = ranks[name]
        assert msg.startswith("DistributedError: "), f"rank {r}, {name}: {msg}"
        for needle in needles:
            assert needle in msg, f"rank {r}, {name}: {needle!r} not in {msg}"
    return [ranks[name] for ranks in found]


def test_dtype_mismatch_names_the_dtype(disagree):
    msgs = _both_refuse(disagree, "dtype", "dtype: rank 0 float64, rank 1 float32")
    assert all("parameter counts" not in m and "number of parameters" not in m for m in msgs)


@pytest.mark.parametrize("via", ["check_state", "operator"])
def test_batch_norm_statistics_that_differ_are_refused(disagree, via):
    _both_refuse(disagree, f"buffers_{via}", "buffer 1.running_mean: rank 0 (5,) float64 cpu sha256:")


@pytest.mark.parametrize("via", ["check_state", "operator"])
def test_train_on_one_rank_and_eval_on_the_other_is_refused(disagree, via):
    _both_refuse(disagree, f"mode_{via}", "train/eval mode: rank 0 all eval, rank 1 all train")


def test_parameter_values_that_differ_are_refused(disagree):
    """Selected and fixed (unselected) parameters, one entry off by 1e-12 on rank 1."""
    _both_refuse(disagree, "fixed_check_state", "fixed parameter 3.weight: rank 0 (3, 5) float64 cpu sha256:")
    msgs = _both_refuse(disagree, "values_check_state", "values of the selected parameters: rank 0 (25,)")
    assert all("fixed parameter" not in m for m in msgs)


def test_many_differences_are_named_and_counted(disagree):
    msgs = _both_refuse(
        disagree,
        "shapes_operator",
        "number of parameters: rank 0 53 in 6 tensors, rank 1 63 in 6",
        "parameter 0.weight: rank 0 shape (5, 4), rank 1 shape (6, 4)",
        "more. Every rank must",
    )
    assert len(msgs[0]) < 2000


def test_loss_settings_that_differ_are_refused(disagree):
    _both_refuse(disagree, "loss_check_state", "loss.label_smoothing: rank 0 0.0, rank 1 0.1")


def test_check_same_names_only_the_differing_option(disagree):
    msgs = _both_refuse(
        disagree, "check_same", "the settings of trace differ across ranks", "num_matvecs: rank 0 20, rank 1 30"
    )
    assert all("method" not in m for m in msgs)


def test_common_seed_is_one_seed_for_every_rank(disagree):
    _both_refuse(disagree, "seed_differs", "seed: rank 0 3, rank 1 4")
    _both_refuse(disagree, "seed_none_on_one_rank", "seed: rank 0 None, rank 1 5")
    drawn = [ranks["seed_none"] for ranks in disagree]
    assert drawn[0].startswith("ok ") and drawn[0] == drawn[1]


def test_common_value_is_the_same_on_every_rank(disagree):
    for ranks in disagree:  # a choice from local timing or memory, made once for all ranks
        assert ranks["common_value_rank0"] == "ok False"
        assert ranks["common_value_max"] == "ok 11.5" and ranks["common_value_min"] == "ok 6"


def test_a_local_failure_stops_every_rank(disagree):
    assert disagree[1]["agree"] == "InputError: rank one's data are bad"
    assert disagree[0]["agree"] == (
        "DistributedError: rank 1 failed, so rank 0 stops too: InputError: rank one's data are bad"
    )
    assert disagree[1]["agreeing"] == "KeyError: 'a bug on rank 1'"
    assert disagree[0]["agreeing"].startswith("DistributedError: rank 1 failed")
    assert "a bug on rank 1" in disagree[0]["agreeing"]


def test_a_rank_without_data_stops_every_rank(tmp_path_factory):
    found = _run_scenarios("empty", tmp_path_factory)
    for case in ("empty", "empty_shard"):  # an empty list; a loader with fewer batches than ranks
        assert found[1][case].startswith("InputError: ") and "empty" in found[1][case], found[1][case]
        assert found[0][case].startswith("DistributedError: rank 1 failed"), found[0][case]
        assert "empty" in found[0][case]


def test_other_num_matvecs_or_k_on_one_rank_stops_every_rank(tmp_path_factory):
    found = _run_scenarios("options", tmp_path_factory)
    _both_refuse(found, "num_matvecs", "num_matvecs: rank 0 20, rank 1 30")
    _both_refuse(found, "k", "k: rank 0 3, rank 1 4")
    # per-call options that set the collectives' sizes or the result: a clear error on every rank,
    # not a gloo abort, a half-finished run or a silent mixture
    _both_refuse(found, "chunk", "chunk: rank 0 4, rank 1 7")
    _both_refuse(found, "diag_chunk", "chunk: rank 0 3, rank 1 5")
    _both_refuse(found, "tol", "tol")
    _both_refuse(found, "b", "b:")
    _both_refuse(found, "sigma", "sigma")


def test_seed_none_draws_the_same_probes_on_every_rank(tmp_path):
    """Issue 9 item 2: seed=None was drawn per rank, and the all-reduce mixed two probe sets."""
    from dist_scenarios import FIXED_SEED, seed_none_results

    out = str(tmp_path / "seed")
    procs, outs = _launch("seed", out, env_extra={"NH_TIMEOUT": "30"})
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    ref = seed_none_results(*problem(), seed=FIXED_SEED)  # one process, the broadcast seed
    other = seed_none_results(*problem(), seed=FIXED_SEED + 1)
    for key in ("trace", "diagonal", "early"):  # these numbers depend on the probes
        assert not torch.allclose(ref[key], other[key], rtol=1e-6), key
    for r in (0, 1):
        got = torch.load(f"{out}.{r}")
        for key, val in ref.items():
            torch.testing.assert_close(
                got[key], val, rtol=1e-10, atol=1e-12 * max(1.0, float(val.abs().max())), msg=f"rank {r}: {key}"
            )


def test_choices_from_local_timing_are_the_same_on_every_rank(tmp_path):
    """The GGN's batched-or-loop choice is timed on each rank; if ranks chose differently, one
    all-reduced k·P numbers while the other all-reduced P, and gloo aborted the process."""
    from dist_scenarios import block_product

    out = str(tmp_path / "choices")
    procs, outs = _launch("choices", out, env_extra={"NH_TIMEOUT": "30"})
    for r, (p, (o, e)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}: {e[-3000:]}"
    ref = block_product(*problem())
    got = [torch.load(f"{out}.{r}") for r in (0, 1)]
    assert bool(got[0]["batched"]) == bool(got[1]["batched"])
    for r in (0, 1):
        torch.testing.assert_close(got[r]["GV"], ref["GV"], rtol=1e-12, atol=1e-14 * float(ref["GV"].abs().max()))


def test_shard_slices_one_dict_batch_by_rows():
    """One Hugging Face-style dict batch is sliced along its rows (it used to yield its keys)."""
    ids = torch.arange(30).reshape(5, 6)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "flag": 3}
    parts = [nh.shard(batch, r, 2) for r in range(2)]
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(torch.cat([p[key] for p in parts]), batch[key])
    assert [p["input_ids"].shape[0] for p in parts] == [2, 3] and parts[1]["flag"] == 3
    # the cost over the shards, weighted by their predicted tokens, is the whole batch's
    loss = nh.losses.causal_lm()
    logits = torch.randn(5, 6, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    parts_cost = 0.0
    for a, p in zip([0, 2], parts):
        part_logits = logits[a : a + p["labels"].shape[0]]
        parts_cost += float(loss(part_logits, p["labels"])) * loss.term_count(part_logits, p["labels"])
    whole = float(loss(logits, ids)) * loss.term_count(logits, ids)
    assert parts_cost == pytest.approx(whole, rel=1e-12)
    with pytest.raises(nh.InputError, match="share a first"):
        nh.shard({"input_ids": ids, "labels": ids[:3]}, 0, 2)
    with pytest.raises(nh.InputError, match="every rank needs one"):
        nh.shard({"input_ids": ids[:1]}, 0, 2)
