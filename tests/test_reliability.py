"""Reliability: kill -9 and resume, divergence, determinism, two-process training, bad input
and damaged files.

The subprocess tests run ``python -m pqnet fit`` (and ``torchrun``) exactly as a user would,
single-threaded (``OMP_NUM_THREADS=1``) so that two runs do the same floating-point work.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import pqnet
from pqnet._io import load_json, save_json
from pqnet.cli import main
from pqnet.inference import DivergenceError, init_distributed
from pqnet.inference.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pqnet.inference.distributed import _step_health, _world
from pqnet.inference.fit import CHECKPOINT, CHECKPOINT_POSTERIOR, _broadcast

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONUNBUFFERED": "1"}
SMALL = TensorDataset(torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                      torch.arange(64) % 10)


def tiny_bnn() -> pqnet.BNN:
    torch.manual_seed(0)
    return pqnet.bayesian(pqnet.models.digits_cnn())


def tiny_fit(**kwargs) -> pqnet.Posterior:
    options = dict(epochs=2, batch_size=16, lr=1e-2, seed=0, progress=False) | kwargs
    return pqnet.fit(tiny_bnn(), SMALL, **options)


def assert_same_posterior(a: pqnet.Posterior, b: pqnet.Posterior) -> None:
    assert a.names == b.names
    for name in a.names:
        assert torch.equal(a.loc[name], b.loc[name]), name
        assert torch.equal(a.scale[name], b.scale[name]), name


# --------------------------------------------------------------------------- kill -9, resume

EPOCHS = 4
FIT = ["fit", "--model", "digits_cnn", "--data", "digits", "--epochs", str(EPOCHS),
       "--batch-size", "32", "--lr", "0.01", "--num-samples", "2", "--no-progress"]


MID_EPOCH_STEP = 3
"""The killed run stops at this step of its second epoch (digits: 45 steps an epoch)."""

# ``pqnet fit`` as a user runs it, plus one observer: a global optimizer step hook (public
# PyTorch API, no change to pqnet) that, at the MID_EPOCH_STEP-th step after the first
# checkpoint exists, prints a line and waits to be killed. The parent kills on that line,
# so the kill lands mid-epoch by construction, not by timing.
KILLED_CHILD = """
import sys, time
from pathlib import Path
from torch.optim.optimizer import register_optimizer_step_post_hook
from pqnet.cli import main
ckpt, stop = Path(sys.argv[1]), int(sys.argv[2])
after = 0
def observe(optimizer, args, kwargs):
    global after
    if (ckpt / "fit.pt").exists():
        after += 1
        if after == stop:
            print("mid-epoch", flush=True)
            time.sleep(600)
