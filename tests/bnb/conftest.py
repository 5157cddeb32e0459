"""KL divergences (`weightops verify`) of the quantized tiny models against the originals,
printed after the run."""
from __future__ import annotations

import pytest

_KLD: dict[str, tuple[float, float, float, int]] = {}


@pytest.fixture(scope="session")
def kld_report() -> dict[str, tuple[float, float, float, int]]:
    """`kld_report[label] = (mean KLD, max KLD, top-1 agreement, tokens)` from `weightops verify`;
    shown in the terminal summary."""
    return _KLD


def pytest_terminal_summary(terminalreporter) -> None:
    if _KLD:
        terminalreporter.section("bitsandbytes: weightops verify, original bf16 model vs quantized")
        for label, (mean, worst, top1, tokens) in sorted(_KLD.items()):
            terminalreporter.write_line(f"{label:<20} KLD mean {mean:.6f}  max {worst:.6f}  top-1 {top1:6.1%}  "
                                        f"({tokens} tokens)")
