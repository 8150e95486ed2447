"""Serving load test: the full stack over HTTP vs the engine in-process vs naive `generate` loops.

For each concurrency level, the same requests (chat prompts, greedy, EOS ignored so every request
generates exactly `--new-tokens`) go to:

- stack:   real Ray Serve over HTTP (ingress → LLMServer → engine), streamed with SSE;
- engine:  the same engine in this process, `engine.stream` (no Ray, no HTTP), on a copy of the
           model with the served engine's options applied (`prepack: auto` packs it on a CPU);
- loop:    one `model.generate` call after another (the plain model, as loaded);
- static:  one left-padded `model.generate` batch of all requests (at the top concurrency), of the
           plain model, and once more of the model as served when the engine's options changed it.

It prints TTFT, time per output token (TPOT), end-to-end p50/p99, tokens/s and error rate, the
stack's ratios to the static batch and to the loop, and the pipeline overhead per request (p50 e2e
of the stack minus the engine's at concurrency 1). The overhead is also measured in pairs: each
prompt through the stack and, right before or after it, through the engine on the served engine's
torch threads; the median of the per-prompt differences does not move with the machine's speed
between levels. The same pairs with 1-token requests measure the overhead's fixed part (HTTP, the
proxy, screening, the session, the hops to the first token and the end), where the engine's own
time is one prefill, so single requests spread far less: it is a lower bound on every request's
overhead. Last, Ray Serve's own floor for that path: an app with no model and no r1 code (an
ingress like the stack's that answers JSON, one that first calls another deployment, one that
streams one item from another deployment as SSE: the stack's path to the LLM server, empty),
timed in interleaved rounds on the same machine in the same run; then once more on a fresh local
Ray with Serve's experimental direct ingress (no proxy), which shows what the proxy costs.

    python -m bench.serving [--concurrency 1,4,16] [--new-tokens 64] [--requests-per-level 32]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import tempfile
import time

import httpx
import torch

from bench.contract import command_line, finish, ratio, target_note
from bench.engine import bench_static, make_prompts
from r1.config import EngineConfig, ModelConfig, SamplingConfig
from r1.engine import TransformersEngine
from r1.engine.optimize import Int8DynamicLinear, PackedLinear, apply_engine_options
from r1.model import load_model


def overhead_note(label: str, overhead_ms: float, target_ms: float = 5.0) -> str:
    """The overhead target's line. A negative overhead is not a result: the stack cannot be faster
    than the engine it wraps, so the run's request-to-request spread exceeded the overhead."""
    if overhead_ms < 0:
        return (f"{label}: {overhead_ms:.1f} ms (target ≤ {target_ms:g} ms): not resolved: negative, so this run's "
                "spread between single requests is larger than the overhead (see the quartiles)")
    return target_note(label, overhead_ms, target_ms, at_least=False, unit="ms")


