"""`heap.one_malloc_arena`: the command-line processes ask glibc for one malloc arena, unless the
user's environment already says how many."""

from __future__ import annotations

from weightops import heap


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


def test_asks_for_one_arena(monkeypatch):
    libc = _Libc()
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: libc)
    heap.one_malloc_arena()
    assert libc.calls == [(-8, 1)]  # M_ARENA_MAX in glibc's malloc.h


def test_keeps_the_users_setting_and_other_c_libraries_alone(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    heap.one_malloc_arena()
    assert libc.calls == []
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: object())  # no mallopt (musl, macOS)
    heap.one_malloc_arena()
