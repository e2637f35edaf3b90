"""The examples of examples/ stay alive: each trains for a few iterations at a small size, its loss
goes down, and it writes its curve and its one-line summary."""

import csv
import importlib.util
import io
import os
import zipfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _written(out, capsys, prefix):
    rows = list(csv.DictReader(open(os.path.join(out, "curve.csv"))))
    summary = open(os.path.join(out, "summary.txt")).read().strip()
    printed = capsys.readouterr().out
    assert summary.startswith(prefix) and summary in printed
    assert os.path.exists(os.path.join(out, "curve.png")) or "matplotlib is not installed" in printed
    return rows, summary


def test_pattern_completion_plastic_learns_and_non_plastic_cannot(tmp_path, capsys):
    example = _load("pattern_completion")
    out = str(tmp_path / "run")
    result = example.main(["--pattern-size", "32", "--patterns", "3", "--batch", "8", "--iterations", "120",
                           "--lr", "3e-3", "--report-every", "20", "--eager-iterations", "3", "--threads", "1",
                           "--out", out])
    rows, summary = _written(out, capsys, "pattern_completion:")
    assert len(rows) == 6 and rows[-1]["iteration"] == "120"
    first, last = rows[0], rows[-1]
    assert float(last["plastic_loss"]) < 0.6 * float(first["plastic_loss"]), rows
    # The non-plastic network can only copy the degraded pattern: about a quarter of the bits wrong.
    assert float(last["plastic_error"]) < float(last["nonplastic_error"]) - 0.1, rows
    assert 0.15 < float(last["nonplastic_error"]) < 0.35, rows
    # The published eager loop trains the same network on the same episodes: the same losses.
    assert "published eager loop" in summary and result["eager_loss_gap"] < 1e-4
    assert result["sec_per_iter"] > 0


def test_pattern_completion_episodes_follow_the_paper():
    example = _load("pattern_completion")
    import torch

    gen = torch.Generator().manual_seed(0)
    x, target = example.episodes(gen, batch=2, size=10, patterns=5, cycles=2, present=6, delay=4, test_present=6,
                                 degrade=0.5, gain=20.0)
    assert x.shape == (2 * 5 * (6 + 4) + 6, 2, 11) and target.shape == (2, 10)
    assert (x[:, :, -1] == 20.0).all()  # the bias neuron
    assert (target.abs() == 1).all() and (target.sum(-1) == 0).all()  # balanced +-1 patterns
    test = x[-6:, :, :10] / 20.0
    assert (test == test[0]).all()
    assert ((test[0] == 0).sum(-1) == 5).all()  # exactly half the bits zeroed
    kept = test[0] != 0
    assert (test[0][kept] == target[kept]).all()
    assert (x[6:10, :, :10] == 0).all()  # the zero-input delay after the first presentation
    with pytest.raises(SystemExit):
        example.main(["--degrade", "1.5"])


def test_cue_reward_modulated_network_learns(tmp_path, capsys):
    example = _load("cue_reward")
    out = str(tmp_path / "run")
    result = example.main(["--size", "32", "--cues", "2", "--cue-bits", "6", "--steps", "40", "--batch", "16",
                           "--iterations", "150", "--lr", "1e-2", "--kinds", "modulated", "--report-every", "25",
                           "--eager-iterations", "3", "--threads", "1", "--out", out])
    rows, summary = _written(out, capsys, "cue_reward:")
    assert len(rows) == 6 and rows[-1]["iteration"] == "150"
    assert float(rows[-1]["modulated_loss"]) < 0.6 * float(rows[0]["modulated_loss"]), rows
    assert float(rows[-1]["modulated_reward"]) > 2.0, rows  # chance: about 0
    # The published eager loop trains the same network on the same episodes: the same losses.
    assert "published eager loop" in summary and result["eager_loss_gap"] < 1e-4


