#!/usr/bin/env bash
# Device checks for r1-cluster training on a machine with one NVIDIA GPU.
#
#   bash bench/gpu_check.sh            # from the repository root, in the project's Python environment
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# Prints PASS/FAIL per check (logs of failures are shown) and exits non-zero if any check failed:
#   nccl_allreduce      torch.distributed NCCL process group (torchrun, world size 1), all-reduce on the GPU
#   bf16_autocast_step  one SFT step of r1-tiny on the GPU under bf16 autocast (r1.train.precision)
#   deepspeed_zero2     one SFT step through r1's DeepSpeed strategy, ZeRO stage 2, bf16 (torchrun)
#   ray_train_nccl_bf16 `r1 train sft` as a Ray Train job: 1 GPU worker, NCCL backend, bf16, 6 steps
#   ray_train_grpo_ds   `r1 train grpo` with DeepSpeed ZeRO-2 on the GPU worker, bf16, 2 steps
#   bench_training      bench/training.py (r1 GRPO vs TRL) on the GPU; informational, prints the ratio
# NCCL cannot put two ranks on one GPU, so multi-rank NCCL needs a machine with >= 2 GPUs.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOGS=${LOG_DIR:-$(mktemp -d)}
RUNS=$(mktemp -d)
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/r1-cluster/torch_extensions}
failed=0

check() {
  local name=$1; shift
  if "$@" >"$LOGS/$name.log" 2>&1; then
    echo "PASS $name"
  else
    echo "FAIL $name (log: $LOGS/$name.log)"
    tail -n 25 "$LOGS/$name.log" | sed 's/^/    /'
    failed=1
  fi
}

cat >"$RUNS/nccl.py" <<'EOF'
import os, torch, torch.distributed as dist
dist.init_process_group("nccl")
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
x = torch.full((1024,), float(dist.get_rank() + 1), device="cuda")
dist.all_reduce(x)
expected = sum(range(1, dist.get_world_size() + 1))
assert torch.allclose(x, torch.full_like(x, expected)), x[:4]
print("nccl", torch.cuda.nccl.version(), "world", dist.get_world_size(), "ok")
dist.destroy_process_group()
EOF

cat >"$RUNS/step.py" <<'EOF'
import math, sys, torch
from r1.config import parse_config, SFTTrainConfig
from r1.train.sft import SFTStage
from r1.train.stage import WorkerInfo
strategy = sys.argv[1]
cfg = {"model": {"model": "r1-tiny"}, "precision": "bf16", "scaling": {"use_gpu": True, "num_workers": 1},
       "data": {"task": "arithmetic", "num_examples": 64, "max_seq_len": 128}, "batch_size_per_worker": 8, "max_steps": 3}
if strategy == "deepspeed":
    import torch.distributed as dist
    dist.init_process_group("nccl")
    cfg["strategy"] = {"name": "deepspeed", "zero_stage": 2}
stage = SFTStage(parse_config(SFTTrainConfig, cfg), WorkerInfo(device=torch.device("cuda", 0)))
with stage.strategy.autocast():
    logits = stage.strategy.model(input_ids=torch.tensor([[0, 2, 5]], device="cuda")).logits
assert logits.dtype == torch.bfloat16, logits.dtype
for step in range(3):
    m = stage.run_step(step)
    assert math.isfinite(m["loss"]), m
    print({k: round(v, 4) for k, v in m.items()})
print(strategy, "ok, peak memory MB", round(m["peak_memory_mb"], 1))
EOF

check nccl_allreduce "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$RUNS/nccl.py"
check bf16_autocast_step "$PY" "$RUNS/step.py" ddp
check deepspeed_zero2 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 "$RUNS/step.py" deepspeed
check ray_train_nccl_bf16 "$PY" -m cluster.cli train sft --config ray_configs/train_tiny_sft.yaml \
  --set "scaling={num_workers: 1, use_gpu: true}" --set precision=bf16 --set max_steps=6 \
  --set "checkpoint={storage_path: $RUNS, run_name: gpu-sft, every_steps: 3}" --set progress_bar=false
check ray_train_grpo_ds "$PY" -m cluster.cli train grpo --config ray_configs/train_tiny_grpo.yaml \
  --set "scaling={num_workers: 1, use_gpu: true}" --set precision=bf16 --set max_steps=2 \
  --set "strategy={name: deepspeed, zero_stage: 2}" --set eval_num_problems=0 \
  --set "checkpoint={storage_path: $RUNS, run_name: gpu-grpo, every_steps: 1}" --set progress_bar=false
check bench_training "$PY" -m bench.training --device cuda --steps 3
grep -h "ratio\|s/step" "$LOGS/bench_training.log" 2>/dev/null | sed 's/^/    /'
for name in ray_train_nccl_bf16 ray_train_grpo_ds; do
  tail -n 2 "$LOGS/$name.log" | sed "s/^/    $name: /"
done
exit $failed
