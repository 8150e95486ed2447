"""Shared fixtures: the real embedded r1-tiny model, loaded once per test session."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Where several xdist workers share the cores (scripts/test.sh runs two on two cores), torch in a
# worker and in the processes it starts computes on one thread: two threads per process on cores the
# other worker keeps busy made the in-process model tests about 1.7 times slower (their threads wait
# on each other). Set before torch is imported, so it applies here and is inherited by `r1`
# subprocesses and by the Ray clusters the tests start (whose workers would get one thread for a
# fractional CPU anyway); `tests.serve_helpers.ray_serve` leaves the setting to Ray.
SHARED_CORES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1
if SHARED_CORES:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# `scripts/test.sh` runs the suite on two pytest-xdist workers (`--dist loadscope`). A module is one
# unit of work (its module-scoped fixtures are set up once), except that the modules that start Ray
# clusters, Serve apps or training runs are split into two lanes, each one unit: the two lanes run
# side by side, each lane's modules one after another, so at most two Ray clusters run at once.
# Their start-ups import torch in one process after another, leaving a core idle about half the
# time, which the other lane fills. A new module that starts Ray belongs in a lane. The lanes are
# handed out first, then the other modules in file order.
RAY_LANES = {
    "ray-a": ("test_train_ray", "test_serve_cli", "test_submit", "test_safety_actor", "test_metrics"),
    "ray-b": ("test_serve_api", "test_serve_scaling", "test_sessions_http", "test_session_actors",
              "test_code_validator_actor", "test_telemetry"),
}
_LANE_OF = {module: lane for lane, modules in RAY_LANES.items() for module in modules}


def pytest_collection_modifyitems(config, items):
    order = {lane: rank for rank, lane in enumerate(RAY_LANES)}
    position = {module: rank for lane in RAY_LANES.values() for rank, module in enumerate(lane)}

    def rank(item):
        module = _module(item.nodeid)
        lane = _LANE_OF.get(module)
        return (0, order[lane], position[module]) if lane else (1, 0, 0)

    items.sort(key=rank)  # stable: within a module, and among the other modules, the order stays


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        """loadscope with a lane (see RAY_LANES) as the unit for its modules, a module for the rest."""

        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return _LANE_OF.get(module, nodeid.split("::", 1)[0])

    return LaneScheduling(config, log)


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
