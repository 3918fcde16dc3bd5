"""python -m engine.run: text -> video with the shipped default model (until the default model and the
pipeline land, it stops with a clear message)."""

import sys


def main(argv=None) -> int:
    print("error: no default weights yet: the default model has not shipped in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