def served_model_options(model) -> list[str]:
    """The engine options that changed `model` (what `apply_engine_options` did to it), by name."""
    kinds = {type(module) for module in model.modules()}
    return ([name for name, kind in (("prepack", PackedLinear), ("int8", Int8DynamicLinear)) if kind in kinds]
            + (["compile"] if getattr(model.forward, "r1_compiled", False) else []))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(name: str, concurrency: int, records: list[dict], elapsed: float) -> dict:
    ok = [r for r in records if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    e2e = [r["e2e"] for r in ok] or [float("nan")]
    ttft = [r["ttft"] for r in ok] or [float("nan")]
    tpot = [(r["e2e"] - r["ttft"]) / max(r["tokens"] - 1, 1) for r in ok] or [float("nan")]
    return {
        "method": name, "concurrency": concurrency, "requests": len(records), "tok_s": tokens / elapsed,
        "ttft_p50_ms": 1000 * percentile(ttft, 0.5), "tpot_p50_ms": 1000 * percentile(tpot, 0.5),
        "e2e_p50_ms": 1000 * percentile(e2e, 0.5), "e2e_p99_ms": 1000 * percentile(e2e, 0.99),
        "error_rate": 1 - len(ok) / len(records),
    }


async def run_level(one, prompts: list, concurrency: int) -> tuple[list[dict], float]:
    queue = list(prompts)
    records: list[dict] = []

    async def worker():
        while queue:
            records.append(await one(queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - start


def stack_request(http: httpx.AsyncClient, url: str, new_tokens: int):
    async def one(messages) -> dict:
        body = {"model": "r1-tiny", "messages": messages, "max_tokens": new_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        start = time.perf_counter()
        ttft, tokens = None, 0
        try:
            async with http.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    return {"ok": False}
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"]:
                        ttft = time.perf_counter() - start
        except httpx.HTTPError:
            return {"ok": False}
        return {"ok": tokens > 0, "ttft": ttft or 0.0, "e2e": time.perf_counter() - start, "tokens": tokens}

    return one


def engine_request(engine: TransformersEngine, sampling: SamplingConfig):
    async def one(messages) -> dict:
        start = time.perf_counter()
        ttft, tokens = None, 0
        async for delta in engine.stream(messages, sampling):
            tokens += len(delta.token_ids)
            if ttft is None:
                ttft = time.perf_counter() - start
        return {"ok": True, "ttft": ttft, "e2e": time.perf_counter() - start, "tokens": tokens}

    return one


async def paired_with_stack(stack_one, model, tokenizer, threads: int, sampling: SamplingConfig,
                            chats: list) -> tuple[dict, list[float]]:
    """Concurrency 1, in pairs: each prompt through the stack and through a fresh in-process engine
    whose decode thread runs torch on `threads` threads (the served engine's), one right after the
    other, the order alternating. The per-prompt e2e differences are the pipeline's cost with the
    machine's speed drift cancelled (unpaired levels run minutes apart). Returns the engine's row
    and the differences in seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # read by threads started from now on: the new engine's decode thread
    engine = TransformersEngine(model, tokenizer, EngineConfig(max_num_seqs=64))
    try:
        engine_one = engine_request(engine, sampling)
        await run_level(engine_request(engine, SamplingConfig(temperature=0, max_new_tokens=4)), chats[:2], 1)
        engine_records, differences = [], []
        for index, chat in enumerate(chats):
            if index % 2:
                stack = await stack_one(chat)
                ours = await engine_one(chat)
            else:
                ours = await engine_one(chat)
                stack = await stack_one(chat)
            engine_records.append(ours)
            if stack["ok"]:
                differences.append(stack["e2e"] - ours["e2e"])
    finally:
        engine.shutdown()
        torch.set_num_threads(previous)
    row = {**summarize("engine_served_threads", 1, engine_records, sum(r["e2e"] for r in engine_records)),
           "threads": threads}
    return row, differences


@torch.inference_mode()
def loop_level(model, tokenizer, prompt_ids: list[list[int]], new_tokens: int) -> tuple[list[dict], float]:
    records = []
    start_all = time.perf_counter()
    for ids in prompt_ids:
        start = time.perf_counter()
        tensor = torch.tensor([ids])
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        e2e = time.perf_counter() - start
        records.append({"ok": True, "ttft": e2e / new_tokens, "e2e": e2e, "tokens": out.shape[1] - len(ids)})
    return records, time.perf_counter() - start_all


FLOOR_APP, FLOOR_ROUTE = "serve_floor", "/serve-floor"
# what each floor request goes through, in the order they are timed within a round
FLOOR_KINDS = {
    "json": "HTTP → proxy → ingress, JSON reply",
    "call": "the same + one call to another deployment",
    "stream": "the same + one item streamed from another deployment, SSE (the stack's path, empty)",
}


def start_floor(single_loop: bool, route_prefix: str = FLOOR_ROUTE) -> None:
    """Deploy Ray Serve's floor app next to the stack: an ingress set up like the stack's (FastAPI,
    fractional CPU, the single event loop when the stack's ingress has it) and a deployment it
    calls, with nothing in either: no model, no screening, no session, no r1 code."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from ray import serve

    from cluster.serve.app import SINGLE_LOOP_ENV_VARS, with_env_vars

    api = FastAPI()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.05})
    class FloorTokens:
        async def one(self) -> str:
            return "0"

        async def stream(self, count: int):
            for index in range(count):
                yield str(index)

    actor_options = {"num_cpus": 0.05}
    if single_loop:
        actor_options = with_env_vars(actor_options, SINGLE_LOOP_ENV_VARS)

    @serve.deployment(num_replicas=1, ray_actor_options=actor_options)
    @serve.ingress(api)
    class FloorIngress:
        def __init__(self, tokens):
            self.tokens = tokens

        @api.post("/json")
        async def json_reply(self) -> dict:
            return {"token": "0"}

        @api.post("/call")
        async def call(self) -> dict:
            return {"token": await self.tokens.one.remote()}

        @api.post("/stream")
        async def stream(self) -> StreamingResponse:
            items = self.tokens.options(stream=True).stream.remote(1)

            async def events():
                async for item in items:
                    yield f"data: {item}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

    serve.run(FloorIngress.bind(FloorTokens.bind()), name=FLOOR_APP, route_prefix=route_prefix)


async def time_floor(http: httpx.AsyncClient, base_url: str, rounds: int) -> dict[str, list[float]]:
    """Seconds per request of each floor kind, over `rounds` interleaved rounds (after two untimed)."""
    times: dict[str, list[float]] = {kind: [] for kind in FLOOR_KINDS}
    for index in range(rounds + 2):
        for kind in FLOOR_KINDS:
            start = time.perf_counter()
            async with http.stream("POST", f"{base_url}/{kind}") as response:
                if response.status_code != 200:
                    raise RuntimeError(f"the Serve floor app answered {response.status_code} to /{kind}")
                async for _ in response.aiter_lines():
                    pass
            if index >= 2:
                times[kind].append(time.perf_counter() - start)
    return times


DIRECT_INGRESS_PORTS = range(30000, 30100)  # Ray Serve's default range for direct-ingress HTTP servers


def time_direct_ingress_floor(single_loop: bool, rounds: int) -> dict[str, list[float]]:
    """The floor app again, on a fresh local Ray with Serve's experimental direct ingress
    (`RAY_SERVE_ENABLE_DIRECT_INGRESS=1`: no proxy; the ingress replica serves HTTP itself, on a
    port of its own from 30000 up). The difference to the floor above is what the proxy costs."""
    import ray
    from ray import serve

    from cluster.ray_start import init_ray

    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"  # read by Serve's controller and replicas, started below
    try:
        init_ray(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        serve.start()
        start_floor(single_loop, route_prefix="/")
        port = None
        for candidate in DIRECT_INGRESS_PORTS:
            try:
                if httpx.post(f"http://127.0.0.1:{candidate}/json", timeout=5).status_code == 200:
                    port = candidate
                    break
            except httpx.HTTPError:
                continue
        if port is None:
            raise RuntimeError(f"no direct-ingress HTTP server answered on ports {DIRECT_INGRESS_PORTS.start}–"
                               f"{DIRECT_INGRESS_PORTS.stop - 1}")

        async def timed() -> dict[str, list[float]]:
            async with httpx.AsyncClient(timeout=60) as http:
                return await time_floor(http, f"http://127.0.0.1:{port}", rounds)

        return asyncio.run(timed())
    finally:
        del os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"]
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()


def start_stack(port: int, overrides: list[str]):
    """Start Ray and Serve and deploy the stack (one replica each); returns its ServeConfig. Serve
    runs in HAProxy mode when this process's environment says so (`haproxy_env`)."""
    from ray import serve

    from cluster.ray_start import init_ray
    from cluster.serve.app import build_app
    init_ray(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    one_replica = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1}
    from r1.config import ServeConfig, apply_overrides, parse_config

    # Sessions in a database of the run's own: not the user's session store, and every run starts empty.
    sessions = {"backend_url": f"sqlite:///{tempfile.mkdtemp(prefix='r1-bench-sessions-')}/sessions.db"}
    config = apply_overrides(parse_config(ServeConfig, {"ingress": one_replica, "llm": one_replica, "sessions": sessions,
                                                        "engine": {"max_num_seqs": 64}}), overrides)
    serve.run(build_app(config.model_dump()), name="bench")
    return config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-level", type=int, default=32)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the served config, e.g. --set safety=null --set sessions.enabled=false")
    parser.add_argument("--proxy", choices=("serve", "haproxy"), default="serve",
                        help="what takes the stack's HTTP requests, as `r1 serve --proxy` (the Serve floor is "
                             "measured behind the same; the direct-ingress floor only with the default)")
    parser.add_argument("--json", help="also write the results (bench/contract.py format) to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    levels = [int(c) for c in args.concurrency.split(",")]
    model, tokenizer = load_model(ModelConfig(device="cpu", dtype="fp32"))
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in make_prompts(tokenizer, args.requests_per_level)]
    chats = [[{"role": "user", "content": t}] for t in texts]
    chat_ids = [tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                 add_special_tokens=False) for c in chats]
    sampling = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)

    from cluster.serve.cli import haproxy_env, remove_haproxy_files

    haproxy = haproxy_env("local") if args.proxy == "haproxy" else {}  # as `r1 serve --proxy haproxy`
    os.environ.update(haproxy)
    config = start_stack(args.port, args.set)
    url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
    # The in-process engine runs what the served one runs: the same options on the same weights.
    served_model = apply_engine_options(copy.deepcopy(model), config.engine)
    served_options = served_model_options(served_model)
    print(f"served engine options applied: {', '.join(served_options) or 'none'}")
    engine = TransformersEngine(served_model, tokenizer, EngineConfig(max_num_seqs=64))
    rows = []
    latencies: dict[tuple[str, int], list[float]] = {}  # (method, concurrency) -> e2e seconds
    paired: list[float] = []  # stack - engine (served threads) e2e, per prompt, seconds
    paired_fixed: list[float] = []  # the same for 1-token requests

    async def levels_async():
        async with httpx.AsyncClient(timeout=600) as http:
            await run_level(stack_request(http, url, 4), chats[:2], 1)  # warm-up
            await run_level(engine_request(engine, SamplingConfig(temperature=0, max_new_tokens=4)), chats[:2], 1)
            for c in levels:
                records, elapsed = await run_level(stack_request(http, url, args.new_tokens), chats, c)
                rows.append(summarize("stack", c, records, elapsed))
                latencies["stack", c] = sorted(r["e2e"] for r in records if r["ok"])
                records, elapsed = await run_level(engine_request(engine, sampling), chats, c)
                rows.append(summarize("engine", c, records, elapsed))
                latencies["engine", c] = sorted(r["e2e"] for r in records if r["ok"])
            if 1 in levels:
                # The served engine runs on the LLM server's torch threads (one for a fractional-CPU
                # replica unless engine.cpu_threads says otherwise); the same engine on as many
                # threads here separates the pipeline's cost from the thread count's.
                served = await serve.get_deployment_handle("LLMServer", app_name="bench").stats.remote()
                row, differences = await paired_with_stack(stack_request(http, url, args.new_tokens), served_model,
                                                           tokenizer, served["cpu_threads"], sampling, chats)
                rows.append(row)
                paired.extend(differences)
                one_token = SamplingConfig(temperature=0, max_new_tokens=1, ignore_eos=True)
                _row, differences = await paired_with_stack(stack_request(http, url, 1), served_model, tokenizer,
                                                            served["cpu_threads"], one_token, chats)
                paired_fixed.extend(differences)

    from ray import serve

    asyncio.run(levels_async())
    # Ray Serve's floor, while the stack is idle (its replicas stay up, as they would).
    start_floor(config.ingress_single_loop)

    async def floor_async() -> dict[str, list[float]]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await time_floor(http, f"http://127.0.0.1:{args.port}{FLOOR_ROUTE}", args.requests_per_level)

    floor = asyncio.run(floor_async())
    serve.delete(FLOOR_APP)
    loop_records, loop_elapsed = loop_level(model, tokenizer, chat_ids[: max(levels)], args.new_tokens)
    rows.append(summarize("loop", 1, loop_records, loop_elapsed))
    latencies["loop", 1] = sorted(r["e2e"] for r in loop_records)
    static_tok_s = bench_static(model, tokenizer, chat_ids[: max(levels)], args.new_tokens)
    static_served_tok_s = (bench_static(served_model, tokenizer, chat_ids[: max(levels)], args.new_tokens)
                           if served_options else None)
    engine.shutdown()

    print(f"{'method':7s} {'conc':>4s} {'tok/s':>8s} {'TTFT p50':>9s} {'TPOT p50':>9s} {'e2e p50':>9s} {'e2e p99':>9s} {'errors':>6s}")
    for r in rows:
        print(f"{r['method']:7s} {r['concurrency']:4d} {r['tok_s']:8.0f} {r['ttft_p50_ms']:7.1f}ms {r['tpot_p50_ms']:7.1f}ms "
              f"{r['e2e_p50_ms']:7.0f}ms {r['e2e_p99_ms']:7.0f}ms {100 * r['error_rate']:5.1f}%")
    top = max(levels)
    stack_top = next(r for r in rows if r["method"] == "stack" and r["concurrency"] == top)
    loop_row = next(r for r in rows if r["method"] == "loop")
    print(f"static padded batch of {top}: {static_tok_s:.0f} tok/s")
    if static_served_tok_s:
        print(f"static padded batch of {top}, the model as served ({', '.join(served_options)}): "
              f"{static_served_tok_s:.0f} tok/s")
    print(f"stack at {top} streams: {stack_top['tok_s'] / static_tok_s:.2f}x the static batch, "
          f"{stack_top['tok_s'] / loop_row['tok_s']:.2f}x the loop")
    overhead_ms = None
    if 1 in levels:
        stack_1 = next(r for r in rows if r["method"] == "stack" and r["concurrency"] == 1)
        engine_1 = next(r for r in rows if r["method"] == "engine" and r["concurrency"] == 1)
        same = next(r for r in rows if r["method"] == "engine_served_threads")
        overhead_ms = stack_1["e2e_p50_ms"] - engine_1["e2e_p50_ms"]
        print(f"pipeline overhead per request (p50 e2e stack - engine, concurrency 1): {overhead_ms:.1f} ms")
        if paired:
            low, mid, high = paired_quartiles_ms(paired)
            print(f"  paired with the engine on the served engine's {same['threads']} thread(s): median {mid:.1f} ms "
                  f"(quartiles {low:.1f} – {high:.1f} ms, {len(paired)} pairs)")
        if paired_fixed:
            low, mid, high = paired_quartiles_ms(paired_fixed)
            print(f"  its fixed part (1-token requests, paired the same way): median {mid:.1f} ms "
                  f"(quartiles {low:.1f} – {high:.1f} ms, {len(paired_fixed)} pairs)")
    for kind, label in FLOOR_KINDS.items():
        low, mid, high = paired_quartiles_ms(floor[kind])
        print(f"Ray Serve's floor, {label}: median {mid:.1f} ms (quartiles {low:.1f} – {high:.1f} ms)")
    serve.shutdown()
    import ray

    ray.shutdown()
    remove_haproxy_files(haproxy)
    direct = {} if args.proxy == "haproxy" else time_direct_ingress_floor(config.ingress_single_loop,
                                                                        args.requests_per_level)
    for kind, label in FLOOR_KINDS.items() if direct else ():
        low, mid, high = paired_quartiles_ms(direct[kind])
        print(f"the same without Serve's proxy (direct ingress), {label}: median {mid:.1f} ms "
              f"(quartiles {low:.1f} – {high:.1f} ms)")
    result = contract_result(args, argv, rows, latencies, static_tok_s, overhead_ms, paired, paired_fixed, floor,
                             direct, served_options, static_served_tok_s)
    return finish(result, args.json)


METHOD_LABELS = {"stack": "stack (HTTP + SSE)", "engine": "engine in-process",
                 "engine_served_threads": "engine in-process, served engine's threads", "loop": "loop of `generate`"}


def paired_quartiles_ms(differences: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of paired differences (at least one), in ms."""
    low, mid, high = statistics.quantiles(differences, n=4) if len(differences) > 1 else differences * 3
    return 1e3 * low, 1e3 * mid, 1e3 * high


def contract_result(args: argparse.Namespace, argv: list[str] | None, rows: list[dict],
                    latencies: dict[tuple[str, int], list[float]], static_tok_s: float, overhead_ms: float | None,
                    paired: list[float] | None = None, paired_fixed: list[float] | None = None,
                    floor: dict[str, list[float]] | None = None,
                    direct_floor: dict[str, list[float]] | None = None, served_options: list[str] | None = None,
                    static_served_tok_s: float | None = None) -> dict:
    """The run as the bench JSON contract: the per-level table, the targets, and the data for the plots."""
    top = max(r["concurrency"] for r in rows if r["method"] == "stack")
    stack_top = next(r for r in rows if r["method"] == "stack" and r["concurrency"] == top)
    loop_row = next(r for r in rows if r["method"] == "loop")
    table = [[METHOD_LABELS[r["method"]], r["concurrency"], round(r["tok_s"]), f"{r['ttft_p50_ms']:.1f} ms",
              f"{r['tpot_p50_ms']:.1f} ms", f"{r['e2e_p50_ms']:.0f} ms", f"{r['e2e_p99_ms']:.0f} ms",
              f"{100 * r['error_rate']:.1f} %"] for r in rows]
    checks = [
        [f"stack / static batch at {top} streams", "≥ 1.0×", ratio(stack_top["tok_s"] / static_tok_s)],
        [f"stack / loop at {top} streams", "≥ 5×", ratio(stack_top["tok_s"] / loop_row["tok_s"])],
    ]
    notes = [f"static padded batch of {top} in the same run: {static_tok_s:.0f} tok/s",
             target_note(f"stack / static batch at {top} streams", stack_top["tok_s"] / static_tok_s, 1.0),
             target_note(f"stack / loop at {top} streams", stack_top["tok_s"] / loop_row["tok_s"], 5.0)]
    if served_options:
        notes[1:1] = [f"the served engine's options that changed the model: {', '.join(served_options)} (the engine "
                      "in-process runs the same; the loop and the static batch run the plain model)"]
    if static_served_tok_s:
        notes.append(f"static padded batch of {top} of the model as served ({', '.join(served_options)}): "
                     f"{static_served_tok_s:.0f} tok/s; the stack gives "
                     f"{ratio(stack_top['tok_s'] / static_served_tok_s)} of it")
    if overhead_ms is not None:
        checks.append(["pipeline overhead per request, concurrency 1 (stack − engine e2e p50)", "≤ 5 ms",
                       f"{overhead_ms:.0f} ms"])
        notes.append(overhead_note("pipeline overhead per request at concurrency 1", overhead_ms))
        same = next(r for r in rows if r["method"] == "engine_served_threads")
        pairs = [
            (paired, f"the same, paired per prompt with the engine on the served engine's {same['threads']} torch "
                     "thread(s) (median of {count} pairs, quartiles)",
             "pipeline overhead per request at concurrency 1, paired with the engine on the served engine's threads"),
            (paired_fixed, "its fixed part: 1-token requests paired the same way (median of {count} pairs, quartiles); "
                           "a lower bound on every request's overhead",
             "the overhead's fixed part (1-token requests, paired), a lower bound on every request's overhead"),
        ]
        for differences, check, note in pairs:
            if differences:
                low, mid, high = paired_quartiles_ms(differences)
                checks.append([check.format(count=len(differences)), "≤ 5 ms", f"{mid:.0f} ms ({low:.0f} – {high:.0f})"])
                notes.append(overhead_note(note, mid))
    floor_rows = []
    if floor:
        # Not targets: what Ray Serve itself costs for the stack's path on this machine, with nothing in it.
        for kind, label in FLOOR_KINDS.items():
            low, mid, high = paired_quartiles_ms(floor[kind])
            row = [label, f"{mid:.1f} ms", f"{low:.1f} – {high:.1f} ms"]
            if direct_floor:
                low, mid, high = paired_quartiles_ms(direct_floor[kind])
                row += [f"{mid:.1f} ms", f"{low:.1f} – {high:.1f} ms"]
            floor_rows.append(row + [len(floor[kind])])
        mid = paired_quartiles_ms(floor["stream"])[1]
        notes.append(f"Ray Serve's floor for the stack's path (HTTP, the proxy, an ingress, one streamed deployment "
                     f"hop; no model, no r1 code): median {mid:.1f} ms, against the ≤ 5 ms overhead target")
        if direct_floor:
            direct_mid = paired_quartiles_ms(direct_floor["stream"])[1]
            notes.append(f"the same path without Serve's proxy (experimental direct ingress, a fresh Ray in the same "
                         f"run): median {direct_mid:.1f} ms, so the proxy costs about {mid - direct_mid:.0f} ms of it")
    throughput: dict[str, list[list[float]]] = {}
    for r in rows:
        throughput.setdefault(METHOD_LABELS[r["method"]], []).append([r["concurrency"], round(r["tok_s"], 1)])
    throughput["static batch"] = [[top, round(static_tok_s, 1)]]
    cdf = {f"{METHOD_LABELS[m]}, concurrency {c}": [round(v, 4) for v in values]
           for (m, c), values in latencies.items() if c == top or m == "loop"}
    return {
        "benchmark": "serving",
        "title": "Serving",
        "command": command_line("serving", argv),
        "baseline": "The same engine in-process (no Ray, no HTTP), a loop of single `generate` calls and one "
                    f"left-padded static `generate` batch of {top} requests, same prompts, same run.",
        "tables": [
            {"title": f"r1-tiny, {args.requests_per_level} requests per level × {args.new_tokens} new tokens"
                      + (f", overrides {' '.join(args.set)}" if args.set else "")
                      + (", behind HAProxy (`--proxy haproxy`)" if getattr(args, "proxy", "serve") == "haproxy" else ""),
             "columns": ["method", "conc", "tok/s", "TTFT p50", "TPOT p50", "e2e p50", "e2e p99", "errors"],
             "rows": table},
            {"title": "targets", "columns": ["check", "target", "measured"], "rows": checks},
        ] + ([{"title": "Ray Serve's own floor in the same run: requests through Serve with no model and no r1 code",
               "columns": ["request", "median", "quartiles"]
                          + (["median, no proxy (direct ingress)", "quartiles, no proxy"] if direct_floor else [])
                          + ["requests"],
               "rows": floor_rows}] if floor_rows else []),
        "series": {"throughput_vs_concurrency": throughput, "latency_cdf": cdf},
        "notes": notes,
        "raw": {"rows": rows, "static_tok_s": static_tok_s, "served_options": served_options or [],
                "static_served_tok_s": static_served_tok_s, "paired_overhead_s": paired or [],
                "paired_fixed_overhead_s": paired_fixed or [], "serve_floor_s": floor or {},
                "serve_floor_direct_ingress_s": direct_floor or {}},
    }


if __name__ == "__main__":
    main()
