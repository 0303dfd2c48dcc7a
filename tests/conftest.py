import os
import sys

# tests import small helpers (refmodels.py, ...) from this folder
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture()
def no_grad():
    """Inference only, without leaking a global no-grad state into other test modules (training tests need grad).
    Modules opt in with `pytestmark = pytest.mark.usefixtures("no_grad")`."""
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def grad_mode_is_left_as_found():
    """A test (or a benchmark's main() it calls) that leaves autograd switched off breaks every training test
    after it, far from the cause: restore the mode and fail the test that changed it."""
    before = torch.is_grad_enabled()
    yield
    after = torch.is_grad_enabled()
    if after != before:
        torch.set_grad_enabled(before)
        pytest.fail(f"this test left torch.is_grad_enabled() == {after} (it was {before}); "
                    "use `with torch.no_grad():` or the no_grad fixture instead of torch.set_grad_enabled")


@pytest.fixture()
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core box OpenMP barriers make them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
