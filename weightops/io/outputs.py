"""Every output weightops writes goes through here, so that it never deletes or overwrites
what it did not write.

An `Output` is planned when a command starts, against every path the command reads: it
refuses an output that is, or is inside, an input (or holds one), a directory where a file
is expected, and anything existing that is not known to be weightops' own. `--force`
replaces only an output weightops wrote (or an empty directory), and says what it removes.

Ownership is recorded on disk, without timestamps (outputs stay byte-deterministic):
a directory weightops wrote carries `.weightops-output.json` listing the files it wrote;
a file carries the extended attribute `user.weightops.output` (where the filesystem takes
one; a file written into a marked directory is also listed in that marker). Inside a
marked directory, a marked sub-directory, a marked file or a stale temporary of ours is
ours too, so a job directory holding step outputs is recognised as a whole.

Writing happens in a hidden temporary sibling (`.NAME.weightops-tmp-*`), held under an
flock for the life of the process; it is published by rename only when the stream ended
cleanly, after checking that OUTPUT is still what was planned for replacement. A
temporary whose lock nobody holds was left by a killed run: the next run writing the
same OUTPUT removes it and says so — unless that run resumes (`Output(..., resume=True)`): it
offers each such temporary to its writer (`writing(adopt=...)`), which continues the first one
it recognises as its own plan (a GGUF file's journal of written tensors, `io.gguf_partial`);
the others are removed as usual.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from ..errors import WeightopsError
from ..progress import human_size
from .atomic import fsync_dir, fsync_tree

MARKER = ".weightops-output.json"
XATTR = "user.weightops.output"
_TEMP = re.compile(r"^\.(?P<name>.+)\.weightops-(?P<kind>tmp|old)-[A-Za-z0-9_]+$")
_SHOWN = 8

Kind = Literal["dir", "file"]


def _say(message: str) -> None:
    print(f"weightops: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- ownership


def content(directory: Path) -> list[Path]:
    """The entries of an output directory as content (without its ownership marker)."""
    return sorted(p for p in Path(directory).iterdir() if p.name != MARKER)


def _marker_files(directory: Path) -> set[str] | None:
    try:
        doc = json.loads((directory / MARKER).read_text())
        files = doc["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else None


def _write_marker(directory: Path, files: Iterable[str]) -> None:
    doc = {"written_by": "weightops", "files": sorted(set(files))}
    (directory / MARKER).write_text(json.dumps(doc, indent=1) + "\n")


def _has_xattr(path: Path) -> bool:
    try:
        return XATTR in os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False


def _set_xattr(path: Path) -> None:
    try:
        os.setxattr(path, XATTR, b"1", follow_symlinks=False)
    except OSError:  # the filesystem takes no user xattrs: the file is then not known to be ours
        pass


def _locked(path: Path) -> bool | None:
    """True when another process holds the temporary's lock (it is being written), False when
    it is stale, None when it vanished."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _is_stale_temp(path: Path) -> bool:
    return bool(_TEMP.match(path.name)) and not path.is_symlink() and _locked(path) is False


def foreign(path: Path) -> list[Path]:
    """What under `path` weightops did not write (empty: all ours, or no files at all).

    A file is ours when it carries the xattr; a directory when it carries a marker and
    every file in it is listed there or is itself ours (a marked sub-directory, a marked
    file, a stale temporary of ours); a directory without a marker only when it holds no
    file at all."""
    path = Path(path)
    if path.is_symlink() or not (path.is_dir() or path.is_file()):
        return [path]
    if path.is_file():
        return [] if _has_xattr(path) else [path]
    listed = _marker_files(path)
    if listed is None:
        return list(_walk_files(path))
    return _foreign_in(path, path, listed)


def _walk_files(directory: Path) -> Iterator[Path]:
    """Every file (and link) under `directory`, in a stable order."""
    for root, dirs, files in os.walk(directory):
        for name in sorted(files):
            yield Path(root) / name
        dirs.sort()
        for d in dirs:
            if os.path.islink(os.path.join(root, d)):
                yield Path(root) / d


