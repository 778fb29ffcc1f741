"""``python -m demo.experiments``: see :mod:`demo.experiments.cli`."""

from demo.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
