"""Shared fixtures."""

from contextlib import contextmanager

import pytest

import rootless


@pytest.fixture(scope="session")
def rootless_kernel():
    """A `rootless.RootlessKernel`: a real kernel run by an unprivileged user, nsmagic installed.

    Shared by the whole session (its set-up takes 10-25 s); tests must leave it usable.
    """
    reason = rootless.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with rootless.RootlessEnv() as env, env.kernel() as kernel:
        yield kernel


@pytest.fixture(scope="session")
def student(rootless_kernel):
    """The rootless kernel with nsmagic loaded (and os, socket imported): a student's notebook."""
    rootless_kernel.execute("%load_ext nsmagic\nimport os, socket").ok()
    return rootless_kernel


@contextmanager
def _kernel_with_nsmagic():
    from kernel import Kernel

    k = Kernel.start()
    try:
        k.execute("%load_ext nsmagic").ok()
        yield k
    finally:
        k.shutdown()


@pytest.fixture(scope="session")
def kernel():
    """A real ipykernel (jupyter_client) with nsmagic loaded, shared by the session's tests.

    Tests must leave it usable; those that may break a kernel start their own.
    """
    with _kernel_with_nsmagic() as k:
        yield k


@pytest.fixture
def fresh_kernel():
    """A kernel of the test's own, for tests that count what a kernel leaks or interrupt it."""
    with _kernel_with_nsmagic() as k:
        yield k