def _foreign_in(directory: Path, root: Path, listed: set[str]) -> list[Path]:
    out: list[Path] = []
    for entry in sorted(directory.iterdir()):
        rel = entry.relative_to(root).as_posix()
        if directory == root and entry.name == MARKER:
            continue
        if _TEMP.match(entry.name) and not entry.is_symlink():
            if _locked(entry):
                out.append(entry)  # being written by another weightops process
            continue
        if entry.is_symlink():
            out.append(entry)
        elif entry.is_file():
            if rel not in listed and not _has_xattr(entry):
                out.append(entry)
        elif entry.is_dir():
            out += foreign(entry) if (entry / MARKER).is_file() else _foreign_in(entry, root, listed)
        else:
            out.append(entry)
    return out


def _measure(path: Path) -> tuple[int, int]:
    """(files, bytes) under `path`, links not followed."""
    if not path.is_dir() or path.is_symlink():
        return 1, path.lstat().st_size
    files = list(_walk_files(path))
    return len(files), sum(f.lstat().st_size for f in files)


def _describe(path: Path) -> str:
    n, size = _measure(path)
    return f"{path} ({n} file{'s' if n != 1 else ''}, {human_size(size)})"


def _listing(paths: list[Path], base: Path) -> str:
    names = []
    for p in paths[:_SHOWN]:
        try:
            names.append(str(p.relative_to(base)) if p != base else str(p))
        except ValueError:
            names.append(str(p))
    return ", ".join(names) + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def _files_under(path: Path) -> bool:
    return path.is_file() or path.is_symlink() or any(True for _ in _walk_files(path))


def refusal(path: Path, what: str = "output") -> str | None:
    """Why weightops may not remove `path`, or None when it may (ours, or no files at all)."""
    if not (path.exists() or path.is_symlink()):
        return None
    alien = foreign(path)
    if not alien:
        return None
    if path.is_symlink():
        return f"{what} {path} is a symbolic link, which weightops never writes"
    if path.is_file():
        return f"{what} {path} is a file weightops did not write (it carries no {XATTR} attribute)"
    if not (path / MARKER).is_file():
        return (
            f"{what} {path} is a directory weightops did not write (no {MARKER} in it) holding "
            f"{len(alien)} file(s): {_listing(alien, path)}"
        )
    return (
        f"{what} {path} was written by weightops, but now also holds {len(alien)} file(s) weightops did not "
        f"write: {_listing(alien, path)}"
    )


def remove(path: Path, what: str = "output", announce: bool = True) -> None:
    """Remove an output weightops wrote (saying what goes, unless it is bookkeeping such as a
    job's logs); refuse anything else."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    why = refusal(path, what)
    if why:
        raise WeightopsError(
            f"{why}; weightops only removes what it wrote: move it away yourself, or choose another path"
        )
    _delete(path, f"removing {what}" if announce else None)


def _delete(path: Path, doing: str | None) -> None:
    if doing and _files_under(path):
        _say(f"{doing} {_describe(path)}")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def make_dir(path: Path) -> Path:
    """A directory that weightops fills in place (a job's output, its state): created with an
    empty marker when missing, so that what is later published into it is known as ours."""
    path = Path(path)
    if not path.exists():
        path.mkdir(parents=True)
        _write_marker(path, [])
    return path


def start_file(path: Path, what: str = "file") -> Path:
    """A file written in place as it grows (a live log): an earlier one weightops wrote is
    removed, anything else refused; the new one is marked as ours before its first byte."""
    path = Path(path)
    remove(path, what, announce=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    _set_xattr(path)
    _register(path)
    return path


def _register(path: Path) -> None:
    """List a file just published into a marked directory in that directory's marker (its
    ownership record where the filesystem keeps no xattrs)."""
    parent = path.parent
    if not (parent / MARKER).is_file():
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        listed = _marker_files(parent)
        if listed is not None and path.name not in listed:
            tmp = parent / f".{MARKER}.weightops-tmp-{os.getpid()}"
            doc = {"written_by": "weightops", "files": sorted(listed | {path.name})}
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, parent / MARKER)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- permissions


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_modes(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700; a published output is readable as the umask says."""
    mask = _umask()
    if path.is_file():
        path.chmod(0o666 & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask, follow_symlinks=False)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