register_optimizer_step_post_hook(observe)
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, capsys):
    """Kill ``pqnet fit`` with SIGKILL part-way through an epoch, resume it in a new process:
    the posterior and every epoch's ELBO equal those of an uninterrupted fit bit for bit, and
    the resumed run starts at the epoch after the last checkpoint (at most one epoch lost)."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "killed"
    command = [sys.executable, "-m", "pqnet", *FIT, "--out", str(out), "--checkpoint-dir",
               str(ckpt)]
    killed = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(ckpt),
                               str(MID_EPOCH_STEP), *command[3:]], env=ENV, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = iter(killed.stdout.readline, "")  # until the child is mid-epoch (or ends)
        assert "mid-epoch\n" in lines, "the fit ended before its second epoch"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.stdout.close()
    assert killed.wait() == -signal.SIGKILL

    state = load_checkpoint(ckpt / CHECKPOINT, "fit")  # whole: the write is atomic
    done = state["epoch"]
    assert done == 1  # killed in epoch 2, at its step MID_EPOCH_STEP
    assert not (out / "posterior.pt").exists()
    assert len(pqnet.Posterior.load(ckpt / CHECKPOINT_POSTERIOR).history) in (done, done + 1)

    resumed = subprocess.Popen([*command, "--resume"], env=ENV, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses: the same floating-point work
    try:  # meanwhile, the uninterrupted fit, here
        assert main([*FIT, "--out", str(tmp_path / "whole")]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, stderr
    assert f"resumed from the checkpoint of epoch {done} in" in stdout

    reference = pqnet.Posterior.load(tmp_path / "whole" / "posterior.pt")
    posterior = pqnet.Posterior.load(out / "posterior.pt")
    assert_same_posterior(reference, posterior)
    assert [h["elbo"] for h in posterior.history] == [h["elbo"] for h in reference.history]
    # epochs 1..done are the killed run's own (their timings included): not trained again
    assert posterior.history[:done] == state["history"]
    assert posterior.config["resumed_from_epochs"] == [done]
    assert not list(ckpt.glob(".*.tmp"))  # a write cut by the kill leaves no litter behind


# --------------------------------------------------------------------------- two processes

DDP_TOLERANCE = 1e-4
"""Two processes against one on the same global batches: each weight tensor's means agree
to within this fraction of the distance the tensor moved in training (measured: ~5e-6,
float32 summation order). With the sampling noise made negligible (initial sigma 1e-8,
scale_lr 1e-9) the two fits differ only in how the gradient is summed; a wrong data-size
scaling, or dropping the shard weights ``c_r`` on the uneven last batch (1347 = 21 * 64 + 3,
shards of 2 and 1), moves them apart by 2-27 % instead."""


def test_two_process_gloo_fit_matches_one_process(tmp_path, capsys):
    args = ["fit", "--model", "digits_cnn", "--data", "digits", "--epochs", "2",
            "--kl-weight", "1", "--warm-start", "0",
            "--batch-size", "64", "--lr", "0.01", "--init-scale", "1e-8", "--scale-lr", "1e-9",
            "--num-samples", "2", "--no-progress"]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m", "pqnet", *args,
                            "--out", str(tmp_path / "two")], env=ENV, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # meanwhile, one process here
    stdout, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    assert stdout.count("random weights, 2 epochs") == 1  # process 0 alone reports

    one = pqnet.Posterior.load(tmp_path / "one" / "posterior.pt")
    parallel = pqnet.Posterior.load(tmp_path / "two" / "posterior.pt")
    assert parallel.config["world_size"] == 2 and one.config["world_size"] == 1
    torch.manual_seed(0)  # the CLI's initial weights
    start = pqnet.models.for_data("digits_cnn", (1, 8, 8), 10).state_dict()
    for name in one.names:
        moved = (one.loc[name] - start[name]).abs().max()
        gap = (parallel.loc[name] - one.loc[name]).abs().max()
        assert moved > 0.01 and gap <= DDP_TOLERANCE * moved, (name, float(gap / moved))
    for a, b in zip(one.history, parallel.history, strict=True):
        assert abs(a["elbo"] - b["elbo"]) <= DDP_TOLERANCE * abs(a["elbo"])


def _recipe_fit(checkpoint_dir: Path | None = None) -> pqnet.Posterior:
    """The default recipe (a warm start, the KL weight chosen on validation) on SMALL."""
    torch.manual_seed(0)
    bnn = pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    return pqnet.fit(bnn, SMALL, epochs=2, batch_size=15, progress=False,  # uneven shards
                     checkpoint_dir=checkpoint_dir)


def _join_two(rank: int, folder: str, port: int) -> None:
    """One of two processes (``torch.multiprocessing.spawn``): join the group as torchrun
    would describe it, then check one step's health collectively; report to ``folder``."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    joined = init_distributed()
    report = {"joined": [joined[0], joined[1], str(joined[2])],
              "again": [*init_distributed("cpu")[:2]], "world": [*_world()],
              "backend": torch.distributed.get_backend(), "broadcast": _broadcast(rank + 0.5)}
    inf_on_1 = math.inf if rank == 1 else 0.0
    for name, grad in [("finite", [1.0, -2.0]), ("inf on rank 1", [1.0, inf_on_1])]:
        p = nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor(grad)
        report[name] = _step_health(torch.tensor(float(rank + 1)), [p], 2)
    posterior = _recipe_fit(Path(folder) / "ckpt")
    report["fit"] = {"kl_weight": posterior.config["kl_weight"],
                     "warm_start_nll": posterior.config["warm_start_record"]["nll"],
                     "val_nll": posterior.config["temperature"]["val_nll"],
                     "loc": [v.tolist() for v in posterior.loc.values()]}
    torch.distributed.destroy_process_group()
    (Path(folder) / f"{rank}.json").write_text(json.dumps(report))


def test_two_processes_join_the_group_and_agree_on_a_steps_health(tmp_path, monkeypatch):
    """``init_distributed`` under torchrun's variables: rank, world size 2 and gloo on CPU,
    the same answer when called again; process 0's choice reaches both (``_broadcast``);
    ``_step_health`` averages the ranks' losses (1 and 2) and reports a gradient that is
    not finite on one rank to both; the default recipe (warm start, KL weight chosen on
    validation) trains data-parallel, and its checkpoint keeps both processes' generators.
    Without torchrun's variables, or with ``WORLD_SIZE=1``, no group is started."""
    for size in (None, "1"):
        if size is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", size)
        assert init_distributed() == (0, 1, torch.device("cpu"))
        assert not torch.distributed.is_initialized()
    alone = nn.Parameter(torch.zeros(1))
    alone.grad = torch.tensor([math.nan])
    assert _broadcast(0.25) == 0.25 and _step_health(torch.tensor(2.0), [alone], 1) == (2.0, False)
    alone = nn.Parameter(torch.zeros(2))
    alone.grad = torch.tensor([3e38, 3e38])  # finite, though its 2-norm is not
    assert _step_health(torch.tensor(2.0), [alone], 1) == (2.0, True)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(_join_two, args=(str(tmp_path), port), nprocs=2)
    one = _recipe_fit(tmp_path / "one-ckpt").config  # a checkpoint too, as in the processes
    fits = []
    for rank in range(2):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        fits.append(report.pop("fit"))
        assert report == {"joined": [rank, 2, "cpu"], "again": [rank, 2], "world": [rank, 2],
                          "backend": "gloo", "broadcast": 0.5, "finite": [1.5, True],
                          "inf on rank 1": [1.5, False]}
    # the default recipe data-parallel: every process ends with the same posterior; the warm
    # start (no weight draws) and the temperature's validation NLLs are one process's up to
    # rounding, and so is the KL weight chosen
    assert fits[0] == fits[1]
    rngs = load_checkpoint(tmp_path / "ckpt" / CHECKPOINT, "fit")["rng"]  # each process's
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    assert fits[0]["kl_weight"] == one["kl_weight"]
    record = one["warm_start_record"]
    assert record.keys() == {"epochs", "nll", "seconds"} and record["epochs"] == 1
    assert len(record["nll"]) == 1 and record["seconds"] > 0
    assert fits[0]["warm_start_nll"] == pytest.approx(one["warm_start_record"]["nll"], rel=1e-5)
    assert fits[0]["val_nll"] == pytest.approx(one["temperature"]["val_nll"], rel=1e-5)


