"""The ``pqnet`` command as a user meets it: fit -> quantize -> report on digits, outputs that
are never overwritten without --overwrite, errors that name the option typed, --version and
defaults in every --help."""

import json
import shutil

import pytest

import pqnet
from pqnet import cli
from pqnet.cli import build_parser, main
from pqnet.quantize import METHODS

FIT = ["fit", "--model", "digits_cnn", "--data", "digits", "--epochs", "2", "--num-samples",
       "2", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*FIT, "--out", str(out)]) == 0
    return out


def test_fit_quantize_report(run_dir, capsys):
    assert main(["quantize", str(run_dir), "--method", "sigma-bits", "--avg-bits", "2.5"]) == 0
    folder = run_dir / "quantized" / "sigma-bits-avg_bits2.5"
    assert f"wrote {folder}/: qnet.pqn, metrics.json" in capsys.readouterr().out
    metrics = json.loads((folder / "metrics.json").read_text())
    qnet = pqnet.QuantizedNet.load(folder / "qnet.pqn")
    assert metrics["format"] == "pqnet.quantize-metrics" and metrics["method"] == "sigma-bits"
    assert metrics["budget"] == {"avg_bits": 2.5} and metrics["data"] == "digits"
    assert metrics["size_bytes"] == qnet.size_bytes and metrics["avg_bits"] == qnet.avg_bits
    assert qnet.avg_bits <= 2.5
    _, test = pqnet.data.load("digits")
    assert metrics["test"] == json.loads(json.dumps(pqnet.evaluate(qnet, test)))
    assert set(metrics["layer_bits"]) == {"conv1", "conv2", "fc1", "fc2"}

    assert main(["report", str(run_dir), "--draws", "4", "--num-samples", "2"]) == 0
    report = run_dir / "report"
    text = (report / "report.md").read_text()
    assert "sigma-bits" in text  # the quantize result is remade among the report's versions
    assert (report / "idata.nc").stat().st_size > 0 and (report / "pareto.png").is_file()


