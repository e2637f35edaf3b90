"""``python -m neuronml_fast.meta train|compare`` (see neuronml_fast/meta/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