# ---------------------------------------------------------------------------------------------- planning


def _resolved(p: Path) -> Path:
    return Path(os.path.abspath(p)).resolve()


def _check_inputs(output: Path, inputs: Iterable[Path | str | None]) -> None:
    out = _resolved(output)
    here = Path.cwd().resolve()
    if out == here or out in here.parents:
        raise WeightopsError(f"output {output} is the current directory, or holds it; choose another output path")
    for inp in inputs:
        if inp is None:
            continue
        src = _resolved(Path(inp))
        if out == src:
            raise WeightopsError(f"output {output} is the input {inp}; choose another output path")
        if src in out.parents:
            raise WeightopsError(f"output {output} is inside the input {inp}; choose another output path")
        if out in src.parents:
            raise WeightopsError(
                f"input {inp} lies inside the output {output}; replacing the output would destroy "
                "it: choose another output path"
            )


def sweep(output: Path, keep: bool = False) -> None:
    """Remove stale temporaries of `output` (their lock is free: a killed run left them);
    `keep` spares the ones a resuming writer may continue (not the trash of a replacement)."""
    for entry in _stale(Path(output)):
        if not (keep and _temp_kind(entry) == "tmp"):
            _drop_stale(entry)


def _stale(output: Path) -> list[Path]:
    parent = output.parent
    if not parent.is_dir():
        return []
    found = []
    for entry in sorted(parent.iterdir()):
        m = _TEMP.match(entry.name)
        if m and m.group("name") == output.name and _is_stale_temp(entry):
            found.append(entry)
    return found


def _temp_kind(entry: Path) -> str:
    """ "tmp" (being written) or "old" (the trash of a replaced output)."""
    m = _TEMP.match(entry.name)
    return m["kind"] if m else ""


