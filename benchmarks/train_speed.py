"""Training speed of pqnet's BNN against plain PyTorch and bayesian-torch (issues 2, 12).

What is measured
----------------
LeNet-5 (:func:`pqnet.models.lenet5`) on MNIST read by ``pqnet.data.load("mnist", root=DIR)``
(the 5k training subset when only that is present; the official 10k test set), trained in
one process, on the same minibatches in the same order (one ``torch.Generator`` seeded with
``--seed``, a fresh permutation per epoch, ``--batch-size`` examples a batch: the order
:func:`pqnet.fit` uses), for ``--epochs`` epochs, with Adam at ``--lr``:

(a) **plain**: the deterministic net, cross-entropy loss, cosine schedule (as pqnet's);
(b) **pqnet**: ``pqnet.fit(pqnet.bayesian(lenet5()), train, epochs=, batch_size=, lr=,
    seed=)``: its defaults (a warm start of half the epochs, the KL weight chosen on a
    validation tenth of the training data, then SVI with the closed-form KL and local
    reparameterisation). Its SVI epoch seconds are ``posterior.history[i]["seconds"]``;
    the whole call is timed too;
(c) **bayesian-torch**: ``dnn_to_bnn(lenet5(), Flipout, prior N(0, 1), mu_init 0,
    rho_init -3)``, loss = CE + KL / N per batch, as in bayesian-torch's README.

Timing: torch's own thread settings (what users run with); ``OMP_WAIT_POLICY`` and
``--threads`` are recorded and may be set for a comparison. Each method first runs a short
warm-up (one epoch on ``WARMUP_EXAMPLES`` examples) that is discarded. Seconds per epoch is
the mean over epochs 2..E of each loop (pqnet: its SVI epochs); the median is shown too. A
step is the same work in every loop: slice the batch, zero the gradients, loss, backward,
Adam step, ``loss.item()``. Ratios are pqnet SVI epoch / plain epoch and bayesian-torch /
plain, and pqnet's whole ``fit()`` call / (epochs x plain epoch).

``--profile`` adds the step profile: milliseconds per step of the plain net, of pqnet's
loss (:class:`pqnet.inference.elbo.MeanFieldELBO`) and of Pyro's
:class:`~pyro.infer.TraceMeanField_ELBO` on the same BNN (the reference the fast loss is
tested against, and what ``fit`` ran before), split into forward+loss, backward and Adam.

Quality on the test set: accuracy, NLL and ECE (15 bins) of the predictive mean. The plain
net is one network; pqnet's posterior and the bayesian-torch net average the softmax of
``--num-samples`` weight draws.

Targets (reported, not asserted): pqnet's SVI epoch <= 2.0x the plain one; the BNN's
accuracy >= plain - 0.3 pp and its ECE <= plain's.

    python benchmarks/train_speed.py --data-dir ../shared/data/mnist --profile --json OUT
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F

import pqnet
from pqnet._io import save_json
from pqnet.diagnostics.metrics import classification_metrics, entropy
from pqnet.inference.batching import batches

WARMUP_EXAMPLES = 640
SPEED_TARGET = 2.0  # pqnet epoch / plain epoch
ACCURACY_MARGIN = 0.003  # the BNN may be this much (0.3 pp) below the plain net


def epoch_order(seed: int) -> torch.Generator:
    """The generator that fixes the batch order; pqnet.fit seeds its own the same way."""
    return torch.Generator().manual_seed(seed)


def steady_mean(seconds: list[float]) -> float:
    """Mean seconds per epoch, leaving out epoch 1 (unless it is the only one)."""
    return statistics.fmean(seconds[1:] or seconds)


# --------------------------------------------------------------------------- (a) plain


def timed_epochs(net, train, loss_fn, epochs: int, batch_size: int, lr: float,
                 seed: int, cosine: bool = False) -> list[float]:
    """Train ``net`` with Adam on ``loss_fn(net, x, y)`` over pqnet.fit's batches; return the
    seconds of each epoch. ``loss.item()`` each step, as pqnet.fit does, so both pay it."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    total = epochs * -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)) if cosine else 1.0)
    order = epoch_order(seed)
    seconds = []
    net.train()
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in batches(train, batch_size, generator=order):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net, x, y)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss.item()
        seconds.append(time.perf_counter() - start)
    net.eval()
    return seconds


