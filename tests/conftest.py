import contextlib
import os
import sys

import pytest

# tests import helpers such as comfy_host by plain name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the workflow builder, for tests that lay out rewritten graphs
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows"))


def pytest_addoption(parser):
    parser.addoption("--comfyui-only", action="store_true",
                     help="leave out the engine's own tests (marked `engine`: no ComfyUI in them); scripts/test.sh "
                          "passes it on the second host, where they already ran")
    parser.addoption("--quick", action="store_true",
                     help="only the tests that start no rank process and no server (not multirank, not e2e)")


def pytest_collection_modifyitems(config, items):
    drop = []
    if config.getoption("--comfyui-only"):
        drop += [i for i in items if i.get_closest_marker("engine")]
    if config.getoption("--quick"):
        drop += [i for i in items if i.get_closest_marker("multirank") or i.get_closest_marker("e2e")]
    if drop:
        ids = {id(i) for i in drop}
        config.hook.pytest_deselected(items=drop)
        items[:] = [i for i in items if id(i) not in ids]


@contextlib.contextmanager
def _no_process_starts(item):
    """Under --quick a test that starts a process is unmarked: fail it, naming the marker it needs. Around the setup
    too, so a module- or session-scoped fixture that spawns ranks is caught with the first test that asks for it."""
    if not item.config.getoption("--quick"):
        yield
        return
    import multiprocessing.process
    import subprocess
    from unittest import mock

    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{item.nodeid} starts a process: mark it `multirank` (ranks, other processes) "
                             f"or `e2e` (a ComfyUI server), so --quick leaves it out")
    with mock.patch.object(multiprocessing.process.BaseProcess, "start", refuse), \
            mock.patch.object(subprocess.Popen, "__init__", refuse):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_process_starts(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_process_starts(item):
        yield
