"""The meta CLI as a researcher meets it: usage errors instead of tracebacks, help with defaults,
the package's backend names, runs that are never replaced silently, progress from `compare`, and
results that record only what applies to the task."""

import argparse
import json
import os

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast.meta import cli

from test_meta_tasks import _tiny_omniglot

# Fast settings: the plain PyTorch learner on a few sinusoid tasks (under a second per run).
TINY = ["--dataset", "sinusoid", "--backend", "reference", "--meta-batch", "2", "--eval-every", "0",
        "--eval-tasks", "2", "--test-tasks", "2", "--checkpoint-every", "0"]


def _usage_error(capsys, argv):
    """(exit status, stderr) of a CLI call that must stop at argument checking."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    return stop.value.code, capsys.readouterr().err


def _train(out, *extra, iterations=2):
    return cli.main(["train", *TINY, "--iterations", str(iterations), "--out", str(out), *extra])


# ---- --out holds a previous run ------------------------------------------------------------------


def test_train_refuses_to_replace_a_run_unless_told(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out)
    before = (out / "results.json").read_text()
    code, err = _usage_error(capsys, ["train", *TINY, "--iterations", "3", "--out", str(out)])
    assert code == 2
    assert "--out: expected a folder without a previous run" in err and str(out) in err
    assert "--resume" in err and "--overwrite" in err and "results.json" in err
    assert (out / "results.json").read_text() == before


def test_overwrite_replaces_the_whole_run(tmp_path):
    out = tmp_path / "run"
    _train(out, iterations=3)
    results = _train(out, "--overwrite", iterations=1)
    assert results["iterations"] == 1
    rows = (out / "curve.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 1  # the old curve is gone, not continued


def test_resume_needs_a_checkpoint_to_continue_from(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out)
    os.remove(out / "checkpoint.pt")
    code, err = _usage_error(capsys, ["train", *TINY, "--resume", "--out", str(out)])
    assert code == 2 and "--resume: expected" in err and "checkpoint.pt" in err
    code, err = _usage_error(capsys, ["train", *TINY, "--resume", "--overwrite", "--out", str(out)])
    assert code == 2 and "not allowed with argument" in err


# ---- bad values are usage errors --------------------------------------------------------------


@pytest.mark.parametrize("argv,expected", [
    (["--target-active", "1.7"], "argument --target-active: expected a fraction in (0, 1], got 1.7"),
    (["--target-active", "0"], "argument --target-active: expected a fraction in (0, 1], got 0"),
    (["--inner-lr", "-0.1"], "argument --inner-lr: expected a number > 0, got -0.1"),
    (["--inner-steps", "-1"], "argument --inner-steps: expected an integer >= 0, got -1"),
    (["--lambda-plasticity", "-1"], "argument --lambda-plasticity: expected a number >= 0, got -1"),
    (["--meta-batch", "many"], "argument --meta-batch: expected an integer >= 1, got 'many'"),
    (["--device", "gpu"], "--device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (["--algo", "plastic"], "--algo plastic: expected --dataset omniglot"),
])
def test_bad_values_name_the_argument_the_expected_and_the_given(tmp_path, capsys, argv, expected):
    code, err = _usage_error(capsys, ["train", *TINY, *argv, "--out", str(tmp_path / "run")])
    assert code == 2 and expected in err and "usage: python -m neuronml_fast.meta train" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_a_cuda_device_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    code, err = _usage_error(capsys, ["train", *TINY, "--device", "cuda", "--out", str(tmp_path)])
    assert code == 2 and "--device: expected cpu here (torch sees no CUDA device), got 'cuda'" in err


def test_data_root_errors_are_usage_errors(tmp_path, capsys):
    omniglot = ["train", "--dataset", "omniglot", "--out", str(tmp_path / "run")]
    code, err = _usage_error(capsys, omniglot)
    assert code == 2 and "--data-root: expected the folder holding images_background.zip" in err
    missing = str(tmp_path / "missing")
    code, err = _usage_error(capsys, omniglot + ["--data-root", missing])
    assert code == 2 and f"--data-root: expected a folder holding the Omniglot archives, got {missing!r}" in err
    _tiny_omniglot(str(tmp_path), "background")  # the evaluation archive is missing
    code, err = _usage_error(capsys, omniglot + ["--data-root", str(tmp_path)])
    assert code == 2 and "--data-root: expected a folder holding images_evaluation.zip" in err
    _tiny_omniglot(str(tmp_path), "evaluation")
    code, err = _usage_error(capsys, omniglot + ["--data-root", str(tmp_path), "--ways", "30"])
    assert code == 2 and "--ways: expected 1..24 classes, got 30" in err
    assert "Traceback" not in err


def test_an_explicit_backend_that_cannot_run_here_is_a_usage_error(tmp_path, capsys, monkeypatch):
    real_status = nf.backends.status

    def no_gpu(name=None):  # as on a machine without a GPU and without the emulations
        if name == "cuda":
            return nf.backends.Status("cuda", "built (no device)", frozenset(), "no CUDA device visible")
        return real_status(name)

    monkeypatch.setattr(nf.backends, "status", no_gpu)
    code, err = _usage_error(capsys, ["train", *TINY, "--backend", "cuda", "--out", str(tmp_path)])
    assert code == 2 and "--backend: expected a backend that runs on cpu here (auto, reference, cpu" in err
    assert "got 'cuda' (built (no device); no CUDA device visible)" in err


# ---- help -------------------------------------------------------------------------------------


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_option_has_help_and_shows_its_default(command):
    parser = cli.build_parser().commands[command]
    text = parser.format_help()
    for action in _options(parser):
        assert action.help, f"{action.option_strings[0]} has no help"
        if action.default not in (None, False) and "default" not in action.help:
            assert f"(default: {action.default})" in " ".join(text.split()), action.option_strings[0]
    assert "(default: auto)" in text and "(default: 0.5)" in " ".join(text.split())


# ---- backends ---------------------------------------------------------------------------------


def test_backend_names_are_the_package_names(monkeypatch, tmp_path):
    seen = {}

    def fake_train(args, data):
        seen[args.backend] = (nf.get_backend(), cli.learner_kind(args.backend))

    monkeypatch.setattr(cli, "_train", fake_train)
    for backend in ("auto", "reference", "cpu"):
        cli.main(["train", *TINY, "--backend", backend, "--out", str(tmp_path / backend)])
    assert seen == {"auto": ("auto", "fused"), "reference": ("reference", "reference"), "cpu": ("cpu", "fused")}
    with pytest.warns(FutureWarning, match="--backend fused is deprecated: it means --backend auto"):
        cli.main(["train", *TINY, "--backend", "fused", "--out", str(tmp_path / "fused")])


# ---- results ----------------------------------------------------------------------------------


def test_sinusoid_results_record_only_what_applies(tmp_path):
    results = _train(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert "ways" not in saved and "test_accuracy" not in saved and "downsample" not in saved
    assert saved["test_mse"] > 0 and saved["shots"] == 10 and saved["queries"] == 10
    assert saved["backend"] == "reference" and saved["learner"] == "reference"
    assert "target_active" not in saved  # a MAML run
    assert saved["command"].startswith("python -m neuronml_fast.meta train --dataset sinusoid")


def test_omniglot_config_records_classes_and_neuronml_terms():
    args = cli._defaults(cli.build_parser().parse_args(
        ["train", "--algo", "neuronml", "--data-root", ".", "--out", "unused"]))
    config = cli.run_config(args)
    assert config["ways"] == 5 and config["downsample"] == "stride" and config["target_active"] == 0.5
    args = cli._defaults(cli.build_parser().parse_args(
        ["train", "--algo", "plastic", "--data-root", ".", "--out", "unused"]))
    assert "inner_steps" not in cli.run_config(args)  # the plastic head takes no inner steps


# ---- compare ----------------------------------------------------------------------------------


def test_compare_reports_each_stage_as_it_goes(capsys):
    medians = cli.main(["compare", "--dataset", "sinusoid", "--meta-batch", "2", "--repeats", "2", "--warmup", "1"])
    assert set(medians) == {"reference", "fused", "torch.func vmap"}
    err = capsys.readouterr().err
    assert "1 warm-up and 2 timed meta-iteration(s) each" in err
    for stage in ("warm-up 1/1", "repeat 1/2", "repeat 2/2"):
        for name in medians:
            assert f"{stage}: {name} " in err


# ---- --resume continues the run it finds, with its settings ------------------------------------------------------


def test_resume_with_other_settings_names_each_difference(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, iterations=3)
    before = (out / "results.json").read_text()
    resume = ["train", *TINY, "--resume", "--out", str(out)]
    for change, expected in [
        (["--algo", "neuronml", "--iterations", "4"], "--algo neuronml (the run has maml)"),
        (["--meta-batch", "4", "--iterations", "4"], "--meta-batch 4 (the run has 2)"),
        (["--inner-lr", "0.5", "--seed", "3", "--iterations", "4"],
         "--inner-lr 0.5 (the run has 0.01), --seed 3 (the run has 0)"),
        (["--iterations", "2"], "--iterations: expected at least 3 to resume the run in"),
    ]:
        code, err = _usage_error(capsys, [*resume, *change])
        assert code == 2 and expected in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()[-1]) > len(expected)
        assert (out / "results.json").read_text() == before
    code, err = _usage_error(capsys, [*resume, "--meta-batch", "4", "--iterations", "4"])
    assert "only --iterations (not below the iterations done), --time-limit" in err
    # what may change does: more iterations, other evaluation sizes
    results = cli.main([*resume, "--iterations", "4", "--test-tasks", "3", "--eval-tasks", "3"])
    assert results["iterations"] == 4 and results["meta_batch"] == 2 and results["test_tasks"] == 3


def test_resume_with_another_dataset_is_a_usage_error_not_a_state_dict_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out)
    data = _tiny_omniglot(str(tmp_path), "background")
    _tiny_omniglot(data, "evaluation")
    code, err = _usage_error(capsys, ["train", "--dataset", "omniglot", "--data-root", data, "--backend", "reference",
                                      "--meta-batch", "2", "--queries", "2", "--iterations", "3", "--resume",
                                      "--out", str(out)])
    assert code == 2 and "--dataset omniglot (the run has sinusoid)" in err and "Traceback" not in err


# ---- output paths are checked before the work --------------------------------------------------------------------


def test_output_paths_that_cannot_be_written_are_usage_errors_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    for argv, expected in [
        (["train", *TINY, "--out", str(a_file)], f"--out: expected a folder, got {str(a_file)!r}, a file"),
        (["train", *TINY, "--out", str(a_file / "run")], f"({a_file} is a file)"),
        (["compare", "--dataset", "sinusoid", "--json", str(tmp_path / "no" / "dir" / "x.json")],
         f"--json: expected a file in an existing folder, got {str(tmp_path / 'no' / 'dir' / 'x.json')!r}"),
        (["compare", "--dataset", "sinusoid", "--json", str(tmp_path)], "--json: expected a file to write"),
        (["scaling", "--dataset", "sinusoid", "--json", str(a_file / "x.json")], f"({a_file} is a file)"),
    ]:
        code, err = _usage_error(capsys, argv)
        assert code == 2 and expected in err and "Traceback" not in err, err
        assert "timing" not in err  # stopped before the work
    assert a_file.read_text() == ""


# ---- missing optional packages -----------------------------------------------------------------------------------

_WITHOUT = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # import raises ImportError, as when the package is not installed
from neuronml_fast.meta import cli
cli.main({argv!r})
"""


