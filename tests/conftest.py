"""Shared fixtures: the read-only data in ../shared/data and the funasr reference package."""
import gc
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARATUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set PARATUNE_SHARED_DATA or place ../shared/data)")
    return path


@pytest.fixture(scope="session", autouse=True)
def fit_cache(tmp_path_factory) -> Path:
    """One memory-fit cache for the whole session ($PARATUNE_CACHE, inherited by every paratune process a
    test starts): a fit is deterministic given the model config, the step options and the range, so the
    tests that plan or train the same model share it instead of refitting (about 14 s for the FSDD
    recipe model). Nothing reads or writes the user's ~/.cache. A test that inspects or calibrates the
    cache sets a private one of its own. Under pytest-xdist the workers share it (writes are atomic)."""
    base = tmp_path_factory.getbasetemp()
    path = base.parent / "fit_cache" if os.environ.get("PYTEST_XDIST_WORKER") else base / "fit_cache"
    path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARATUNE_CACHE", str(path))
        yield path


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


def pytest_configure(config):
    """Under pytest-xdist (`python3 dev.py test` runs one worker per core) each worker and every process a
    test starts computes on one thread: two processes of two OpenMP threads each on two cores spin
    against each other, a small training loop ran 12 times slower than alone. For the same reason a
    fit traces its shapes in its own process, not in a pool of one process per core (the memory tests
    took 411 s instead of 356 s on two workers); test_estimate checks the pools with workers=2."""
    import torch
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ.setdefault("PARATUNE_TRACE_WORKERS", "1")
        torch.set_num_threads(1)
    config.stash[_THREADS] = torch.get_num_threads()


def pytest_runtest_teardown(item):
    """FunASR's AutoModel sets torch's thread count to 4 for the whole process: the tests after one that
    loads a model through it would compute on 4 threads on 2 cores (test_parity's large case took 699 s
    instead of 19 s on a worker after test_modeldir's). Each test starts with the session's count."""
    import torch
    if torch.get_num_threads() != item.config.stash[_THREADS]:
        torch.set_num_threads(item.config.stash[_THREADS])


def pytest_collection_finish(session):
    """Everything imported and collected so far (torch, funasr, transformers, every test module) goes into
    gc's permanent generation: a full collection, which the trainer runs after each out-of-memory split
    and Python runs on its own as objects accumulate, then walks only what the tests made since, not
    the millions of objects of the imports (0.1-0.5 s a collection otherwise)."""
    gc.collect()
    gc.freeze()


def pytest_runtest_setup(item):
    """Again at each test module's first test (before its fixtures are made): what earlier modules
    imported lazily (torch._dynamo with the first fake tensor, matplotlib, tensorboard, bitsandbytes:
    over 100,000 objects each) stops costing every later collection. Garbage is collected first, so
    nothing freeable is frozen; what is frozen was alive anyway."""
    module = item.module.__name__ if item.module else None
    if module != item.session.stash.get(_FROZEN_AT, None):
        item.session.stash[_FROZEN_AT] = module
        gc.collect()
        gc.freeze()


_FROZEN_AT = pytest.StashKey[str]()  # the test module whose first test last froze gc
_THREADS = pytest.StashKey[int]()  # torch's thread count for every test (one per pytest-xdist worker)