def train_plain(train, epochs: int, batch_size: int, lr: float, seed: int):
    """Adam + cross-entropy on the deterministic LeNet-5, cosine schedule; returns (net,
    seconds per epoch)."""
    torch.manual_seed(seed)
    net = pqnet.models.lenet5()
    seconds = timed_epochs(net, train, lambda net, x, y: F.cross_entropy(net(x), y), epochs,
                           batch_size, lr, seed, cosine=True)
    return net, seconds


# --------------------------------------------------------------------------- (b) pqnet


def train_pqnet(train, epochs: int, batch_size: int, lr: float, seed: int):
    """pqnet's BNN from the same initial weights, fit's defaults; returns (posterior, SVI
    seconds per epoch, whole call)."""
    torch.manual_seed(seed)
    bnn = pqnet.bayesian(pqnet.models.lenet5())
    start = time.perf_counter()
    posterior = pqnet.fit(bnn, train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          progress=False)
    call = time.perf_counter() - start
    return posterior, [h["seconds"] for h in posterior.history], call


# --------------------------------------------------------------------------- (c) bayesian-torch


def bayesian_torch_available() -> str | None:
    """None when bayesian-torch imports, else the reason it does not."""
    try:
        import bayesian_torch.models.dnn_to_bnn  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"{type(err).__name__}: {err}"
    return None


