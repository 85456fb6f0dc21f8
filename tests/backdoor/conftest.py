"""Shared setup of the backdoor tests: every test runs with one intra-op thread (the
``one_thread`` fixture of ``tests/conftest.py``)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread_for_backdoor_tests(one_thread):
    yield