def test_outputs_are_kept_without_overwrite(run_dir, tmp_path, capsys):
    out = run_dir.parent / "uniform"
    quantize = ["quantize", str(run_dir), "--method", "uniform", "--bits", "4", "--out",
                str(out)]
    assert main(quantize) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*quantize[:-3], "3", "--out", str(out)]) == 2
    assert f"error: --out: {out} already holds qnet.pqn, metrics.json" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main([*quantize[:-3], "3", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["budget"] == {"bits": 3}
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []

    other = tmp_path / "reported"  # a copy of the run, whose report/ is already there
    other.mkdir()
    for name in ("posterior.pt", "metrics.json"):
        shutil.copy(run_dir / name, other / name)
    (other / "report").mkdir()
    (other / "report" / "report.md").write_text("old")
    assert main(["report", str(other), "--draws", "2"]) == 2
    assert f"error: RUN_DIR: {other} already holds report" in capsys.readouterr().err
    assert (other / "report" / "report.md").read_text() == "old"


def test_fit_overwrite_replaces_the_run_and_drops_what_came_from_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*FIT, "--out", str(out)]) == 0
    (out / "report").mkdir()
    (out / "report" / "report.md").write_text("old")
    (out / "quantized").mkdir()
    posterior = (out / "posterior.pt").read_bytes()
    assert main([*FIT, "--seed", "1", "--out", str(out)]) == 2
    assert "--out:" in capsys.readouterr().err and (out / "report" / "report.md").exists()
    assert (out / "posterior.pt").read_bytes() == posterior
    assert main([*FIT, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert (out / "posterior.pt").read_bytes() != posterior
    assert not (out / "report").exists() and not (out / "quantized").exists()


def test_quantize_prunes_by_level_or_fraction(run_dir, capsys):
    assert main(["quantize", str(run_dir), "--method", "uniform", "--bits", "2",
                 "--prune-fraction", "0.8"]) == 0
    folder = run_dir / "quantized" / "uniform-bits2-prune_fraction0.8"
    metrics = json.loads((folder / "metrics.json").read_text())
    qnet = pqnet.QuantizedNet.load(folder / "qnet.pqn")
    assert metrics["pruning"] == {"prune_fraction": 0.8}
    assert qnet.config["prune"]["fraction"] == pytest.approx(0.8, abs=1e-3)
    assert metrics["size_bytes"] == (folder / "qnet.pqn").stat().st_size
    # the report remakes plain results only: a pruned one is not remade as plain uniform
    assert ("uniform", round(metrics["avg_bits"], 4)) not in cli._quantized_variants(run_dir)
    assert main(["quantize", str(run_dir), "--method", "uniform", "--bits", "2",
                 "--prune", "0.5", "--prune-fraction", "0.8"]) == 2
    assert "error: --prune, --prune-fraction: give one pruning rule" in capsys.readouterr().err
    assert main(["quantize", str(run_dir), "--method", "uniform", "--bits", "2",
                 "--prune", "1"]) == 2
    assert "error: --prune: expected a number in [0, 1)" in capsys.readouterr().err


def test_errors_naming_several_arguments_name_every_flag():
    flags = {"prune": "--prune", "prune_fraction": "--prune-fraction"}
    assert cli._as_typed("prune, prune_fraction: give one", flags) == \
        "--prune, --prune-fraction: give one"
    assert cli._as_typed("prune, other: x", flags) == "prune, other: x"
    assert cli._as_typed("prune: x", flags) == "--prune: x"


def test_quantize_errors_name_the_option(run_dir, tmp_path, capsys):
    assert main(["quantize", str(run_dir), "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pqnet quantize: error: --method: ")
    assert all(method in err for method in METHODS)
    assert main(["quantize", str(run_dir), "--method", "kmeans", "--bits", "3"]) == 2
    assert "error: --bits: not an option of --method kmeans, which takes --k, --avg-bits, " \
           "--option init=..." in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--method", "uniform", "--bits", "4"]) == 2
    assert (f"error: RUN_DIR: {tmp_path} has no posterior.pt; write one with `pqnet fit "
            "--out RUN_DIR`") in capsys.readouterr().err


def test_version_and_defaults_in_every_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pqnet {pqnet.__version__}"
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and action.default not in (None, False) \
                    and action.dest != "help":
                assert f"(default: {action.default})" in " ".join(text.split()), \
                    (name, action.dest)
    assert "--epochs EPOCHS training epochs, warm start included (default: 20)" in \
        " ".join(sub.choices["fit"].format_help().split())


def test_demo_writes_every_method_as_a_file_it_scores(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEMO_BUDGETS", (2.0,))  # one budget a method: the test's time
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--num-samples", "2",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "quantize.json").read_text())
    assert results["format"] == "pqnet.demo-results"
    assert {row["method"] for row in results["rows"]} == set(METHODS)
    _, test = pqnet.data.load("digits")
    for row in results["rows"]:
        file = out / "quantized" / row["file"]
        assert file.stat().st_size == row["size_bytes"]
        assert row["bits_per_weight"] == pytest.approx(
            8 * row["size_bytes"] / pqnet.QuantizedNet.load(file).num_weights)
        assert f"{row['size_bytes']:,}".replace(",", "") in printed.replace(",", "")
    kmeans = next(r for r in results["rows"] if r["method"] == "kmeans")
    loaded = pqnet.QuantizedNet.load(out / "quantized" / kmeans["file"])
    assert pqnet.evaluate(loaded, test)["accuracy"] == kmeans["accuracy"]
    assert (out / "posterior.pt").is_file()
    # the pruned recipe's row: its own file, 90 % zeros, smaller than the plain 2-bit grid's
    plain, pruned = (r for r in results["rows"] if r["method"] == "uniform")
    assert (pruned["prune_fraction"], pruned["finetune_epochs"]) == (0.9, 8)
    assert pruned["file"] != plain["file"] and pruned["size_bytes"] < plain["size_bytes"]
    pruned_net = pqnet.QuantizedNet.load(out / "quantized" / pruned["file"])
    zeros = sum(int((w == 0).sum()) for w in pruned_net.weights().values())
    assert zeros == round(0.9 * pruned_net.num_weights)
    assert "uniform, pruned 0.9, fine-tuned 8" in printed
