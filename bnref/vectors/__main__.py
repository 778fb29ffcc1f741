"""``python -m bnref.vectors [--convention NAME] [--dtype DTYPE] -o DIR``: write the test vectors."""

from __future__ import annotations

import argparse
import sys

from bnref.vectors import CONVENTIONS, DTYPES, FORMAT_VERSION, generate


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, write the vectors, print one summary line; 0 on success."""
    parser = argparse.ArgumentParser(
        prog="python -m bnref.vectors",
        description=f"Write BatchNorm test vectors (format version {FORMAT_VERSION}, docs/vectors.md) "
        "as .npz files plus manifest.json into a new directory.",
    )
    parser.add_argument("--convention", action="append", choices=CONVENTIONS, metavar="NAME",
                        help=f"framework convention, repeatable (default: all of {', '.join(CONVENTIONS)})")
    parser.add_argument("--dtype", action="append", choices=DTYPES, metavar="DTYPE",
                        help=f"input dtype, repeatable (default: all of {', '.join(DTYPES)})")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="directory to create (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        manifest = generate(args.output, args.convention, args.dtype)
    except (OSError, ValueError) as e:
        print(f"python -m bnref.vectors: error: {e}", file=sys.stderr)
        return 1
    n = len(manifest["cases"])
    print(f"wrote {n} cases ({', '.join(manifest['conventions'])} x {', '.join(manifest['dtypes'])}) "
          f"and manifest.json to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
