"""An output that is one file or a set of sibling files (a GGUF split set), published as a
whole: every file of the set, or none of them.

It extends `io.outputs`' rules to a *slot*: the named path and every sibling that an earlier
write to it may have left (`belongs(name)`: for GGUF, `NAME-0000k-of-0000N.gguf` of any N).
Planned when the command starts: a slot member weightops did not write is refused (when the
output may be a set; a single file only refuses its own path), one it wrote is replaced only
with `force`, and stale temporaries of a killed run are removed. The files are written into
one locked temporary (a file, or a directory holding the set under its final names); at the
end every file gets the ownership attribute and one set id (`gguf_split.SET_XATTR`, so a
reader can tell a file of another run), the previous slot members are moved aside into a
locked trash and checked to be what was planned, the new files are linked into place, the
first one (the one readers open) last, and only then is the old set deleted. Any failure
before that puts everything back as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import WeightopsError
from ..progress import human_size
from .atomic import fsync_dir, fsync_tree
from .outputs import (
    _check_inputs,
    _listing,
    _publish_modes,
    _register,
    _say,
    _set_xattr,
    locked_temporary,
    refusal,
    sweep,
)


class OutputSet:
    """The slot of `path`; `writing(several)` yields where to write (see the module doc)."""

    def __init__(
        self,
        path: str | Path,
        inputs: Iterable[Path | str | None] = (),
        *,
        belongs: Callable[[str], bool],
        set_id_xattr: str,
        may_split: bool = True,
        force: bool = False,
        what: str = "output",
        resume: bool = False,
    ):
        self.resume = resume
        self.path, self.belongs, self.xattr, self.what = Path(path), belongs, set_id_xattr, what
        if str(path).endswith(os.sep) or (self.path.is_dir() and not self.path.is_symlink()):
            raise WeightopsError(f"{what} {path} names a directory, but a file is written here: name the file")
        inputs = list(inputs)
        _check_inputs(self.path, inputs)
        self._replace: dict[str, tuple[int, int]] = {}
        self._kept: set[str] = set()
        ours = []
        for p in self._members():
            _check_inputs(p, inputs)
            why = refusal(p, what)
            if why and (may_split or p.name == self.path.name):
                raise WeightopsError(
                    f"{why}; weightops never replaces what it did not write, with or without --force: "
                    "move it away yourself, or choose another output path"
                )
            if why:
                self._kept.add(p.name)  # a single file is written: another set of this stem is not in the way
                continue
            st = p.lstat()
            self._replace[p.name] = (st.st_dev, st.st_ino)
            ours.append(p)
        if ours and not force:
            raise WeightopsError(
                f"{what} {self.path} exists (weightops wrote {_listing(ours, self.path.parent)}); "
                "pass --force to replace it"
            )
        sweep(self.path, keep=resume)

    def _members(self) -> list[Path]:
        parent = self.path.parent
        if not parent.is_dir():
            return []
        return sorted(p for p in parent.iterdir() if self.belongs(p.name))

    @contextlib.contextmanager
    def writing(self, several: bool, adopt: Callable[[Path], bool] | None = None) -> Iterator[Path]:
        """Yield the path to write: a locked temporary file, or (`several`) the output's name
        inside a locked temporary directory, next to which the writer puts every file of the set
        under its final name. Published when the block ends cleanly, removed otherwise. With
        `resume`, `adopt` is offered (that path in) each temporary a killed run left, as
        `Output.writing` offers them: the first it accepts is continued."""
        offered = None if adopt is None else (lambda e: adopt(e / self.path.name if several else e))
        with locked_temporary(self.path, several, self.resume, offered) as tmp:
            yield tmp / self.path.name if several else tmp
            self._publish({f.name: f for f in sorted(tmp.iterdir())} if several else {self.path.name: tmp})

    def published(self) -> list[Path]:
        """The files of the set now in place, in order (after `writing` ended)."""
        return [p for p in self._members() if p.name not in self._kept]

    def _publish(self, files: dict[str, Path]) -> None:
        strays = [n for n in files if not self.belongs(n)]
        if strays or not files:
            raise ValueError(f"OutputSet: files outside the slot of {self.path}: {strays or 'none written'}")
        set_id = uuid.uuid4().hex.encode()
        for f in files.values():
            _publish_modes(f)
            _set_xattr(f)
            with contextlib.suppress(OSError):  # no user xattrs here: the structural checks remain
                os.setxattr(f, self.xattr, set_id, follow_symlinks=False)
            fsync_tree(f)
        parent = self.path.parent
        trash = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.weightops-old-", dir=parent))
        fd = os.open(trash, os.O_RDONLY)
        moved: list[str] = []
        placed: list[Path] = []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                for p in self._members():
                    if p.name in self._kept:
                        continue
                    if p.name not in self._replace:
                        raise self._appeared(p.name)
                    os.rename(p, trash / p.name)
                    moved.append(p.name)
                    st = (trash / p.name).lstat()
                    if (st.st_dev, st.st_ino) != self._replace[p.name]:
                        raise self._changed(f"had {p.name} replaced by something else")
                for name in sorted(files, reverse=True):  # the first file, which readers open, last
                    self._place(files[name], parent / name)
                    placed.append(parent / name)
            except BaseException:
                for p in placed:
                    with contextlib.suppress(OSError):
                        p.unlink()
                for name in moved:
                    if not (parent / name).exists():
                        os.rename(trash / name, parent / name)  # put it back as it was
                raise
            fsync_dir(parent)
            for p in placed:
                _register(p)
            if moved:
                size = sum((trash / n).lstat().st_size for n in moved)
                _say(
                    f"replaced {self.what} {self.path}; removed the previous one ({len(moved)} "
                    f"file{'s' if len(moved) != 1 else ''}, {human_size(size)})"
                )
            shutil.rmtree(trash)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                shutil.rmtree(trash)

    def _place(self, src: Path, final: Path) -> None:
        try:
            os.link(src, final)  # fails if something appeared at `final`: never overwrites
        except FileExistsError:
            raise self._appeared(final.name) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if final.exists() or final.is_symlink():
                raise self._appeared(final.name) from None
            os.rename(src, final)

    def _appeared(self, name: str) -> WeightopsError:
        return self._changed("appeared" if name == self.path.name else f"(its sibling {name}) appeared")

    def _changed(self, how: str) -> WeightopsError:
        return WeightopsError(
            f"{self.what} {self.path} {how} while this command was running; it was left alone and nothing was published"
        )
