"""Building a checkpoint folder safely: staged next to its destination, published atomically.

A conversion writes into a hidden staging folder next to ``output_dir`` and renames it into place
only when complete; ``overwrite`` moves the previous output aside and removes it only once the new
one is in place. Staging folders left by a dead process are cleared (or the previous output
restored) by the next run to the same ``output_dir``. Nothing here knows what the files hold.
"""

import contextlib
import errno
import logging
import os
import re
import shlex
import shutil
import socket
import tempfile
from pathlib import Path

from ..options import literal, option_error
from .units import format_bytes

logger = logging.getLogger(__name__)

# Staging folders sit next to OUTPUT_DIR as .<name>.hf-moe-upcycle-<state>.<host>.<pid>.<random>:
# "unfinished" while a conversion writes, "replaced" for the previous output during --overwrite.
# The host and pid tell a later run whether the conversion that made one is still alive.
STAGING_TAG = "hf-moe-upcycle"
NEW_OUTPUT_MARKER = f".{STAGING_TAG}-new-output"  # in a replaced folder: the identity of the new output
HOST = re.sub(r"[^\w-]", "-", socket.gethostname()) or "localhost"


def real_output_dir(output_dir) -> Path:
    """The output path with its parent's symlinks resolved; a symlink as the output itself is refused,
    since publishing renames folders and replacing would act on the link's target."""
    path = Path(output_dir).expanduser().absolute()
    if path.is_symlink():
        raise option_error(
            ValueError,
            f"{{output_dir=}} is a symbolic link (to {literal(repr(os.readlink(path)))}); pass a real directory path, "
            "e.g. the link's target",
            output_dir=str(output_dir),
        )
    return path.parent.resolve() / path.name


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise option_error(FileExistsError, "{output_dir=} exists and is not a directory", output_dir=str(output_dir))
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise option_error(
            FileExistsError,
            "{output_dir=} is not empty; pass {overwrite=} to replace it",
            output_dir=str(output_dir),
            overwrite=True,
        )


def check_disk_space(output_dir: Path, needed: int) -> None:
    """Refuse an output that cannot be written, or whose disk lacks ``needed`` bytes, before writing."""
    existing = next((p for p in output_dir.parents if p.exists()), output_dir.parent)
    problem = None
    if not existing.is_dir():
        problem = f"{str(existing)!r} is not a directory"
    elif os.statvfs(existing).f_blocks == 0:  # /proc, /sys: they report 0 bytes free of 0
        problem = f"{str(existing)!r} is on a pseudo-filesystem (such as /proc or /sys) that stores no files"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"no permission to create folders in {str(existing)!r}"
    if problem:
        raise option_error(
            PermissionError, f"{{output_dir=}} cannot be written: {literal(problem)}", output_dir=str(output_dir)
        )
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"No disk space: the MoE checkpoint needs {format_bytes(needed)} "
            f"but only {format_bytes(free)} are free on {existing}",
        )


