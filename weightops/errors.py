"""Exceptions that the CLI maps to exit codes (design.md: 1 error, 3 mismatch), and the two
helpers every message uses: `shown` (strings from files, escaped) and `os_error_message`
(an OSError as one line naming the path)."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar


class WeightopsError(Exception):
    """A user-facing failure: the message names the file and tensor; exit code 1."""

    exit_code = 1


class MismatchError(WeightopsError):
    """Verification or manifest mismatch: the data is wrong, not the invocation; exit 3."""

    exit_code = 3


def shown(text: object) -> str:
    """`text` with every non-printable character escaped (`\\n`, `\\x1b`, `\\u2028` ...).

    Tensor names, token strings, config keys and paths come from files that anyone may have
    written: printed raw, a name holding a newline or an ANSI sequence could forge lines of
    our output or recolour the terminal. Printable text is returned unchanged.
    """
    s = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in s)


def os_error_message(e: OSError, path: object = None) -> str:
    """One line: the path (the error's own, else `path`) and the system's reason, e.g.
    `out/model.safetensors: No space left on device`."""
    where = e.filename if e.filename is not None else path
    reason = e.strerror or str(e) or type(e).__name__
    text = f"{shown(where)}: {reason}" if where is not None else reason
    if e.filename2 is not None:
        text += f" (and {shown(e.filename2)})"
    return text


def describe(e: BaseException) -> str:
    """An unexpected exception as text for a message that already names the file: the
    system reason for an OSError, else `Type: message` (a bare KeyError's message is only
    the key)."""
    if isinstance(e, OSError) and e.strerror:
        return os_error_message(e) if e.filename is not None else e.strerror
    if isinstance(e, WeightopsError):
        return str(e)
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


F = TypeVar("F", bound=Callable)


def names_file(what: str) -> Callable[[F], F]:
    """Decorate a reader whose first argument is the file it reads: any failure that is not
    already a WeightopsError becomes one naming that file (`what` says what it should have
    been), so a malformed input never surfaces as a bare `KeyError: 'data_offsets'`."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(path, *args, **kwargs):
            try:
                return fn(path, *args, **kwargs)
            except WeightopsError:
                raise
            except OSError as e:
                raise WeightopsError(os_error_message(e, path)) from e
            except Exception as e:  # a malformed file can make any parser fail
                raise WeightopsError(f"{shown(path)}: not a readable {what}: {describe(e)}") from e

        return wrapper  # type: ignore[return-value]

    return decorate


@contextlib.contextmanager
def writing(path: object, tensor: str | None = None) -> Iterator[None]:
    """Around the writing of output file `path` (or the computing and writing of one of its
    tensors): a failure that is not already a WeightopsError (a full disk, a quantization
    kernel that rejects the values) becomes one naming the file, and the tensor if given.
    A write error of an open file carries no path of its own."""
    where = f" (writing tensor {tensor!r})" if tensor is not None else ""
    try:
        yield
    except WeightopsError:
        raise
    except OSError as e:
        raise WeightopsError(f"{os_error_message(e, path)}{where}") from e
    except Exception as e:
        raise WeightopsError(
            f"{shown(path)}: " + (f"tensor {tensor!r}: " if tensor is not None else "") + describe(e)
        ) from e
