"""Shared fixtures: the real embedded r1-tiny model, loaded once per test session."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the shipped r1-tiny, in fp32 on CPU."""
    from r1.config import ModelConfig
    from r1.model import load_model

    return load_model(ModelConfig(model="r1-tiny", device="cpu", dtype="fp32"))


# Seconds per test module (setup + call + teardown): a line as each module ends, and a ranked line
# at the end of the run, so that even a cut-off CI log shows where the time went.
_module_seconds: dict[str, float] = {}


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_runtest_logreport(report):
    module = _module(report.nodeid)
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


_ending_module: str | None = None  # set while the last test of a module runs


def pytest_runtest_protocol(item, nextitem):
    global _ending_module
    if nextitem is None or _module(nextitem.nodeid) != _module(item.nodeid):
        _ending_module = _module(item.nodeid)


def pytest_runtest_logfinish(nodeid, location):
    global _ending_module
    if _ending_module == _module(nodeid):
        sys.stderr.write(f"\n[{_ending_module}: {_module_seconds[_ending_module]:.0f} s]\n")
        _ending_module = None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if _module_seconds:
        ranked = sorted(_module_seconds.items(), key=lambda item: -item[1])
        terminalreporter.write_line(
            "seconds per module: " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in ranked)
        )


@pytest.fixture(scope="session")
def untrained_tiny(tmp_path_factory) -> str:
    """Directory of a freshly built, untrained r1-tiny (`r1 model build-tiny`)."""
    from r1.model.tiny import build_tiny

    return str(build_tiny(tmp_path_factory.mktemp("untrained-tiny")))


# The run's verdict is final once pytest has reported it. The native libraries the tests load
# (Ray's core worker, torch's and oneDNN's thread pools) still own threads at that point, and
# finalizing the interpreter under them once crashed the process with SIGSEGV (exit 139) after a
# full run in which every test had passed. So the process ends with pytest's own exit status, after
# pytest's last report, without that finalization.
_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _exit_status is None:
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
    os._exit(_exit_status)
