"""Shared fixtures: the read-only data in ../shared/data and the funasr reference package."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set PARATUNE_SHARED_DATA or place ../shared/data)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def zh_real(shared_data) -> Path:
    return _need(shared_data / "zh_real")


@pytest.fixture(scope="session")
def large_dir(shared_data) -> Path:
    return _need(shared_data / "paraformer_large")


@pytest.fixture(scope="session")
def funasr():
    """The reference package. In CI it must be present: parity tests never skip there."""
    try:
        import funasr  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("funasr==1.4.16 is not installed but CI must run the parity tests")
        pytest.skip("funasr==1.4.16 not installed (pip install -e '.[reference]')")
    return funasr