def _run_without(packages, argv):
    import subprocess
    import sys

    code = _WITHOUT.format(names=packages, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_train_without_tqdm_and_matplotlib_says_so_and_prints_plain_progress(tmp_path):
    out = tmp_path / "run"
    done = _run_without(["tqdm", "matplotlib", "matplotlib.pyplot"],
                        ["train", *TINY, "--iterations", "3", "--out", str(out)])
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "note: tqdm is not installed, so progress is printed as plain lines" in err
    assert "note: matplotlib is not installed, so" in err and "curve.png is not drawn" in err
    assert err.count("pip install 'neuronml_fast[meta]' installs it") == 2
    assert "iteration 3/3: meta_loss" in err
    assert (out / "curve.csv").exists() and not (out / "curve.png").exists()


def test_omniglot_without_pillow_names_it_and_the_extra(tmp_path):
    data = _tiny_omniglot(str(tmp_path), "background")
    _tiny_omniglot(data, "evaluation")
    done = _run_without(["PIL", "PIL.Image"], ["train", "--data-root", data, "--out", str(tmp_path / "run")])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "Omniglot: decoding its PNG images needs pillow, which is not installed" in done.stderr
    assert "pip install 'neuronml_fast[meta]'" in done.stderr


def test_the_meta_extra_installs_the_optional_packages():
    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    assert '"meta": ["pillow", "matplotlib", "tqdm"]' in setup


# ---- what the timing commands report -----------------------------------------------------------------------------


def _parsed(argv):
    args = cli.build_parser().parse_args(argv)
    return cli._defaults(args)


def test_timing_reports_name_only_what_applies():
    sinusoid = cli._timing_setup(_parsed(["compare", "--dataset", "sinusoid"]))
    assert sinusoid.startswith("maml sinusoid 10-shot regression, 10 queries, meta-batch 25") and "way" not in sinusoid
    plastic = cli._timing_setup(_parsed(["compare", "--algo", "plastic", "--data-root", "."]))
    assert "order" not in plastic and "no inner steps" in plastic and "5-way 1-shot" in plastic
    assert "(random images)" in cli._timing_setup(_parsed(["compare", "--synthetic"]))
    assert "(random images)" in cli._timing_setup(_parsed(["scaling"]))
    assert "second order" in cli._timing_setup(_parsed(["compare", "--data-root", "."]))


def test_scaling_takes_no_data_root_and_its_default_meta_batch_fits_the_ranks(capsys):
    assert "--data-root" not in [s for action in _options(cli.build_parser().commands["scaling"])
                                 for s in action.option_strings]
    code, err = _usage_error(capsys, ["scaling", "--data-root", "."])
    assert code == 2 and "unrecognized arguments: --data-root" in err
    assert _parsed(["scaling", "--dataset", "sinusoid"]).meta_batch == 26  # 25 rounded up to 2 ranks
    assert _parsed(["scaling", "--dataset", "sinusoid", "--ranks", "5"]).meta_batch == 25
    assert _parsed(["scaling", "--ranks", "3"]).meta_batch == 33
    assert _parsed(["scaling", "--dataset", "sinusoid", "--meta-batch", "7"]).meta_batch == 7  # given: kept
    cli._check_world(cli.build_parser().commands["scaling"], _parsed(["scaling", "--dataset", "sinusoid"]), 1)
