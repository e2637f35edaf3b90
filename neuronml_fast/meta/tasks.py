"""Task distributions: sinusoid regression and Omniglot N-way K-shot classification.

Omniglot is read from the official release layout (``images_background.zip`` /
``images_evaluation.zip``, or their extracted folders as torchvision unpacks them):
``images_background/<Alphabet>/characterNN/*.png``, 105x105 1-bit images. Following Finn et al.
(2017), images are resized to 28x28 and every character's 90-degree rotations are classes of
their own; the background set is for meta-training, the evaluation set for testing.
"""

import io
import math
import os
import zipfile

import numpy as np
import torch

SPLITS = ("background", "evaluation")


class SinusoidTasks:
    """y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5] (Finn et al. 2017)."""

    def __init__(self, seed=0, amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0)):
        self.generator = torch.Generator().manual_seed(seed)
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _uniform(self, shape, low_high):
        low, high = low_high
        return low + (high - low) * torch.rand(shape, generator=self.generator, dtype=torch.float64)

    def sample(self, tasks, shots, queries):
        """(x_support [T, K, 1], y_support, x_query [T, Q, 1], y_query), float32."""
        if tasks < 1 or shots < 1 or queries < 1:
            raise ValueError(f"tasks, shots, queries: expected positive ints, got {tasks}, {shots}, {queries}")
        amplitude = self._uniform((tasks, 1, 1), self.amplitude)
        phase = self._uniform((tasks, 1, 1), self.phase)
        x = self._uniform((tasks, shots + queries, 1), self.x_range)
        y = amplitude * torch.sin(x - phase)
        x, y = x.float(), y.float()
        return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def random_episodes(tasks, ways, shots, queries, image_size=28, seed=0):
    """Episodes of uniform-noise images with the Omniglot shapes: for timing, where pixels do not matter.

    ``(x_support [T, ways*shots, 1, S, S], y_support, x_query [T, ways*queries, 1, S, S], y_query)``.
    """
    gen = torch.Generator().manual_seed(seed)
    support = torch.rand(tasks, ways * shots, 1, image_size, image_size, generator=gen)
    query = torch.rand(tasks, ways * queries, 1, image_size, image_size, generator=gen)
    labels = lambda per_class: torch.arange(ways).repeat_interleave(per_class).repeat(tasks, 1)  # noqa: E731
    return support, labels(shots), query, labels(queries)


def _read_split(root, split):
    """{(alphabet, character): [png bytes, ...]} from a zip or an extracted folder."""
    folder = f"images_{split}"
    archive = os.path.join(root, folder + ".zip")
    extracted = os.path.join(root, folder)
    characters = {}
    if os.path.isdir(extracted):
        for alphabet in sorted(os.listdir(extracted)):
            for character in sorted(os.listdir(os.path.join(extracted, alphabet))):
                directory = os.path.join(extracted, alphabet, character)
                if not os.path.isdir(directory):
                    continue
                files = sorted(f for f in os.listdir(directory) if f.endswith(".png"))
                characters[(alphabet, character)] = [open(os.path.join(directory, f), "rb").read() for f in files]
    elif os.path.isfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in sorted(z.namelist()):
                parts = name.split("/")
                if len(parts) == 4 and parts[0] == folder and parts[3].endswith(".png"):
                    characters.setdefault((parts[1], parts[2]), []).append(z.read(name))
    else:
        raise FileNotFoundError(f"data_root: expected {folder}.zip or the folder {folder}/ in {root!r} "
                                f"(the official Omniglot layout), found neither")
    if not characters:
        raise ValueError(f"data_root: {folder} in {root!r} holds no <Alphabet>/<character>/*.png images")
    return characters


PILLOW_MISSING = ("Omniglot: decoding its PNG images needs pillow, which is not installed: "
                  "pip install 'neuronml_fast[meta]' (or pip install pillow)")


def _require_pillow():
    """pillow decodes the images: its absence is one clear error before any archive is read."""
    try:
        from PIL import Image  # noqa: F401
    except ImportError:
        raise ImportError(PILLOW_MISSING) from None


def _decode(png, size):
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L").resize((size, size), Image.LANCZOS)
    # Omniglot strokes are black on white: store ink as 1.
    return 1.0 - np.asarray(image, dtype=np.float32) / 255.0


class Omniglot:
    """Omniglot characters as a tensor ``images [characters, drawings, size, size]`` (ink = 1).

    ``classes`` counts the rotated copies too (4 per character when ``rotations``).
    """

    def __init__(self, data_root, split="background", image_size=28, rotations=True):
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if not isinstance(data_root, (str, os.PathLike)) or not os.path.isdir(data_root):
            raise FileNotFoundError(f"data_root: expected a folder holding the Omniglot archives, got {data_root!r}")
        _require_pillow()
        characters = _read_split(os.fspath(data_root), split)
        drawings = min(len(v) for v in characters.values())
        self.names = list(characters)
        self.images = torch.from_numpy(np.stack([
            np.stack([_decode(png, image_size) for png in pngs[:drawings]]) for pngs in characters.values()
        ]))
        self.rotations = 4 if rotations else 1

    @property
    def classes(self):
        return self.images.shape[0] * self.rotations

    def class_images(self, index):
        """All drawings of class ``index`` (a character and one of its rotations): [drawings, size, size]."""
        character, turns = divmod(index, self.rotations)
        return torch.rot90(self.images[character], turns, dims=(-2, -1))


class NWayKShot:
    """Seeded N-way K-shot episodes with query sets, labels 0..N-1 in a random order per episode."""

    def __init__(self, dataset, ways, shots, queries, seed=0):
        drawings = dataset.images.shape[1]
        if ways < 1 or ways > dataset.classes:
            raise ValueError(f"ways: expected 1..{dataset.classes} classes, got {ways}")
        if shots < 1 or queries < 0 or shots + queries > drawings:
            raise ValueError(f"shots, queries: expected shots >= 1 and shots + queries <= {drawings} drawings per "
                             f"class, got {shots} and {queries}")
        self.dataset, self.ways, self.shots, self.queries = dataset, ways, shots, queries
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, tasks=1):
        """(x_support [T, N*K, 1, S, S], y_support [T, N*K], x_query [T, N*Q, 1, S, S], y_query [T, N*Q])."""
        per_task = []
        for _ in range(tasks):
            classes = torch.randperm(self.dataset.classes, generator=self.generator)[: self.ways]
            support, query = [], []
            for label, cls in enumerate(classes.tolist()):
                images = self.dataset.class_images(cls)
                order = torch.randperm(images.shape[0], generator=self.generator)
                support.append((images[order[: self.shots]], label))
                query.append((images[order[self.shots: self.shots + self.queries]], label))
            per_task.append((_stack(support), _stack(query)))
        xs, ys = zip(*[s for s, _ in per_task])
        xq, yq = zip(*[q for _, q in per_task])
        return torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq)


def _stack(groups):
    images = torch.cat([g for g, _ in groups]).unsqueeze(1)
    labels = torch.cat([torch.full((g.shape[0],), label, dtype=torch.long) for g, label in groups])
    return images, labels