def train_bayesian_torch(train, epochs: int, batch_size: int, lr: float, seed: int):
    """Flipout LeNet-5 by bayesian-torch's dnn_to_bnn; returns (net, seconds per epoch)."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss

    torch.manual_seed(seed)
    net = pqnet.models.lenet5()
    dnn_to_bnn(net, {
        "prior_mu": 0.0, "prior_sigma": 1.0, "posterior_mu_init": 0.0,
        "posterior_rho_init": -3.0, "type": "Flipout", "moped_enable": False,
    })
    n = len(train)
    seconds = timed_epochs(net, train,
                           lambda net, x, y: F.cross_entropy(net(x), y) + get_kl_loss(net) / n,
                           epochs, batch_size, lr, seed)
    return net, seconds


@torch.no_grad()
def evaluate_stochastic(net, test, num_samples: int, seed: int, batch_size: int = 1000) -> dict:
    """Metrics of the mean softmax of ``num_samples`` stochastic forward passes over ``test``.

    Flipout layers draw fresh weight noise on every forward call, in eval mode too, so each
    pass over the whole test set is one posterior draw per batch.
    """
    torch.manual_seed(seed)
    labels = test.y
    probs = torch.zeros(len(labels), 10)
    sample_entropy = torch.zeros(len(labels))
    for _ in range(num_samples):
        p = torch.cat([net(x).softmax(-1) for x, _ in batches(test, batch_size, shuffle=False)])
        probs += p
        sample_entropy += entropy(p)
    out = classification_metrics(probs / num_samples, labels, sample_entropy / num_samples)
    out["num_samples"] = num_samples
    return out


# --------------------------------------------------------------------------- step profile


def step_profile(train, batch_size: int, lr: float, steps: int = 200) -> dict:
    """Milliseconds per step, split into forward+loss, backward and Adam, of the plain
    LeNet-5, pqnet's MeanFieldELBO and Pyro's TraceMeanField_ELBO on the same BNN and the
    same batch (medians over ``steps`` steps after 20 discarded)."""
    import pyro
    from pyro.infer import TraceMeanField_ELBO

    from pqnet.inference.elbo import MeanFieldELBO

    x, y = train.x[:batch_size], train.y[:batch_size]
    n = len(train)

    def plain():
        torch.manual_seed(0)
        net = pqnet.models.lenet5()
        return net.parameters(), lambda: F.cross_entropy(net(x), y)

    def bnn_loss(make):
        torch.manual_seed(0)
        bnn = pqnet.bayesian(pqnet.models.lenet5())
        bnn.kl_weight = 0.01
        loss = make(bnn)
        return bnn.parameters(), lambda: loss(x, y, dataset_size=n)

    loops = {"plain": plain(), "pqnet MeanFieldELBO": bnn_loss(MeanFieldELBO),
             "Pyro TraceMeanField_ELBO": bnn_loss(lambda b: TraceMeanField_ELBO()(b, b.guide))}
    profile = {}
    with pyro.validation_enabled(False):
        for name, (params, loss_fn) in loops.items():
            optimizer = torch.optim.Adam(params, lr=lr)
            parts = {"forward": [], "backward": [], "adam": []}
            for i in range(steps + 20):
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn()
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                optimizer.step()
                loss.item()
                t3 = time.perf_counter()
                if i >= 20:
                    for part, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                        parts[part].append(1e3 * dt)
            profile[name] = {part: statistics.median(v) for part, v in parts.items()}
            profile[name]["step"] = sum(profile[name].values())
    base = profile["plain"]["step"]
    print(f"\nstep profile (ms, medians of {steps} steps, batch {batch_size}):")
    print(f"{'loop':<26}{'forward':>9}{'backward':>10}{'adam':>8}{'step':>8}{'x plain':>9}")
    for name, p in profile.items():
        print(f"{name:<26}{p['forward']:>9.2f}{p['backward']:>10.2f}{p['adam']:>8.2f}"
              f"{p['step']:>8.2f}{p['step'] / base:>9.2f}")
    return profile


# --------------------------------------------------------------------------- driver


def warm_up(train, batch_size: int, lr: float, seed: int, with_bayesian_torch: bool) -> None:
    """One short epoch of each method, so that first-call costs stay out of the timings."""
    subset = torch.utils.data.TensorDataset(train.x[:WARMUP_EXAMPLES], train.y[:WARMUP_EXAMPLES])
    train_plain(subset, 1, batch_size, lr, seed)
    train_pqnet(subset, 1, batch_size, lr, seed)
    if with_bayesian_torch:
        train_bayesian_torch(subset, 1, batch_size, lr, seed)


def row(name: str, seconds: list[float], metrics: dict, plain_epoch: float, **extra) -> dict:
    epoch = steady_mean(seconds)
    return dict(name=name, seconds_per_epoch=epoch,
                median_seconds_per_epoch=statistics.median(seconds[1:] or seconds),
                first_epoch_seconds=seconds[0],
                total_seconds=sum(seconds), ratio_to_plain=epoch / plain_epoch,
                epoch_seconds=seconds, **extra,
                **{k: metrics[k] for k in ("accuracy", "nll", "ece", "num_samples")})


def print_table(rows: list[dict], skipped: dict[str, str]) -> None:
    head = (f"{'method':<16}{'s/epoch':>9}{'median':>9}{'x plain':>9}{'epoch 1':>9}{'total s':>9}"
            f"{'acc %':>8}{'NLL':>8}{'ECE %':>8}{'draws':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<16}{r['seconds_per_epoch']:>9.3f}{r['median_seconds_per_epoch']:>9.3f}"
              f"{r['ratio_to_plain']:>9.2f}"
              f"{r['first_epoch_seconds']:>9.3f}{r['total_seconds']:>9.2f}"
              f"{100 * r['accuracy']:>8.2f}{r['nll']:>8.4f}{100 * r['ece']:>8.2f}"
              f"{r['num_samples']:>7}")
    for name, why in skipped.items():
        print(f"{name:<16}skipped: {why}")


def check_targets(rows: dict[str, dict]) -> dict:
    plain, bnn = rows["plain"], rows["pqnet"]
    targets = {
        "speed": dict(target=f"pqnet <= {SPEED_TARGET}x plain", value=bnn["ratio_to_plain"],
                      met=bnn["ratio_to_plain"] <= SPEED_TARGET),
        "accuracy": dict(target="pqnet >= plain - 0.3 pp",
                         value=bnn["accuracy"] - plain["accuracy"],
                         met=bnn["accuracy"] >= plain["accuracy"] - ACCURACY_MARGIN),
        "ece": dict(target="pqnet ECE <= plain ECE", value=bnn["ece"] - plain["ece"],
                    met=bnn["ece"] <= plain["ece"]),
    }
    print("\ntargets (reported, not asserted):")
    print(f"  speed     pqnet / plain = {bnn['ratio_to_plain']:.2f}x "
          f"(target <= {SPEED_TARGET}x): {'met' if targets['speed']['met'] else 'MISSED'}")
    print(f"  accuracy  pqnet - plain = {100 * targets['accuracy']['value']:+.2f} pp "
          f"(target >= -0.30 pp): {'met' if targets['accuracy']['met'] else 'MISSED'}")
    print(f"  ECE       pqnet - plain = {100 * targets['ece']['value']:+.2f} pp "
          f"(target <= 0): {'met' if targets['ece']['met'] else 'MISSED'}")
    return targets


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist",
                        help="folder of MNIST IDX files (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=32,
                        help="weight draws for the BNNs' test metrics (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="also the per-step profile")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write all figures here")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "num_samples", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default)")
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"warning: load average {load_before[0]:.2f} before the run: other processes "
              "share these cores, so the seconds below are inflated and noisy")
    train, test = pqnet.data.load("mnist", root=args.data_dir)
    print(train.note)
    print(f"LeNet-5, {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, "
          f"seed {args.seed}, {torch.get_num_threads()} threads "
          f"(OMP_WAIT_POLICY {wait_policy}), torch {torch.__version__}\n")
    skipped: dict[str, str] = {}
    why = bayesian_torch_available()
    if why is not None:
        skipped["bayesian-torch"] = f"not importable ({why})"
    common = (args.epochs, args.batch_size, args.lr, args.seed)

    warm_up(train, args.batch_size, args.lr, args.seed, "bayesian-torch" not in skipped)

    plain_net, plain_s = train_plain(train, *common)
    plain_epoch = steady_mean(plain_s)
    rows = {"plain": row("plain", plain_s, pqnet.evaluate(plain_net, test), plain_epoch)}

    posterior, pqnet_s, call = train_pqnet(train, *common)
    metrics = pqnet.evaluate(posterior, test, num_samples=args.num_samples, seed=args.seed)
    rows["pqnet"] = row("pqnet", pqnet_s, metrics, plain_epoch, call_seconds=call,
                        call_seconds_per_epoch=call / args.epochs,
                        call_ratio_to_plain=call / (args.epochs * plain_epoch),
                        kl_weight=posterior.config["kl_weight"],
                        warm_start_epochs=posterior.config["warm_start"])

    if "bayesian-torch" not in skipped:
        bt_net, bt_s = train_bayesian_torch(train, *common)
        metrics = evaluate_stochastic(bt_net, test, args.num_samples, args.seed)
        rows["bayesian-torch"] = row("bayesian-torch", bt_s, metrics, plain_epoch,
                                     version=version("bayesian-torch"))

    print_table(list(rows.values()), skipped)
    which = f"epochs 2..{args.epochs}" if args.epochs > 1 else "the only epoch"
    print(f"\ns/epoch: mean over {which} after a discarded warm-up (pqnet: its "
          f"{len(pqnet_s)} SVI epochs); pqnet's whole fit() call took {call:.2f} s, "
          f"{rows['pqnet']['call_ratio_to_plain']:.2f}x {args.epochs} plain epochs "
          f"(KL weight {posterior.config['kl_weight']:g} chosen on validation)")
    targets = check_targets(rows)
    profile = step_profile(train, args.batch_size, args.lr) if args.profile else None

    result = dict(
        benchmark="train_speed", date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                     torch=torch.__version__, omp_wait_policy=wait_policy,
                     load_average_before=load_before,
                     load_average_after=os.getloadavg()),
        data=dict(train=len(train), test=len(test), note=train.note),
        config=dict(vars(args), json=str(args.json) if args.json else None,
                    warmup_examples=WARMUP_EXAMPLES, per_epoch_mean=which),
        rows=rows, skipped=skipped, targets=targets, step_profile=profile,
    )
    if args.json:
        save_json(result, args.json)
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