# --------------------------------------------------------------------------- determinism


def test_same_seed_bit_identical_posterior_and_codes():
    """Run twice with the same seeds: the same posterior bit for bit and the same codes and
    codebooks from a stochastic quantizer (random-bits) and a seeded one (k-means++)."""
    runs = []
    for _ in range(2):
        posterior = tiny_fit(epochs=2)
        runs.append((posterior, [
            pqnet.quantize(posterior, "random-bits", data=SMALL, avg_bits=3.0, steps=5,
                           batch_size=32, seed=2),
            pqnet.quantize(posterior, "kmeans", k=8, init="k-means++", seed=3)]))
    (a, qa), (b, qb) = runs
    assert_same_posterior(a, b)
    for x, y in zip(qa, qb, strict=True):
        assert x.layers.keys() == y.layers.keys()
        for path in x.layers:
            lx, ly = x.layers[path], y.layers[path]
            assert torch.equal(lx.codes, ly.codes) and torch.equal(lx.bits, ly.bits)
            assert lx.codebooks.keys() == ly.codebooks.keys()
            assert all(torch.equal(lx.codebooks[w], ly.codebooks[w]) for w in lx.codebooks)


def test_rng_state_round_trip():
    state = rng_state()
    draws = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


# --------------------------------------------------------------------------- checkpoints


def test_resume_in_process(tmp_path):
    """A finished fit resumes to itself without training; resume=True with an empty folder
    starts afresh; checkpoint_dir changes nothing in the result; each file is versioned."""
    plain = tiny_fit(epochs=3)  # the default recipe: 1 warm-start epoch, 2 of SVI
    checkpointed = tiny_fit(epochs=3, checkpoint_dir=tmp_path)
    assert_same_posterior(plain, checkpointed)
    assert [h["elbo"] for h in plain.history] == [h["elbo"] for h in checkpointed.history]
    again = tiny_fit(epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert_same_posterior(plain, again)
    assert again.history == checkpointed.history and again.config["resumed_from_epochs"] == [2]
    assert again.config["temperature"] == plain.config["temperature"]  # kept, not redone
    fresh = tiny_fit(epochs=3, checkpoint_dir=tmp_path / "empty", resume=True)
    assert_same_posterior(plain, fresh)
    assert fresh.config["resumed_from_epochs"] == []
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert (state["format"], state["version"], state["kind"], state["epoch"]) == (
        "pqnet.checkpoint", 1, "fit", 2)
    last = pqnet.Posterior.load(tmp_path / CHECKPOINT_POSTERIOR)  # the last epoch's
    assert_same_posterior(plain, last)
    assert last.config == checkpointed.config and last.history == checkpointed.history


def test_resuming_a_finished_fit_reads_the_data_only_to_check_it(tmp_path):
    """The warm start and the temperature are kept in the checkpoint, not redone."""
    def fit(data, **kwargs):
        torch.manual_seed(0)
        bnn = pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
        return pqnet.fit(bnn, data, epochs=2, batch_size=16, progress=False,
                         checkpoint_dir=tmp_path, **kwargs)

    first, again = Recorded(), Recorded()
    done = fit(first)
    assert len(first.seen) > 2 * len(SMALL)  # checked, then a warm start and SVI
    assert_same_posterior(fit(again, resume=True), done)
    assert sorted(again.seen) == list(range(len(SMALL)))  # each example once: the check


def test_checkpoint_helper(tmp_path):
    path = tmp_path / "rounds.pt"
    assert load_checkpoint(path, "rounds") is None
    (tmp_path / ".rounds.pt.abc.tmp").write_bytes(b"left by a killed write")
    save_checkpoint(path, "rounds", {"round": 3, "values": torch.arange(4)})
    state = load_checkpoint(path, "rounds")
    assert state["round"] == 3 and torch.equal(state["values"], torch.arange(4))
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match=r"^path: .* is a 'rounds' checkpoint, not a 'fit'"):
        load_checkpoint(path, "fit")
    with pytest.raises(ValueError, match=r"^state: the keys \['kind'\] are reserved"):
        save_checkpoint(path, "rounds", {"kind": "x"})


# --------------------------------------------------------------------------- divergence


class LateOverflow(Dataset):
    """Regression data whose targets overflow from the second epoch on (``y * 1e25``
    squared is beyond float32): a finite, valid input that makes the ELBO infinite."""

    def __init__(self, n: int = 64) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
        self.y = self.x.sum(1, keepdim=True)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1  # fit reads each example once to check the data, once an epoch
        late = self.reads > 2 * len(self.x)
        return self.x[i], self.y[i] * 1e25 if late else self.y[i]


class OneBadBatch(LateOverflow):
    """The fourth batch (of 16) of the second epoch overflows, once: a glitch that a retry
    gets past. ``glitch=False``: the same data without it."""

    def __init__(self, glitch: bool = True) -> None:
        super().__init__()
        self.glitch = glitch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1  # once to check the data, then once an epoch
        bad = self.glitch and 2 * len(self.x) + 48 < self.reads <= 2 * len(self.x) + 64
        return self.x[i], self.y[i] * 1e25 if bad else self.y[i]