def _drop_stale(entry: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _delete(entry, "removing a temporary left by an interrupted run:")


def adopt_stale(output: Path, is_dir: bool, adopt: Callable[[Path], bool]) -> tuple[int, Path] | None:
    """(locked descriptor, path) of the first stale temporary of `output` (a directory when
    `is_dir`) that `adopt` accepts; the ones it refuses are removed, as a run that does not
    resume removes them all."""
    for entry in _stale(output):
        if _temp_kind(entry) != "tmp" or entry.is_dir() != is_dir:
            _drop_stale(entry)
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another run took it meanwhile
            os.close(fd)
            continue
        if adopt(entry):
            _say(f"continuing a temporary left by an interrupted run: {_describe(entry)}")
            return fd, entry
        _drop_stale(entry)
        os.close(fd)
    return None


@contextlib.contextmanager
def locked_temporary(final: Path, is_dir: bool, resume: bool, adopt: Callable[[Path], bool] | None) -> Iterator[Path]:
    """A hidden temporary sibling of `final` (a directory when `is_dir`), locked while the block
    runs and removed at its end unless the block moved it into place. With `resume`, the first
    temporary a killed run left that `adopt` accepts (the others are removed); else, or if none
    is accepted, a new one."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.weightops-tmp-"
    found = adopt_stale(final, is_dir, adopt or (lambda _: False)) if resume else None
    if found is not None:
        fd, tmp = found
    elif is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = os.open(tmp, os.O_RDONLY)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
        tmp = Path(name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        os.close(fd)


class Output:
    """One output of a command, checked when planned and published atomically by `writing()`.

    `inputs` are every path the command reads (positional or by option; None is skipped);
    `kind` is "dir" or "file"; `force` allows replacing an existing output weightops wrote;
    `resume` keeps the temporaries killed runs left, for `writing(adopt=...)` to continue."""

    def __init__(
        self,
        path: str | Path,
        inputs: Iterable[Path | str | None] = (),
        *,
        kind: Kind,
        force: bool = False,
        what: str = "output",
        resume: bool = False,
    ):
        self.path, self.kind, self.force, self.what, self.resume = Path(path), kind, force, what, resume
        if kind == "file" and str(path).endswith(os.sep):
            raise WeightopsError(f"{what} {path} names a directory, but a file is written here: name the file")
        _check_inputs(self.path, inputs)
        self._planned = self._plan()
        sweep(self.path, keep=resume)

    def _plan(self) -> tuple[int, int] | None:
        """(device, inode) of what may be replaced; None when nothing is there."""
        p, what = self.path, self.what
        if not (p.exists() or p.is_symlink()):
            return None
        if self.kind == "file" and p.is_dir() and not p.is_symlink():
            raise WeightopsError(
                f"{what} {p} is a directory, but a file is written here; a directory is never "
                "replaced by a file: name a file (e.g. inside it)"
            )
        why = refusal(p, what)
        if why:
            raise WeightopsError(
                f"{why}; weightops never replaces what it did not write, with or without --force: "
                "move it away yourself, or choose another output path"
            )
        if _files_under(p) and not self.force:
            raise WeightopsError(f"{what} {p} exists and is not empty (weightops wrote it); pass --force to replace it")
        st = p.lstat()
        return st.st_dev, st.st_ino

    @contextlib.contextmanager
    def writing(self, adopt: Callable[[Path], bool] | None = None) -> Iterator[Path]:
        """Yield a locked temporary sibling; on success it becomes the output (see module doc).
        With `resume`, `adopt` is asked (under the temporary's lock) whether a temporary a killed
        run left is worth continuing: the first it accepts is yielded as it is, the others are
        removed."""
        with locked_temporary(self.path, self.kind == "dir", self.resume, adopt) as tmp:
            yield tmp
            self._publish(tmp)

    def _publish(self, tmp: Path) -> None:
        final = self.path
        _publish_modes(tmp)
        if self.kind == "dir":
            _write_marker(tmp, (f.relative_to(tmp).as_posix() for f in _walk_files(tmp)))
        else:
            _set_xattr(tmp)
        fsync_tree(tmp)
        if not (final.exists() or final.is_symlink()):
            self._place(tmp)
        else:
            self._replace(tmp)
        if self.kind == "file":
            _register(final)

    def _replace(self, tmp: Path) -> None:
        """Move the planned output aside (into a locked trash sibling), check it is still what was
        planned, put the new one in place, and only then delete the old one."""
        final = self.path
        if self._planned is None:
            raise self._changed("appeared")
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.weightops-old-", dir=final.parent))
        fd = os.open(trash, os.O_RDONLY)
        old = trash / final.name
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(final, old)
            try:
                st = old.lstat()
                if (st.st_dev, st.st_ino) != self._planned:
                    raise self._changed("was replaced by something else")
                if alien := foreign(old):
                    raise self._changed(f"received files weightops did not write ({_listing(alien, old)})")
                self._place(tmp)
            except BaseException:
                if not (final.exists() or final.is_symlink()):
                    os.rename(old, final)  # put it back as it was
                raise
            n, size = _measure(old)
            if n:
                _say(
                    f"replaced {self.what} {final}; removed the previous one ({n} file{'s' if n != 1 else ''}, "
                    f"{human_size(size)})"
                )
            shutil.rmtree(trash)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                trash.rmdir()

    def _place(self, tmp: Path) -> None:
        final = self.path
        if self.kind == "file":
            try:
                os.link(tmp, final)  # fails if something appeared at `final`: never overwrites
            except FileExistsError:
                raise self._appeared() from None
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if final.exists() or final.is_symlink():
                    raise self._appeared() from None
                os.rename(tmp, final)
            else:
                tmp.unlink()
        else:
            try:
                os.rename(tmp, final)  # fails on a non-empty directory that appeared
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise self._appeared() from None
                raise
        fsync_dir(final.parent)

    def _appeared(self) -> WeightopsError:
        return self._changed("appeared")

    def _changed(self, how: str) -> WeightopsError:
        return WeightopsError(
            f"{self.what} {self.path} {how} while this command was running; it was left alone and nothing was published"
        )
