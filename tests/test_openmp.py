"""The engine gives back OpenMP workers so its decode thread keeps the cores' full speed.

Each check runs in a fresh interpreter with two torch threads (the suite's own processes run with
one, where torch starts no OpenMP workers at all) and counts the process's threads that are not
Python threads: OpenMP's workers are among them, and nothing else here starts such threads once
the model is loaded and the tokenizer has run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PRELUDE = r"""
import json, os, threading, time
import torch
torch.set_num_threads(2)

def foreign_threads():
    python = {t.native_id for t in threading.enumerate()}
    return len([tid for tid in os.listdir("/proc/self/task") if int(tid) not in python])

def parallel_work():
    a = torch.randn(512, 512)
    for _ in range(3):
        a = (a @ a).tanh()
"""


def run(script: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PRELUDE + script], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_release_gives_back_the_calling_threads_workers():
    counts = run(r"""
from r1.engine.openmp import release_thread_pool
start = foreign_threads()
parallel_work()
with_workers = foreign_threads()
released = release_thread_pool()
print(json.dumps({"start": start, "with_workers": with_workers, "released": released, "after": foreign_threads(), "again": release_thread_pool()}))
""")
    assert counts["with_workers"] > counts["start"], counts  # two torch threads: OpenMP started a worker
    assert counts["released"] is True and counts["again"] is True
    assert counts["after"] == counts["start"], counts


def test_the_engine_runs_the_model_on_one_team_and_gives_it_back_when_idle():
    counts = run(r"""
import asyncio
from r1.config import ModelConfig, EngineConfig, SamplingConfig
from r1.engine import create_engine

engine = create_engine(ModelConfig(model="r1-tiny"), EngineConfig(max_num_seqs=4))
engine.warmup()  # steps in this thread: its team is built here
request = engine.make_request("1 + 2 =", SamplingConfig(temperature=0, max_new_tokens=24, ignore_eos=True))
parallel_work()
before = foreign_threads()

async def generate():
    return sum([len(d.token_ids) async for d in engine.stream(request)])

tokens = asyncio.run(generate())  # start() gave back this thread's team; the decode thread built its own
deadline = time.monotonic() + 30
while foreign_threads() >= before and time.monotonic() < deadline:  # the idle loop gives back its team
    time.sleep(0.05)
idle = foreign_threads()
engine.shutdown()
print(json.dumps({"before": before, "tokens": tokens, "idle": idle}))
""")
    assert counts["tokens"] == 24
    assert counts["idle"] < counts["before"], counts  # neither this thread's team nor the decode thread's is left
