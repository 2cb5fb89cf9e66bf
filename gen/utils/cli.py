"""Command-line plumbing shared by the entry points: one-line errors, exit statuses, printable paths.

An expected failure (a bad argument, a missing or damaged file, a full disk, an unwritable folder) is
printed as one ``error: ...`` line that names the file or argument and the fix, with exit status 2;
values that stopped being finite (weights, a loss, generated images) end the same way with status 3. A training
run stopped by a preemption signal after writing its state ends with status 75 (``EXIT_PREEMPTED``).
A Python traceback is kept for real bugs. ``GEN_DEBUG=1`` shows the traceback of expected errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from gen.utils.finite import NonFiniteError

EXIT_USAGE = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130
# A preempted training run (SIGTERM, SLURM's warning signal) that wrote its state at a step boundary and wants to be
# run again: sysexits.h's EX_TEMPFAIL, "a temporary failure; the user is invited to retry". A cluster can requeue on
# it (slurm.conf ``RequeueExit=75``); under submitit the job is requeued by submitit itself.
EXIT_PREEMPTED = 75


class CommandError(Exception):
    """A bad argument, input file or output location; printed as one line, exit status 2."""


# Errors whose message already says what is wrong with an input. ValueError/TypeError are raised by the
# toolkit's own checks with such messages; OSError covers missing, unreadable and unwritable files.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (CommandError, ValueError, TypeError, OSError)

_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def int_arg(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type`` for an integer in ``[minimum, maximum]``: argparse then names the flag in its one-line
    error (exit status 2), instead of a later check naming an internal setting, or a huge count exhausting memory."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum:,}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def float_arg(minimum: float | None = None) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number (at least ``minimum`` when given)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"must be a finite number{'' if minimum is None else f' >= {minimum:g}'}, "
                                             f"got {text!r}")
        return value

    return parse


def printable(path: str | os.PathLike) -> str:
    """``path`` as text that any terminal encoding can print.

    File names are bytes on POSIX; undecodable bytes arrive as lone surrogates, which ``print`` refuses.
    They are shown as ``\\xNN`` escapes instead.
    """
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def describe_os_error(e: OSError, path: str | os.PathLike | None = None, action: str = "write") -> str:
    """One line for an OSError: what happened to which file, and what to do about it."""
    where = path if path is not None else e.filename
    target = printable(where) if where is not None else "a file"
    if e.errno in _DISK_FULL:
        return f"cannot {action} {target}: the disk is full (no space left on the device). Free some space or write elsewhere."
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"cannot {action} {target}: permission denied. Fix the permissions or choose another location."
    if e.errno == errno.EROFS:
        return f"cannot {action} {target}: the file system is read-only. Choose another location."
    if e.errno == errno.ENOENT:
        return f"cannot {action} {target}: no such file or folder. Check the path."
    if e.errno == errno.EISDIR:
        return f"cannot {action} {target}: it is a folder, not a file. Give a file name."
    if e.errno == errno.ENOTDIR:
        return f"cannot {action} {target}: a part of the path is a file, not a folder. Check the path."
    reason = e.strerror or str(e)
    return f"cannot {action} {target}: {reason}."


def _check_no_file_in_the_way(folder: Path, what: str, path: Path) -> None:
    # mkdir(parents=True) reports a file in the middle of the path as "File exists", which says nothing useful.
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir() and parent != path:
                raise CommandError(f"{what} {printable(path)}: {printable(parent)} is a file, not a folder; check the path")
            return


def _same_file(a: Path, b: str | os.PathLike) -> bool:
    try:
        return a.exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_writable_file(path: str | os.PathLike, what: str,
                        inputs: Mapping[str, str | os.PathLike | None] | None = None) -> Path:
    """Fail now, not after an hour of work, when ``path`` cannot be written.

    Creates missing parent folders and writes (then removes) a probe file beside ``path``.

    Args:
        path: the output file.
        what: how the user named it (e.g. ``--out``), for the message.
        inputs: the command's input files by the name the user gave them (``{"--ref": ...}``); an output that is one
            of them is refused, since writing it would destroy the input (e.g. ``--out`` given the samples' ``.npz``).

    Raises:
        CommandError: naming ``what`` and the reason (a folder, one of the inputs, permission denied, read-only,
        full disk).
    """
    path = Path(path)
    for name, source in (inputs or {}).items():
        if source is not None and _same_file(path, source):
            raise CommandError(f"{what} {printable(path)} is the input {name}; writing it would destroy that file. "
                               "Give another output file")
    if path.is_dir():
        raise CommandError(f"{what} {printable(path)} is a folder; give a file name, e.g. {printable(path / 'out')}")
    _check_no_file_in_the_way(path.parent, what, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CommandError(f"{what}: " + describe_os_error(e, path.parent, "write into")) from e
    return path


def _check_folder_path(path: Path, what: str) -> None:
    """An output folder's path: neither the folder nor one of its parents is a file."""
    if path.exists() and not path.is_dir():
        raise CommandError(f"{what} {printable(path)} is a file, not a folder; give a folder")
    _check_no_file_in_the_way(path, what, path)


def check_dir_can_be_made(path: str | os.PathLike, what: str) -> None:
    """The part of :func:`check_writable_dir` that changes nothing on disk: no file where the folder or one of its
    parents should be, and the folder (else its nearest existing parent) writable.

    For a command that checks all its settings before any work but makes its output folder only after them (so a
    refusal leaves no empty folder): it runs this first, before loading or training anything.
    """
    path = Path(path)
    _check_folder_path(path, what)
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        e = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(existing))
        raise CommandError(f"{what}: " + describe_os_error(e, existing, "write into"))


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Like :func:`check_writable_file` for an output folder (created when missing)."""
    path = Path(path)
    _check_folder_path(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CommandError(f"{what}: " + describe_os_error(e, path, "write into")) from e
    return path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """:func:`check_writable_dir`, and a folder this call made that is still empty when the block fails (a later
    check refused the command) is removed again, so a refusal leaves nothing behind."""
    made = not Path(path).exists()
    out = check_writable_dir(path, what)
    try:
        yield out
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty
        raise


def write_output(path: str | os.PathLike, what: str, write: Callable[[], object]) -> None:
    """Run ``write()``, turning an OSError (full disk, permissions) into a one-line error naming ``path``."""
    try:
        write()
    except OSError as e:
        raise CommandError(f"{what}: " + describe_os_error(e, path, "write")) from e


def error_message(e: BaseException) -> str:
    """The one-line text of an expected error."""
    if isinstance(e, OSError) and not isinstance(e, CommandError) and e.errno is not None and e.strerror:
        # The toolkit's own FileNotFoundErrors carry a full sentence and no errno; raw ones get described.
        return describe_os_error(e, e.filename, "write" if e.errno in (*_DISK_FULL, errno.EROFS) else "open")
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split()) if "\n" not in text else text


# Hydra's refusals of a command line: an unknown key without '+', an unknown preset, bad override syntax.
_HYDRA_USAGE_ERRORS = ("ConfigCompositionException", "MissingConfigException", "OverrideParseException")


def _is_hydra_usage_error(e: BaseException | None) -> bool:
    return e is not None and type(e).__module__ == "hydra.errors" and type(e).__name__ in _HYDRA_USAGE_ERRORS


def hydra_error_message(e: BaseException) -> str:
    """The one-line (or option-list) text of Hydra's refusal of a command line, in the toolkit's words.

    An unknown key given without '+' is the common case: Hydra answers "To append to your config use +key=value",
    which every entry point then refuses too (unknown keys are errors), so that advice is replaced by the keys the
    config does have at that level, with the closest one.
    """
    import difflib

    from gen.utils.config import did_you_mean

    cause = e.__cause__
    full_key = getattr(cause, "full_key", None)
    parent = getattr(cause, "parent_node", None)
    text = str(e)
    if full_key and parent is not None and "not in struct" in str(cause) and text.startswith("Could not override"):
        given = text.split("'")[1] if text.count("'") >= 2 else full_key
        section, _, missing = full_key.rpartition(".")
        keys = sorted(str(k) for k in parent.keys() if section or k != "hydra")
        where = f" of '{section}'" if section else ""
        return (f"unknown config key '{given}'" + (f": the config has no '{full_key}'" if full_key != given else "")
                + did_you_mean(missing, keys, f"{section}." if section else "")
                + f". Known keys{where}: {', '.join(keys)}")
    missing_file, options = getattr(e, "missing_cfg_file", None), getattr(e, "options", None)
    if missing_file and options:  # an unknown preset of a config group: its options, without Hydra's search path
        group, _, name = str(missing_file).rpartition("/")
        close = difflib.get_close_matches(name, list(options), n=1)
        return (f"unknown preset {group}={name}" + (f" (did you mean {group}={close[0]}?)" if close else "")
                + f". Known presets of '{group}': {', '.join(options)}")
    if isinstance(cause, Exception) and str(cause).strip():
        text = f"{text.strip()} ({' '.join(str(cause).split())})"
    return error_message(Exception(text.strip()))


def run_hydra_entry(main: Callable[[], object], prog: str | None = None) -> None:
    """Call a ``@hydra.main`` entry point so that Hydra's refusals of the command line end as the toolkit's.

    Hydra prints them in its words and exits with status 1, which scripts read as a failure of the run rather than
    of the command line. Here they are one ``prog: error: ...`` line naming the key and the fix, with status 2 like
    every other bad input (:func:`hydra_error_message`). ``HYDRA_FULL_ERROR=1`` (Hydra's own switch, also set only for
    the duration of the call so that Hydra hands the exception over) or ``GEN_DEBUG=1`` set by the user keeps
    Hydra's behaviour and traceback.
    """
    prog = prog or Path(sys.argv[0]).name
    user_full = bool(os.environ.get("HYDRA_FULL_ERROR")) or bool(os.environ.get("GEN_DEBUG"))
    if not user_full:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and _is_hydra_usage_error(e.__context__):  # printed by Hydra itself (a debugger attached)
            raise SystemExit(EXIT_USAGE) from None
        raise
    except Exception as e:
        if user_full or not _is_hydra_usage_error(e):
            raise
        print(f"{prog}: error: {hydra_error_message(e)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None
    finally:
        if not user_full:
            os.environ.pop("HYDRA_FULL_ERROR", None)


def run_main(main: Callable[[], int], prog: str) -> int:
    """Run ``main`` and turn expected errors into ``prog: error: ...`` lines (exit status 2; 3 for non-finite values)."""
    try:
        return main()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NonFiniteError, *EXPECTED_ERRORS) as e:
        if os.environ.get("GEN_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE if isinstance(e, NonFiniteError) else EXIT_USAGE
