"""bench.cpu_speed's decode-vs-peak figures: each run is compared with the peak measured around it.

Checked on hand-made run records (the benchmark itself takes many minutes): a run on a machine
that slowed down, with its peak slowed down as much, keeps its percentage, and the target note
reports the paired median next to the figure against the run's best peak.
"""

from __future__ import annotations

import argparse

import pytest

from bench import cpu_speed
from bench.contract import validate

FEATURES = {"torch_cpu_capability": "AVX2", "amx_flags": [], "avx512_bf16": False, "avx512_vnni": False,
            "bf16_matmul_kernel": "not oneDNN"}
WEIGHTS = 100_000_000  # FLOP per token = 2 x weights
ARGS = argparse.Namespace(num_requests=16, new_tokens=64, repeats=3, peak_size=2048, sweep_tokens=16, threads=1,
                          eval_problems=0, probe_batch=0, probe_context=1024, kv_steps=16)


def step_ms(percent: float, peak: float, batch: int = 16) -> float:
    """The decode step time at which `batch` tokens reach `percent` of `peak` GFLOP/s."""
    return 2 * WEIGHTS * batch / (percent / 100 * peak * 1e9) * 1e3


def model_entry(runs: dict[str, list[tuple[float, float]]], sweep: list[dict] | None = None) -> dict:
    """runs: variant -> [(percent of its peak, peak GFLOP/s around the run)]."""
    variants = {}
    for variant, pairs in runs.items():
        steps = [step_ms(percent, peak) for percent, peak in pairs]
        variants[variant] = {"tok_s": 100.0, "step_ms": sorted(steps)[len(steps) // 2], "first_call_s": 1.0,
                             "same_tokens_as_fp32": 1.0, "tok_s_runs": [100.0] * len(pairs), "step_ms_runs": steps,
                             "peak_gflops_runs": [peak for _, peak in pairs]}
    return {"model": "100m", "params_m": 100.0, "matmul_weights": WEIGHTS, "variants": variants, "sweep": sweep or []}


def flops_table(result: dict) -> dict:
    return next(t for t in result["tables"] if t["title"].startswith("100M model: batched decode FLOP/s"))


def test_each_run_counts_against_the_peak_measured_around_it():
    # The machine ran at full speed for the first run and at 60 % for the other two; the decode
    # reached 32 % of whatever the peak was at the time in each of them.
    entry = model_entry({"prepack": [(32.0, 80.0), (32.0, 48.0), (32.0, 48.0)]})
    result = cpu_speed.build_result(ARGS, [], FEATURES, [entry], {"fp32": 80.0}, None, None)
    assert not [p for p in validate(result) if p.startswith("tables")]  # one cell per column
    row = flops_table(result)["rows"][0]
    assert row[0] == "prepack (batch 16, 64 tokens)" and row[1] == "fp32"
    assert row[4] == "32.0 %" and row[5] == "32.0 – 32.0 %"
    assert row[6] == "19.2 %"  # the median run against the run's best peak: the drift, not the engine
    note = next(n for n in result["notes"] if n.startswith("100M batched decode at batch 16, prepack"))
    assert "32.0 % (target ≥ 30 %): met" in note and "19.2 % of the run's best peak" in note


@pytest.mark.parametrize(("default", "how"), [("prepack", "packs it on this CPU"),
                                              ("fp32", "leaves it unpacked on this CPU")])
def test_the_default_options_are_checked_as_the_variant_they_run(default, how):
    # The target is also stated for what `EngineConfig()` runs here: the packed variant where
    # `prepack: auto` packs an fp32 model, the plain one where it cannot.
    entry = model_entry({"fp32": [(19.0, 80.0)] * 3, "prepack": [(44.0, 80.0)] * 3})
    result = cpu_speed.build_result(ARGS, [], {**FEATURES, "default_fp32_variant": default}, [entry],
                                    {"fp32": 80.0}, None, None)
    [note] = [n for n in result["notes"] if n.startswith("the default engine options")]
    assert f"`prepack: auto`, which {how}) decode as the {default} variant" in note
    assert note.endswith("44.0 % (target ≥ 30 %): met" if default == "prepack" else "19.0 % (target ≥ 30 %): not met")


def test_the_machine_reports_the_default_variant():
    # This machine's torch has oneDNN, so `prepack: auto` packs an fp32 model here.
    assert cpu_speed.cpu_features()["default_fp32_variant"] == "prepack"


@pytest.mark.parametrize(("percents", "verdict"), [((29.0, 29.9, 31.0), "29.9 % (target ≥ 30 %): not met"),
                                                    ((30.5, 28.0, 30.1), "30.1 % (target ≥ 30 %): met")])
def test_the_target_is_the_median_of_the_paired_runs(percents, verdict):
    entry = model_entry({"fp32": [(p, 78.0) for p in percents]},
                        sweep=[{"batch": 64, "variant": "fp32", "step_ms": step_ms(50.0, 78.0, 64),
                                "step_ms_runs": [step_ms(50.0, 78.0, 64), step_ms(45.0, 60.0, 64)],
                                "peak_gflops_runs": [78.0, 60.0]}])
    result = cpu_speed.build_result(ARGS, [], FEATURES, [entry], {"fp32": 78.0}, None, None)
    notes = [n for n in result["notes"] if n.startswith("100M batched decode")]
    assert verdict in notes[0] and f"runs {min(percents):.1f} – {max(percents):.1f} %" in notes[0]
    # The larger batch of the sweep: its own row and note, paired the same way.
    assert "at batch 64, fp32" in notes[1] and "47.5 % (target ≥ 30 %): met" in notes[1]
    assert flops_table(result)["rows"][1][0] == "fp32 (batch 64, 16 tokens)"


def test_a_peak_slower_than_the_decode_is_no_peak():
    # bf16 on an AVX2-only CPU: the 2048³ matmul takes a slow path (0.3 GFLOP/s) while the decode's
    # 16-row matmuls reach 8 GFLOP/s; a "2,900 % of peak" would be nonsense, and no target is met.
    entry = model_entry({"bf16": [(2900.0, 0.28), (2700.0, 0.28), (3100.0, 0.28)]})
    result = cpu_speed.build_result(ARGS, [], FEATURES, [entry], {"bf16": 0.28}, None, None)
    assert not [p for p in validate(result) if p.startswith("tables")]
    row = flops_table(result)["rows"][0]
    assert row[4] == "- (no peak)" and row[6] == "-"
    (note,) = [n for n in result["notes"] if n.startswith("100M batched decode")]
    assert "not measurable on this CPU" in note and "met" not in note


def test_the_peak_is_the_faster_of_torchs_gemm_and_onednns_packed_linear(monkeypatch):
    # torch's default fp32 GEMM ran at half the speed of oneDNN's packed Linear on an AMD EPYC with
    # AVX-512, so the peak takes the faster kernel; each kernel must really multiply the matrices.
    import torch

    products, speeds = [], iter([100.0, 200.0, 300.0, 50.0])

    def fake_best(product, size, tries):
        products.append(product())
        return next(speeds)

    monkeypatch.setattr(cpu_speed, "_best_gflops", fake_best)
    torch.manual_seed(0)
    assert cpu_speed.peak_matmul_gflops("fp32", 64, 1) == 200.0  # default GEMM 100, packed 200
    assert cpu_speed.peak_matmul_gflops("fp32", 64, 1) == 300.0  # default 300, packed 50
    torch.manual_seed(0)
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    assert torch.allclose(products[0], a @ b, atol=1e-4)  # torch's GEMM
    assert torch.allclose(products[1], a @ b.T, atol=1e-4)  # oneDNN's Linear: x W^T, the same FLOPs
    monkeypatch.setattr(cpu_speed, "prepack_unsupported", lambda dtype: "no oneDNN here")
    speeds, products[:] = iter([80.0]), []
    assert cpu_speed.peak_matmul_gflops("fp32", 64, 1) == 80.0 and len(products) == 1
