"""List every image under a folder that cannot be decoded.

    python -m gen.data.verify ROOT

Prints ``path<TAB>reason`` per unreadable file and exits with status 1 when there is any.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gen.data.folder import verify_images


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m gen.data.verify ROOT", file=sys.stderr)
        return 2
    bad = verify_images(argv[0])
    for path, reason in bad:
        print(f"{path}\t{reason}")
    print(f"{len(bad)} unreadable file(s) under {argv[0]}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
