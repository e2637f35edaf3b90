"""Shared piece of the vmap rules: a vmapped dimension folded into an op's leading dimension."""


def merge_batch(t, dim, batch):
    """Move the vmapped dim (or a broadcast of an unbatched tensor) to the front and fold it into dim 0."""
    if t is None:
        return None
    t = t.expand(batch, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.flatten(0, 1)
