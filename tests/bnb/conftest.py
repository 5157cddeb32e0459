"""KL divergences of the quantized tiny models against the originals, printed after the run."""
from __future__ import annotations

import pytest

_KLD: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="session")
def kld_report() -> dict[str, tuple[float, float]]:
    """`kld_report[label] = (mean KLD, max KLD)`; shown in the terminal summary."""
    return _KLD


def pytest_terminal_summary(terminalreporter) -> None:
    if _KLD:
        terminalreporter.section("bitsandbytes: KL divergence vs the original bf16 model (32 tokens)")
        for label, (mean, worst) in sorted(_KLD.items()):
            terminalreporter.write_line(f"{label:<24} mean {mean:.6f}   max {worst:.6f}")