def test_cue_reward_episodes_follow_the_paper():
    example = _load("cue_reward")
    import torch

    gen = torch.Generator().manual_seed(0)
    cue_bits, steps = 20, 120
    x, go, answer = example.episodes(gen, batch=3, cues=4, cue_bits=cue_bits, steps=steps)
    assert x.shape == (steps, 3, cue_bits + 5) and go.shape == answer.shape == (steps, 3)
    assert (x[:, :, cue_bits + 3] == 1).all()  # bias
    for b in range(3):
        shown = x[:, b, :cue_bits].abs().sum(-1) > 0
        cues = {tuple(v.tolist()) for v in x[shown, b, :cue_bits]}
        assert len(cues) == 4 and all(set(c) <= {-1.0, 1.0} for c in cues)  # 4 distinct +-1 cues
        goes = go[:, b].nonzero().flatten().tolist()
        assert 13 <= len(goes) <= 24  # trials of 5 to 8 steps
        assert x[go[:, b], b, cue_bits].eq(1).all() and x[~go[:, b], b, cue_bits].eq(0).all()
        trials = []
        for start, g in zip([0] + [g + 2 for g in goes[:-1]], goes):
            assert x[start, b, :cue_bits].abs().sum() == 0  # the trial opens with a blank step
            trial_cues = [tuple(v.tolist()) for v in x[start:g, b, :cue_bits] if v.abs().sum() > 0]
            assert len(trial_cues) == 2 and len(set(trial_cues)) == 2  # half of the cues, once each
            feedback = x[g + 1, b, cue_bits + 1:cue_bits + 3]  # the step after go shows the right answer
            assert feedback.sum() == 1 and feedback[int(answer[g, b])] == 1
            trials.append((set(trial_cues), bool(answer[g, b])))
        # One target per episode: the answer is "yes" exactly in the trials that show it.
        assert any(all((cue in shown) == yes for shown, yes in trials) for cue in cues)
    with pytest.raises(SystemExit):
        example.main(["--cues", "1"])


def test_sinusoid_maml_loss_goes_down(tmp_path, capsys):
    example = _load("sinusoid_maml")
    out = str(tmp_path / "run")
    result = example.main(["--iterations", "300", "--meta-batch", "10", "--meta-lr", "3e-3", "--eval-every", "100",
                           "--eval-tasks", "20", "--test-tasks", "20", "--out", out])
    rows, _ = _written(out, capsys, "sinusoid_maml:")
    assert [r["iteration"] for r in rows] == ["100", "200", "300"]
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"]), rows
    mse = result["test_mse"]
    assert mse[10][0] < mse[0][0]  # adapting to a new task helps


def _png(pixels):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.where(pixels, 0, 255).astype(np.uint8)).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def _learnable_omniglot(root, split, seed, alphabets=2, characters=4, drawings=4):
    """An archive in the official layout whose characters can be told apart: each is a random 7x7
    pattern of ink blocks, and its drawings flip a few of the pixels."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(os.path.join(root, f"images_{split}.zip"), "w") as z:
        for a in range(alphabets):
            for c in range(characters):
                base = np.kron(rng.random((7, 7)) < 0.35, np.ones((15, 15), dtype=bool))
                for d in range(drawings):
                    drawing = base ^ (rng.random(base.shape) < 0.03)
                    z.writestr(f"images_{split}/Alpha{a}/character{c:02d}/{a}{c}_{d:02d}.png", _png(drawing))
    return root


@pytest.mark.parametrize("algo", ["maml", "neuronml"])
def test_omniglot_loss_goes_down(tmp_path, capsys, algo):
    root = str(tmp_path / "omniglot")
    os.makedirs(root)
    _learnable_omniglot(root, "background", seed=1)
    _learnable_omniglot(root, "evaluation", seed=2)
    example = _load("omniglot_5way1shot")
    out = str(tmp_path / "run")
    example.main(["--data-root", root, "--algo", algo, "--hidden", "16", "--meta-batch", "4", "--iterations", "40",
                  "--meta-lr", "3e-3", "--eval-every", "20", "--eval-tasks", "8", "--test-tasks", "8", "--queries", "2",
                  "--threads", "1", "--out", out])
    rows, summary = _written(out, capsys, "omniglot_5way1shot:")
    assert [r["iteration"] for r in rows] == ["20", "40"]
    assert float(rows[-1]["train_loss"]) < 0.85 * float(rows[0]["train_loss"]), rows
    assert f"{algo} test accuracy" in summary
    if algo == "neuronml":
        assert float(rows[-1]["active_fraction"]) < 1.0


def test_omniglot_names_a_bad_data_root(tmp_path, capsys):
    example = _load("omniglot_5way1shot")
    with pytest.raises(SystemExit):
        example.main(["--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "run")])
    assert "--data-root" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["sinusoid_maml", "pattern_completion", "cue_reward", "omniglot_5way1shot"])
def test_an_out_that_cannot_be_a_folder_is_a_usage_error_before_the_work(tmp_path, capsys, name):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    example = _load(name)
    for out, expected in [(a_file, f"--out: expected a folder, got {str(a_file)!r}, a file"),
                          (a_file / "run", f"({a_file} is a file)")]:
        with pytest.raises(SystemExit) as stop:
            example.main(["--out", str(out), "--iterations", "1"] + (["--data-root", str(tmp_path)]
                                                                      if name == "omniglot_5way1shot" else []))
        captured = capsys.readouterr()
        assert stop.value.code == 2 and expected in captured.err and "Traceback" not in captured.err
        assert captured.out == ""  # stopped before the work