def staging_prefix(output_dir: Path, state: str) -> str:
    return f".{output_dir.name}.{STAGING_TAG}-{state}.{HOST}.{os.getpid()}."


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clear_stale_staging(output_dir: Path) -> None:
    """Deal with the staging folders of earlier conversions to ``output_dir`` that never finished.

    Left by a conversion on this host whose process is gone (killed, machine crash): an unfinished
    folder is removed; a replaced one (the previous output, moved aside during ``overwrite``) is
    removed when the new output was published, and moved back otherwise. A folder of a live process (or
    of one that reused its pid), or of another host, is not touched: the conversion is refused with the
    command that removes it.
    """
    pattern = re.compile(
        rf"\.{re.escape(output_dir.name)}\.{STAGING_TAG}-(?P<state>unfinished|replaced)\.(?P<host>[\w-]+)\.(?P<pid>\d+)\."
    )
    if not output_dir.parent.is_dir():
        return
    for path in sorted(output_dir.parent.iterdir()):
        match = pattern.match(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        pid, host, state = int(match["pid"]), match["host"], match["state"]
        if host != HOST or _process_alive(pid):
            where = f"pid {pid}" + ("" if host == HOST else f" on host {host}")
            raise option_error(
                FileExistsError,
                f"Another conversion to {{output_dir=}} ({literal(where)}) is running or was interrupted: its {state} "
                f"folder {literal(repr(str(path)))} exists. Wait for it to finish or, if it is not running, remove the "
                f"folder: rm -rf {literal(shlex.quote(str(path)))}",
                output_dir=str(output_dir),
            )
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
        if state == "unfinished":
            shutil.rmtree(path)
            logger.warning(
                f"Removed {path} ({format_bytes(size)}), left by a conversion (pid {pid}) that did not finish"
            )
        elif _settle_replaced(path, output_dir, f"a conversion (pid {pid}) that died during overwrite"):
            logger.warning(f"Restored {output_dir} from {path.name}, left by a conversion (pid {pid}) that died")
        else:
            logger.warning(
                f"Removed {path} ({format_bytes(size)}): the output it held was replaced by a conversion "
                f"(pid {pid}) that published its new output and died before removing the old one"
            )


def _folder_id(path: Path) -> str:
    """What stays the same when a folder is renamed, and differs for a folder made anew."""
    info = path.stat()
    return f"{info.st_dev}:{info.st_ino}"


def _settle_replaced(replaced: Path, output_dir: Path, by: str) -> bool:
    """Put the previous output held in ``replaced`` back, unless the new output is in place.

    ``replaced`` holds the previous output under its own name and NEW_OUTPUT_MARKER, the identity
    of the folder meant to replace it. Only that folder, in place at ``output_dir``, makes the
    previous output obsolete; a missing or empty ``output_dir`` (``mkdir -p`` in a script) gets the
    previous output back, and any other content there is refused with both paths named.
    Returns True when the previous output was restored, False when ``replaced`` was removed.
    """
    previous = replaced / output_dir.name
    marker = replaced / NEW_OUTPUT_MARKER
    published = (
        previous.is_dir()
        and marker.is_file()
        and output_dir.is_dir()
        and not output_dir.is_symlink()
        and _folder_id(output_dir) == marker.read_text()
    )
    if not previous.is_dir() or published:
        shutil.rmtree(replaced)
        return False
    if output_dir.is_dir() and not output_dir.is_symlink() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    if output_dir.exists() or output_dir.is_symlink():
        found = sorted(p.name for p in output_dir.iterdir())[:5] if output_dir.is_dir() else []
        raise option_error(
            FileExistsError,
            f"{{output_dir=}} holds other files ({literal(found or 'not a folder')}), and the previous output, moved "
            f"aside by {literal(by)}, is in {literal(repr(str(previous)))}. Move those files away to get the previous "
            f"output back on the next run, or drop it: rm -rf {literal(shlex.quote(str(replaced)))}",
            output_dir=str(output_dir),
        )
    os.rename(previous, output_dir)
    shutil.rmtree(replaced)
    return True


def _publish(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing non-empty one is replaced only with
    ``overwrite``, and only now that the new one is complete."""
    if output_dir.is_symlink():  # made a link while the conversion ran
        raise option_error(
            FileExistsError, "{output_dir=} became a symbolic link during the conversion", output_dir=str(output_dir)
        )
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise option_error(
                FileExistsError,
                "{output_dir=} is not empty (written while this conversion ran?); pass {overwrite=} to replace it",
                output_dir=str(output_dir),
                overwrite=True,
            )
        replaced = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir, "replaced"), dir=output_dir.parent))
        (replaced / NEW_OUTPUT_MARKER).write_text(_folder_id(staging))  # what a later run compares with
        try:
            os.rename(output_dir, replaced / output_dir.name)
            os.rename(staging, output_dir)
        except BaseException:  # Ctrl-C included: put the previous output back unless the new one is in place
            with contextlib.suppress(OSError):  # if it cannot be settled now, the next run does it
                _settle_replaced(replaced, output_dir, "this conversion")
            raise
        shutil.rmtree(replaced)
        return
    try:
        if output_dir.is_dir():
            output_dir.rmdir()
        os.rename(staging, output_dir)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise option_error(
            FileExistsError,
            "{output_dir=} was filled by another process while this conversion ran; it was left as it is",
            output_dir=str(output_dir),
        ) from None


@contextlib.contextmanager
def staged_output(output_dir: Path, overwrite: bool, weight_bytes: int):
    """A hidden folder next to ``output_dir`` to build the output in; published with `_publish`
    when the block completes, removed on any failure (Ctrl-C included). A full disk is reported
    with the size of the weights being written."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output_dir, "unfinished"), dir=output_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the published folder should not be
        yield staging
        _publish(staging, output_dir, overwrite)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"No disk space left on {output_dir.parent} while writing the MoE checkpoint "
                f"({format_bytes(weight_bytes)} of weights); nothing was written to output_dir",
            ) from None
        raise
