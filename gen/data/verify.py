"""List every image under a folder that cannot be decoded, and every problem of the folder itself.

    python -m gen.data.verify ROOT

Prints ``path<TAB>reason`` per unreadable file, symbolic link loop, second link to the same file or
folder, broken link or folder that cannot be listed, then a summary on stderr (with the number of
files reached through links that leave ROOT, which are followed). Exit status: 0 when all is well,
1 when something is listed, 2 for a usage error (no such folder, bad arguments). Progress goes to
stderr: a bar on a terminal, else a status line every ``GEN_STATUS_INTERVAL`` seconds (default 30).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gen.data.folder import CorruptImageError, decode_image, scan_images
from gen.utils.cli import printable, run_main
from gen.utils.progress import Progress

PROG = "python -m gen.data.verify"


def _verify(root: str) -> int:
    scan = scan_images(root)
    listed = list(scan.problems)
    with Progress(len(scan.files), f"verify {printable(root)}", unit="file") as progress:
        for path in scan.files:
            try:
                decode_image(path)
            except CorruptImageError as e:
                listed.append((str(path), e.reason))
            progress.advance()
    for path, reason in sorted(listed):
        print(f"{printable(path)}\t{reason}")
    unreadable = len(listed) - len(scan.problems)
    summary = (
        f"{unreadable} unreadable file(s) among {len(scan.files)} image file(s) and {len(scan.problems)} "
        f"folder problem(s) under {printable(root)}"
    )
    if scan.outside:
        summary += f"; {len(scan.outside)} file(s) were reached through links that leave the folder (followed)"
    print(summary, file=sys.stderr)
    return 1 if listed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (argparse exits with 2 on bad arguments)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the image folder (scanned recursively)")
    args = parser.parse_args(argv)
    return run_main(lambda: _verify(args.root), PROG)


if __name__ == "__main__":
    sys.exit(main())