def test_a_retry_redoes_its_epoch_from_the_epochs_start():
    """A divergence at step 4 of epoch 2 goes back to the end of epoch 1 (not to step 3's
    state), with a learning rate 2^-20 lower: the fit ends where the fit without the glitch
    does, up to that change."""
    fits = []
    for data, retry in [(OneBadBatch(glitch=False), None), (OneBadBatch(), 1 - 2.0**-20)]:
        torch.manual_seed(0)
        fits.append(pqnet.fit(pqnet.bayesian(nn.Linear(4, 1), likelihood="normal"), data,
                              epochs=3, batch_size=16, kl_weight=1, warm_start=0,
                              retry_lr_factor=retry, progress=False))
    clean, retried = fits
    assert [(r["epoch"], r["step"]) for r in retried.config["retries"]] == [(2, 4)]
    for name in clean.names:
        torch.testing.assert_close(retried.loc[name], clean.loc[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(retried.scale[name], clean.scale[name], rtol=1e-4, atol=0)


def test_divergence_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
    bnn = pqnet.bayesian(nn.Linear(4, 1), likelihood="normal")
    with pytest.raises(DivergenceError, match=r"^fit: the ELBO became (nan|inf) at epoch 2, "
                       r"step 1 \(lr=[^)]*\); try a lower lr or a smaller init_scale; the "
                       f"checkpoint of epoch 1 in {re.escape(str(tmp_path))} is kept: rerun "
                       r"with resume=True and retry_lr_factor=0\.5 \(--resume "
                       r"--retry-lr-factor 0\.5\) to continue from it at a lower lr$") as err:
        pqnet.fit(bnn, LateOverflow(), epochs=3, batch_size=16, progress=False,
                  kl_weight=1, warm_start=0, checkpoint_dir=tmp_path)
    assert (err.value.epoch, err.value.step) == (2, 1)
    assert load_checkpoint(tmp_path / CHECKPOINT, "fit")["epoch"] == 1
    assert len(pqnet.Posterior.load(tmp_path / CHECKPOINT_POSTERIOR).history) == 1
    late_at_once = LateOverflow()
    late_at_once.reads = len(late_at_once)  # the first epoch after the resume overflows
    with pytest.raises(DivergenceError, match=r"at epoch 2, step 1 .*; the checkpoint of "
                       "epoch 1 in .* is kept"):  # the one resumed from
        pqnet.fit(bnn, late_at_once, epochs=3, batch_size=16, progress=False, kl_weight=1,
                  warm_start=0, checkpoint_dir=tmp_path, resume=True)


class RootAtZero(nn.Module):
    """``f + sqrt(0 * f)``: the value is ``f``, the gradient NaN (``inf * 0``)."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + (0 * f).sqrt()


def test_nonfinite_gradient_is_caught_before_the_step():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), RootAtZero())
    bnn = pqnet.bayesian(net)
    before = bnn.guide.loc_of("net.1.weight").detach().clone()
    with pytest.raises(DivergenceError, match=r"^fit: a gradient became NaN or inf at epoch 1, "
                       r"step 1 .*first in guide\.(loc|rho)\.net/1/(weight|bias)"):
        pqnet.fit(bnn, SMALL, epochs=1, kl_weight=1, warm_start=0, progress=False)
    assert torch.equal(bnn.guide.loc_of("net.1.weight"), before)  # no step was taken
    with pytest.raises(DivergenceError, match=r"^fit: a gradient became NaN or inf at epoch 1, "
                       r"step 1 .*first in guide\.loc\.net/1/(weight|bias)\) in the warm start"):
        pqnet.fit(bnn, SMALL, epochs=2, progress=False)


def test_retry_at_a_lower_learning_rate():
    """lr=1e8 diverges in the first steps; each retry goes back to the start of the epoch
    at 1e-5 times the learning rate, until one (lr <= 1e-2) trains."""
    posterior = tiny_fit(lr=1e8, warm_start=0, kl_weight=1, retry_lr_factor=1e-5,
                         max_retries=3)
    retries = posterior.config["retries"]
    assert 1 <= len(retries) <= 2
    for i, retry in enumerate(retries):
        assert retry["epoch"] == 1 and retry["step"] >= 1
        assert math.isclose(retry["lr"], 1e8 * 1e-5 ** (i + 1))
        assert math.isclose(retry["scale_lr"], 10 * retry["lr"])
    assert all(math.isfinite(h["elbo"]) for h in posterior.history)
    # one retry, at half the lr, and no second (cosine over 8 steps: step 2 at 0.962 lr)
    with pytest.raises(DivergenceError, match=r"at epoch 1, step 2 \(lr=4\.81e\+11\); gave up "
                                              r"after max_retries=1 retries"):
        tiny_fit(lr=1e12, warm_start=0, kl_weight=1, retry_lr_factor=0.5, max_retries=1)


def test_a_retry_is_the_epoch_started_again_at_the_lower_learning_rates():
    """lr 2^20 diverges at step 2; one retry at 2^-26 times both learning rates redoes the
    epoch from its start, bit for bit the fit that began at lr 2^-6 (powers of two: the
    products are exact)."""
    retried = tiny_fit(lr=2.0**20, warm_start=0, kl_weight=1, retry_lr_factor=2.0**-26,
                       max_retries=1)
    plain = tiny_fit(lr=2.0**-6, warm_start=0, kl_weight=1)
    assert retried.config["retries"] == [{"epoch": 1, "step": 2, "lr": 2.0**-6,
                                          "scale_lr": 10 * 2.0**-6}]
    assert_same_posterior(retried, plain)
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in p.history]
               for p in (retried, plain)]
    assert untimed[0] == untimed[1]


class TwoBranches(nn.Module):
    """``a(x) + RootAtZero(b(x))``: only branch ``b``'s gradients are NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.root = nn.Linear(64, 10), nn.Linear(64, 10), RootAtZero()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.root(self.b(x))


def test_divergence_names_the_first_nonfinite_gradient_and_what_to_do(tmp_path):
    """The message names the first parameter whose gradient is not finite (branch a's come
    first and are finite), and its advice fits what the call asked for."""
    bnn = pqnet.bayesian(nn.Sequential(nn.Flatten(), TwoBranches()))
    head = ("fit: a gradient became NaN or inf at epoch 1, step 1 (lr=0.001; first in "
            "guide.loc.net/1/b/bias); ")
    for kwargs, advice in [
        ({}, "try a lower lr or a smaller init_scale; pass checkpoint_dir= to keep each "
             "epoch's state, and retry_lr_factor= to retry an epoch at a lower lr"),
        ({"retry_lr_factor": 0.5, "max_retries": 0},
         "gave up after max_retries=0 retries at lower learning rates; pass checkpoint_dir= "
         "to keep each epoch's state"),
        ({"checkpoint_dir": tmp_path}, "try a lower lr or a smaller init_scale; no epoch "
                                       f"completed, so {tmp_path} holds no checkpoint"),
    ]:
        with pytest.raises(DivergenceError) as err:
            pqnet.fit(bnn, SMALL, epochs=1, kl_weight=1, warm_start=0, progress=False, **kwargs)
        assert str(err.value) == head + advice


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good, damaged and foreign files of each kind pqnet reads, and a finished fit's
    checkpoint folder."""
    folder = tmp_path_factory.mktemp("files")
    tiny_fit(epochs=1, checkpoint_dir=folder / "ckpt")
    posterior = tiny_fit(epochs=1)
    good = posterior.save(folder / "posterior.pt")
    paths = {"ckpt": folder / "ckpt", "posterior": good,
             "quantized": pqnet.quantize(posterior, "uniform", bits=4).save(folder / "q.pqn")}
    for name, data in [("truncated", good.read_bytes()[: len(good.read_bytes()) // 2]),
                       ("garbage", bytes(range(256)) * 8), ("empty", b"")]:
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(data)
    paths["version2"] = folder / "version2.pt"
    torch.save({**posterior.state(), "version": 2}, paths["version2"])
    corrupt = folder / "corrupt-ckpt"
    corrupt.mkdir()
    (corrupt / CHECKPOINT).write_bytes((folder / "ckpt" / CHECKPOINT).read_bytes()[:-100])
    paths["corrupt-ckpt"] = corrupt
    old = folder / "old-ckpt"
    old.mkdir()
    state = torch.load(folder / "ckpt" / CHECKPOINT, weights_only=False)
    torch.save({**state, "version": 0}, old / CHECKPOINT)
    paths["old-ckpt"] = old
    newer = folder / "newer-ckpt"  # written by a pqnet with one more setting
    newer.mkdir()
    torch.save({**state, "config": {**state["config"], "new_setting": 1}}, newer / CHECKPOINT)
    paths["newer-ckpt"] = newer
    paths["idx"] = folder / "labels-idx1-ubyte"
    paths["idx"].write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(7))
    paths["json"] = save_json({"a": 1}, folder / "m.json", "pqnet.other", 1)
    paths["a-file"] = folder / "a-file"
    paths["a-file"].write_text("x")
    return paths


def _fit_small(**kwargs):
    return pqnet.fit(tiny_bnn(), SMALL, **(dict(epochs=1, batch_size=16, progress=False)
                                           | kwargs))


class Unsized(Dataset):
    def __getitem__(self, i):
        return SMALL[i]


class NaNLater(Dataset):
    """Example 280 is NaN: beyond the first 256 that fit checks up front, so only the
    per-batch check of a Dataset that is not in memory sees it."""

    def __len__(self):
        return 300

    def __getitem__(self, i):
        x, y = SMALL[i % len(SMALL)]
        return (x * math.nan if i == 280 else x), y


class FloatLabelsLater(Dataset):
    """Examples from 256 on have float labels: beyond what fit checks up front, a batch
    that holds one has float labels (collation promotes)."""

    def __len__(self):
        return 300

    def __getitem__(self, i):
        x, y = SMALL[i % len(SMALL)]
        return x, (y.float() if i >= 256 else y)


class Recorded(Dataset):
    """SMALL, remembering which examples were read, in order."""

    def __init__(self):
        self.seen = []

    def __len__(self):
        return len(SMALL)

    def __getitem__(self, i):
        self.seen.append(i)
        return SMALL[i]


def test_each_epoch_visits_every_example_once_in_a_new_random_order():
    """Also with batches of one example (as many as one process needs)."""
    for batch_size in (8, 1):
        data = Recorded()
        bnn = pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
        pqnet.fit(bnn, data, epochs=2, batch_size=batch_size, kl_weight=1, warm_start=0,
                  progress=False)
        epochs = [data.seen[-128:-64], data.seen[-64:]]  # the last two passes: the epochs
        for order in epochs:
            assert sorted(order) == list(range(64)) and order != sorted(order)
        assert epochs[0] != epochs[1]


BAD_INPUT = [
    # (id, call, exception, message pattern: it starts with the argument's name)
    ("bnn", lambda f: pqnet.fit(nn.Linear(2, 2), SMALL), TypeError, r"^bnn: expected a pqnet"),
    ("int inputs", lambda f: pqnet.fit(tiny_bnn(), TensorDataset(
        torch.zeros(8, 1, 8, 8, dtype=torch.long), torch.zeros(8).long())), ValueError,
     r"^train_dataset: inputs must be floating point"),
    ("wrong shape", lambda f: pqnet.fit(tiny_bnn(), TensorDataset(
        torch.randn(8, 3, 8, 8), torch.zeros(8).long())), ValueError,
     r"^train_dataset: inputs of shape \(3, 8, 8\) do not fit"),
    ("inf inputs", lambda f: pqnet.fit(tiny_bnn(), TensorDataset(
        torch.full((8, 1, 8, 8), math.inf), torch.zeros(8).long())), ValueError,
     r"^train_dataset: inputs contain NaN or inf"),
    ("NaN in a later batch", lambda f: pqnet.fit(tiny_bnn(), NaNLater(), epochs=1,
                                                 batch_size=32, progress=False), ValueError,
     r"^train_dataset: inputs contain NaN or inf"),
    ("float labels in a later batch", lambda f: pqnet.fit(  # SVI's own check, no Fisher pass
        tiny_bnn(), FloatLabelsLater(), epochs=1, batch_size=32, kl_weight=1, warm_start=0,
        progress=False), ValueError,
     r"^train_dataset: class labels must be a 1-d integer tensor, got torch\.float32"),
    ("labels out of range", lambda f: pqnet.fit(tiny_bnn(), TensorDataset(
        torch.randn(8, 1, 8, 8), torch.full((8,), -1))), ValueError,
     r"^train_dataset: labels must lie in \[0, 10\)"),
    ("empty dataset", lambda f: pqnet.fit(tiny_bnn(), TensorDataset(
        torch.randn(0, 1, 8, 8), torch.zeros(0).long())), ValueError,
     r"^train_dataset: the dataset is empty"),
    ("unsized dataset", lambda f: pqnet.fit(tiny_bnn(), Unsized()), TypeError,
     r"^train_dataset: expected a sized torch Dataset"),
    ("seed", lambda f: _fit_small(seed="0"), ValueError, r"^seed: expected an int"),
    ("epochs", lambda f: _fit_small(epochs=1.5), ValueError, r"^epochs: expected a positive"),
    ("num_particles", lambda f: _fit_small(num_particles=0), ValueError, r"^num_particles:"),
    ("scale_lr", lambda f: _fit_small(scale_lr=-1.0), ValueError, r"^scale_lr: expected"),
    ("warmup_epochs", lambda f: _fit_small(warmup_epochs=-1), ValueError,
     r"^warmup_epochs:"),
    ("checkpoint_dir is a file", lambda f: _fit_small(checkpoint_dir=f["a-file"]),
     ValueError, r"^checkpoint_dir: .*a-file is a file; expected a folder"),
    ("checkpoint_dir type", lambda f: _fit_small(checkpoint_dir=3), TypeError,
     r"^checkpoint_dir: expected a folder path"),
    ("resume without a folder", lambda f: _fit_small(resume=True), ValueError,
     r"^resume: needs checkpoint_dir"),
    ("resume type", lambda f: _fit_small(checkpoint_dir=f["ckpt"], resume="yes"),
     ValueError, r"^resume: expected True or False"),
    ("overwrite a checkpoint", lambda f: _fit_small(checkpoint_dir=f["ckpt"]), ValueError,
     r"^checkpoint_dir: .* already holds a fit's checkpoint .*pass resume=True"),
    ("resume other settings", lambda f: _fit_small(checkpoint_dir=f["ckpt"], resume=True,
                                                   lr=0.5), ValueError,
     r"^checkpoint_dir: .*ckpt[/\\]fit\.pt is the checkpoint of a different fit \(lr 0\.01 "
     r"there, 0\.5 here\)"),
    ("resume other data", lambda f: pqnet.fit(
        tiny_bnn(), TensorDataset(SMALL.tensors[0][:32], SMALL.tensors[1][:32]), epochs=1,
        batch_size=16, lr=1e-2, progress=False, checkpoint_dir=f["ckpt"], resume=True),
     ValueError, r"^checkpoint_dir: .* a different fit \(dataset_size 64 there, 32 here\)"),
    ("resume other network", lambda f: pqnet.fit(
        pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), SMALL, epochs=1,
        batch_size=16, lr=1e-2, progress=False, checkpoint_dir=f["ckpt"], resume=True),
     ValueError, r"^checkpoint_dir: the checkpoint's network does not match bnn"),
    ("resume with one setting more", lambda f: _fit_small(checkpoint_dir=f["newer-ckpt"],
                                                          resume=True, lr=1e-2), ValueError,
     r"^checkpoint_dir: .* a different fit \(new_setting 1 there, None here\)"),
    ("truncated checkpoint", lambda f: _fit_small(checkpoint_dir=f["corrupt-ckpt"],
                                                  resume=True), ValueError,
     r"^checkpoint_dir: .*fit\.pt is not a readable pqnet checkpoint \(corrupt or truncated"),
    ("old checkpoint", lambda f: _fit_small(checkpoint_dir=f["old-ckpt"], resume=True),
     ValueError, r"^checkpoint_dir: .*fit\.pt has checkpoint format version 0; this pqnet "
     r"reads version 1"),
    ("retry_lr_factor 1.5", lambda f: _fit_small(retry_lr_factor=1.5), ValueError,
     r"^retry_lr_factor: expected a number in \(0, 1\)"),
    ("retry_lr_factor nan", lambda f: _fit_small(retry_lr_factor=math.nan), ValueError,
     r"^retry_lr_factor: expected a number in \(0, 1\)"),
    ("max_retries", lambda f: _fit_small(max_retries=-1), ValueError,
     r"^max_retries: expected a non-negative int"),
    ("device name", lambda f: _fit_small(device="gpu0"), ValueError, r"^device:"),
    ("device for processes", lambda f: pqnet.inference.init_distributed("tpu"), ValueError,
     r"^device:"),
    ("dataset name", lambda f: pqnet.data.load("imagenet"), ValueError,
     r"^name: unknown dataset 'imagenet'"),
    ("dataset labels", lambda f: pqnet.data.TensorData(
        torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 5]), name="t", num_classes=3),
     ValueError, r"^y: labels must lie in \[0, 3\)"),
    ("dataset shape", lambda f: pqnet.data.TensorData(
        torch.randn(4, 2, 2), torch.zeros(4).long(), name="t", num_classes=3),
     ValueError, r"^x: expected a 4-D tensor"),
    ("model name", lambda f: pqnet.models.get("resnet1000"), ValueError,
     r"^model: unknown model 'resnet1000'"),
    ("method name", lambda f: pqnet.quantize(pqnet.Posterior.load(f["posterior"]), "magic"),
     ValueError, r"^method: unknown quantizer 'magic'"),
    ("budget", lambda f: pqnet.quantize(pqnet.Posterior.load(f["posterior"]),
                                        "quantile-inform", avg_bits=0.5), ValueError,
     r"^avg_bits: expected a finite number of bits per weight >= 1"),
    ("bits", lambda f: pqnet.quantize(pqnet.Posterior.load(f["posterior"]), "uniform",
                                      bits=9), ValueError, r"^bits: expected an integer"),
    ("predict dtype", lambda f: pqnet.predict(pqnet.Posterior.load(f["posterior"]),
                                              torch.zeros(2, 1, 8, 8, dtype=torch.long)),
     ValueError, r"^x: expected a floating-point tensor"),
    ("truncated posterior", lambda f: pqnet.Posterior.load(f["truncated"]), ValueError,
     r"^path: .*truncated\.pt is not a readable pqnet posterior \(corrupt or truncated"),
    ("garbage posterior", lambda f: pqnet.Posterior.load(f["garbage"]), ValueError,
     r"^path: .*garbage\.pt is not a readable pqnet posterior"),
    ("empty posterior", lambda f: pqnet.Posterior.load(f["empty"]), ValueError,
     r"^path: .*empty\.pt is not a readable pqnet posterior"),
    ("posterior version", lambda f: pqnet.Posterior.load(f["version2"]), ValueError,
     r"^path: .*version2\.pt has posterior format version 2; this pqnet reads version 1"),
    ("quantized net from a posterior", lambda f: pqnet.QuantizedNet.load(f["posterior"]),
     ValueError, r"^path: .*posterior\.pt is not a readable pqnet quantized network: not a pqnet "
     "quantized-network file"),
    ("truncated quantized net", lambda f: pqnet.QuantizedNet.load(f["truncated"]), ValueError,
     r"^path: .*truncated\.pt is not a readable pqnet quantized network"),
    ("posterior from a quantized net", lambda f: pqnet.Posterior.load(f["quantized"]),
     ValueError, r"^path: .*q\.pqn is not a readable pqnet posterior"),
    ("missing posterior", lambda f: pqnet.Posterior.load(f["ckpt"] / "nope.pt"),
     FileNotFoundError, r"^path: no posterior file at"),
    ("truncated IDX", lambda f: pqnet.data.read_idx(f["idx"]), ValueError,
     r"^path: .*labels-idx1-ubyte: truncated or corrupt IDX file; shape \(10,\)"),
    ("JSON of another format", lambda f: load_json(f["json"], "run metrics",
                                                   "pqnet.run-metrics", 1), ValueError,
     r"^path: .*m\.json is not a pqnet run metrics file"),
    ("checkpoint of another kind", lambda f: load_checkpoint(f["ckpt"] / CHECKPOINT, "pwfn"),
     ValueError, r"^path: .*fit\.pt is a 'fit' checkpoint, not a 'pwfn' one"),
]
if not torch.cuda.is_available():
    BAD_INPUT.append(("no CUDA", lambda f: _fit_small(device="cuda"), ValueError,
                      r"^device: CUDA was asked for but torch\.cuda\.is_available\(\) is False"))


@pytest.mark.parametrize(("call", "error", "match"), [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_named(files, call, error, match):
    with pytest.raises(error, match=match):
        call(files)


def test_bad_input_leaves_the_checkpoint_as_it_was(files):
    before = (files["ckpt"] / CHECKPOINT).read_bytes()
    for case in BAD_INPUT:
        if "checkpoint" in case[0] or "resume" in case[0]:
            with pytest.raises(case[2]):
                case[1](files)
    assert (files["ckpt"] / CHECKPOINT).read_bytes() == before


@pytest.mark.parametrize(("argv", "match"), [
    (["--resume"], "--resume: needs checkpoint_dir"),
    (["--retry-lr-factor", "2"], r"--retry-lr-factor: expected a number in \(0, 1\)"),
    (["--max-retries", "-2"], "--max-retries: expected a non-negative int"),
    (["--checkpoint-dir", "{a-file}"], "--checkpoint-dir: .* is a file"),
    (["--device", "quantum"], "--device: 'quantum' is not a torch device"),
])
def test_cli_names_the_bad_option(files, capsys, argv, match):
    argv = [a.format(**{"a-file": files["a-file"]}) for a in argv]
    assert main(["fit", "--model", "digits_cnn", "--data", "digits", "--epochs", "1",
                 "--out", str(files["a-file"].parent / "cli-run"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pqnet fit: error: ") and re.search(match, err), err


def test_versioned_json(tmp_path):
    path = save_json({"model": "m"}, tmp_path / "metrics.json", "pqnet.run-metrics", 1)
    assert load_json(path, "run metrics", "pqnet.run-metrics", 1) == {
        "format": "pqnet.run-metrics", "version": 1, "model": "m"}
    save_json({"model": "m"}, path, "pqnet.run-metrics", 7)
    with pytest.raises(ValueError, match=r"^path: .* has run metrics format version 7"):
        load_json(path, "run metrics", "pqnet.run-metrics", 1)
    path.write_text('{"format": "pqnet.run-metr')
    with pytest.raises(ValueError, match=r"^path: .* is not a readable pqnet run metrics"):
        load_json(path, "run metrics", "pqnet.run-metrics", 1)


# --------------------------------------------------------------------------- damaged bytes

PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
IDX_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_bytes(code: int, shape: tuple[int, ...], seed: int) -> tuple[bytes, np.ndarray]:
    data = np.random.default_rng(seed).integers(-100, 100, size=shape).astype(IDX_CODES[code])
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) \
        + data.tobytes(), data


@PROPERTY
@given(raw=st.binary(max_size=300), gz=st.booleans())
def test_read_idx_random_bytes(tmp_path, raw, gz):
    """Any bytes: an array of the declared shape, or a ValueError naming the file."""
    path = tmp_path / ("f-idx.gz" if gz else "f-idx")
    path.write_bytes(raw)
    try:
        out = pqnet.data.read_idx(path)
    except ValueError as err:
        assert str(err).startswith(f"path: {path}: ")
    else:
        assert raw[:2] == b"\0\0" and out.ndim == raw[3]


@PROPERTY
@given(code=st.sampled_from(sorted(IDX_CODES)),
       shape=st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple),
       seed=st.integers(0, 2**16), cut=st.floats(0, 1, exclude_max=True), gz=st.booleans())
def test_read_idx_round_trip_and_every_truncation(tmp_path, code, shape, seed, cut, gz):
    raw, data = _idx_bytes(code, shape, seed)
    if gz:
        raw = gzip.compress(raw)
    path = tmp_path / ("g-idx.gz" if gz else "g-idx")
    path.write_bytes(raw)
    np.testing.assert_array_equal(pqnet.data.read_idx(path), data)
    path.write_bytes(raw[:int(cut * len(raw))])
    with pytest.raises(ValueError, match=r"^path: "):
        pqnet.data.read_idx(path)
    path.write_bytes(raw + b"\0" if not gz else gzip.compress(gzip.decompress(raw) + b"\0"))
    with pytest.raises(ValueError, match=r"^path: .*truncated or corrupt"):
        pqnet.data.read_idx(path)  # a trailing byte is corruption too


READERS = {"posterior": pqnet.Posterior.load, "quantized": pqnet.QuantizedNet.load,
           "checkpoint": lambda path: load_checkpoint(path, "fit")}


@PROPERTY
@given(reader=st.sampled_from(sorted(READERS)), raw=st.binary(min_size=1, max_size=3000))
def test_file_readers_refuse_random_bytes(tmp_path, reader, raw):
    path = tmp_path / "random.pt"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=r"^path: "):
        READERS[reader](path)


@PROPERTY
@given(reader=st.sampled_from(sorted(READERS)), cut=st.floats(0, 1, exclude_max=True))
def test_file_readers_refuse_truncated_files(tmp_path, files, reader, cut):
    good = {"posterior": files["posterior"], "quantized": files["quantized"],
            "checkpoint": files["ckpt"] / CHECKPOINT}[reader].read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(good[:max(1, int(cut * len(good)))])
    with pytest.raises(ValueError, match=r"^path: .* is not a readable pqnet"):
        READERS[reader](path)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_end_to_end(tmp_path, capsys):
    """``--device cuda``: fit with checkpoints, resume, then evaluate and quantize the saved
    posterior on the CPU."""
    args = ["fit", "--model", "digits_cnn", "--data", "digits", "--epochs", "2",
            "--num-samples", "2", "--device", "cuda", "--checkpoint-dir",
            str(tmp_path / "ckpt"), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0
    assert "resumed from the checkpoint of epoch 2" in capsys.readouterr().out
    posterior = pqnet.Posterior.load(tmp_path / "run" / "posterior.pt")
    assert posterior.config["device"].startswith("cuda")
    _, test = pqnet.data.load("digits")
    assert pqnet.evaluate(posterior, test, num_samples=2)["accuracy"] > 0.5
    qnet = pqnet.quantize(posterior, "uniform", bits=4)
    assert pqnet.evaluate(qnet.to_module(), test)["accuracy"] > 0.5
