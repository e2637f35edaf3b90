"""Task distributions: sinusoids and the Omniglot loader / N-way K-shot sampler."""

import io
import os
import zipfile

import numpy as np
import pytest
import torch

from neuronml_fast.meta import NWayKShot, Omniglot, SinusoidTasks

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot")


def _png(seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.full((105, 105), 255, dtype=np.uint8)
    pixels[rng.integers(0, 105, 300), rng.integers(0, 105, 300)] = 0  # ink
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def _tiny_omniglot(root, split="background", alphabets=2, characters=3, drawings=5, as_zip=True):
    """A tiny archive in the official layout: images_<split>/<Alphabet>/characterNN/*.png."""
    files = {f"images_{split}/Alpha{a}/character{c:02d}/{a}{c}_{d:02d}.png": _png(100 * a + 10 * c + d)
             for a in range(alphabets) for c in range(characters) for d in range(drawings)}
    if as_zip:
        with zipfile.ZipFile(os.path.join(root, f"images_{split}.zip"), "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            path = os.path.join(root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    return root


def test_sinusoid_tasks_follow_finn_et_al():
    tasks = SinusoidTasks(seed=1)
    xs, ys, xq, yq = tasks.sample(tasks=64, shots=10, queries=5)
    assert xs.shape == (64, 10, 1) and yq.shape == (64, 5, 1)
    assert xs.abs().max() <= 5 and ys.abs().max() <= 5
    again = SinusoidTasks(seed=1).sample(64, 10, 5)
    assert all(torch.equal(a, b) for a, b in zip((xs, ys, xq, yq), again))
    with pytest.raises(ValueError, match="tasks, shots, queries"):
        tasks.sample(0, 10, 5)


@pytest.mark.parametrize("as_zip", [True, False])
def test_omniglot_reads_the_official_layout(tmp_path, as_zip):
    data = Omniglot(_tiny_omniglot(str(tmp_path), as_zip=as_zip), image_size=28)
    assert data.images.shape == (6, 5, 28, 28)
    assert data.classes == 24  # 6 characters x 4 rotations
    assert 0 <= data.images.min() and data.images.max() <= 1 and data.images.mean() > 0
    torch.testing.assert_close(data.class_images(1), torch.rot90(data.images[0], 1, dims=(-2, -1)))
    assert Omniglot(str(tmp_path), rotations=False).classes == 6


def test_sampler_is_seeded_and_shaped(tmp_path):
    data = Omniglot(_tiny_omniglot(str(tmp_path)))
    xs, ys, xq, yq = NWayKShot(data, ways=5, shots=1, queries=3, seed=7).sample(tasks=4)
    assert xs.shape == (4, 5, 1, 28, 28) and xq.shape == (4, 15, 1, 28, 28)
    assert sorted(ys[0].tolist()) == [0, 1, 2, 3, 4] and sorted(set(yq[0].tolist())) == [0, 1, 2, 3, 4]
    again = NWayKShot(data, ways=5, shots=1, queries=3, seed=7).sample(tasks=4)
    assert all(torch.equal(a, b) for a, b in zip((xs, ys, xq, yq), again))


def test_bad_data_roots_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_root: expected a folder"):
        Omniglot(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="data_root: expected images_background.zip"):
        Omniglot(str(tmp_path))
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as z:
        z.writestr("something/else.txt", "no images")
    with pytest.raises(ValueError, match="holds no <Alphabet>/<character>"):
        Omniglot(str(tmp_path))
    with pytest.raises(ValueError, match="split: expected one of"):
        Omniglot(str(tmp_path), split="train")
    data = Omniglot(_tiny_omniglot(str(tmp_path / "ok")) if os.makedirs(tmp_path / "ok") is None else None)
    with pytest.raises(ValueError, match="ways: expected 1..24"):
        NWayKShot(data, ways=25, shots=1, queries=1)
    with pytest.raises(ValueError, match="shots, queries"):
        NWayKShot(data, ways=5, shots=3, queries=3)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "images_evaluation.zip")),
                    reason="the shared Omniglot archives are not present")
def test_shared_archives_have_the_official_counts():
    # Listing only (decoding all 32,460 images would take minutes here).
    for split, characters, images in (("background", 964, 19280), ("evaluation", 659, 13180)):
        with zipfile.ZipFile(os.path.join(SHARED, f"images_{split}.zip")) as z:
            pngs = [n for n in z.namelist() if n.endswith(".png")]
        assert len(pngs) == images
        assert len({tuple(n.split("/")[1:3]) for n in pngs}) == characters
