"""Engine options that transform the model before it serves: int8, packed oneDNN Linear layers, torch.compile.

`apply_engine_options(model, engine_config)` is what `TransformersEngine.from_config` calls after
loading the model; the options come from `EngineConfig`:

- `quantization: int8` replaces every `nn.Linear` of the decoder layers with `Int8DynamicLinear`:
  weights stored as int8 with one scale per output channel, activations quantized per token at run
  time, the product computed by an int8 x int8 -> int32 matrix multiply (`torch._int_mm`). CPU only.
  The LM head stays in the model's dtype: the logits decide every greedy token, so they are the most
  sensitive output, and with tied embeddings (r1-tiny, Qwen2 small models) quantizing it would also
  keep a second copy of the embedding matrix. The embedding itself is a lookup, not a matmul, so
  there is nothing to gain there.
- `quantization: fp8` is for the GPU engines (trtllm, vllm); asking the transformers engine for it
  is an error.
- `prepack: true` (CPU) replaces every `nn.Linear`, the LM head included, with `PackedLinear`:
  the weight is reordered once into oneDNN's blocked layout and each call runs oneDNN's Linear
  on it, instead of the default kernels, which handle a decode step's skinny matrix multiplies
  (a few rows against a large weight) poorly. fp32 and bf16 models; outputs equal the plain
  layers' within float rounding. Weights become buffers (inference only). `prepack: auto`, the
  default, packs where `prepack: true` would work and nothing else is asked of the Linear layers
  (a model on an x86-64 CPU, weights this CPU can pack, no int8, no compile); elsewhere it leaves
  the model alone instead of failing (`prepack_applies`).
- `compile: true` runs decode steps (one new token per running sequence, non-empty cache) through
  `torch.compile(dynamic=True)`; prefill stays eager, because prompt lengths and admission patterns
  change at almost every prefill and each new pattern would mean another compilation. The first
  decode steps pay the compilation (minutes for inductor on a small CPU; see the README).

This module does not decide the dtype (`ModelConfig.dtype`) or the attention implementation
(`ModelConfig.attn_implementation`); those are applied when the model loads (`r1.model`).
"""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from r1.config import EngineConfig

logger = logging.getLogger(__name__)

# Modules named like this are never quantized (see the module docstring for why).
INT8_SKIP_MODULES = ("lm_head",)
# The torch.compile backend behind `compile: true`; tests pass a cheaper one to check the wiring.
DEFAULT_COMPILE_BACKEND = "inductor"


def check_engine_options(engine_config: EngineConfig, device: torch.device) -> None:
    """Raise ValueError for option combinations the transformers engine cannot honour."""
    if engine_config.quantization == "fp8":
        raise ValueError(
            "engine.quantization=fp8 needs engine=trtllm or vllm on a GPU; the transformers engine supports "
            "quantization=none or int8 (CPU)"
        )
    if engine_config.prepack is True and device.type != "cpu":
        raise ValueError(
            f"engine.prepack=true packs weights for oneDNN's CPU kernels and the model is on {device.type}; "
            "set prepack=false (on a GPU use dtype=bf16, or engine=vllm/trtllm)"
        )
    if engine_config.prepack is True and (engine_config.quantization == "int8" or engine_config.compile):
        raise ValueError(
            "engine.prepack=true replaces the Linear layers itself and cannot be combined with quantization=int8 "
            "or compile=true; pick one of them"
        )
    if engine_config.quantization == "int8" and device.type != "cpu":
        raise ValueError(
            f"engine.quantization=int8 is CPU-only (dynamic int8 Linear layers) and the model is on {device.type}; "
            "use device=cpu, or quantization=none with dtype=bf16 on a GPU (or quantization=fp8 with engine=vllm/trtllm)"
        )


def check_sharded_options(engine_config: EngineConfig) -> None:
    """The sharded runner (pipeline_stages > 1) loads plain models in its shards: reject what it cannot apply
    (`prepack: auto` is fine: it leaves the shards' models alone)."""
    if engine_config.prefix_cache_mb not in ("auto", 0):  # auto: none there
        raise ValueError("engine.prefix_cache_mb is not supported with pipeline_stages > 1 (each ModelShard keeps "
                         "only its own layers' keys and values); use pipeline_stages=1, or prefix_cache_mb=0")
    if engine_config.quantization != "none" or engine_config.compile or engine_config.prepack is True:
        raise ValueError(
            f"engine.quantization={engine_config.quantization} / engine.compile={engine_config.compile} / "
            f"engine.prepack={engine_config.prepack} are not supported with pipeline_stages > 1 (each ModelShard "
            "loads the plain model); use pipeline_stages=1, or quantization=none, compile=false and prepack=false"
        )


def apply_engine_options(model: Any, engine_config: EngineConfig) -> Any:
    """Quantize and/or compile `model` in place as `engine_config` asks; returns the model."""
    device = next(model.parameters()).device
    check_engine_options(engine_config, device)
    if engine_config.quantization == "int8":
        count = quantize_int8(model)
        logger.info("engine option quantization=int8: %d Linear layers quantized (lm_head kept in %s)", count,
                    next(model.parameters()).dtype)
    if engine_config.prepack is True or (engine_config.prepack == "auto" and prepack_applies(model, engine_config)):
        count = prepack_linear(model)
        logger.info("engine option prepack=%s: %d Linear layers run through oneDNN with packed weights",
                    str(engine_config.prepack).lower(), count)
    if engine_config.compile:
        compile_decode(model)
        logger.info("engine option compile=true: decode steps run through torch.compile(backend=%s, dynamic=True); "
                    "the first decode steps compile (cold: 1-1.5 min on one CPU core for r1-tiny or a 100M model)",
                    DEFAULT_COMPILE_BACKEND)
    return model


# -- int8 -----------------------------------------------------------------------------------------
def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, float32 scale per row) with matrix ~= values * scale."""
    matrix = matrix.float()
    scale = matrix.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    values = torch.round(matrix / scale).clamp(-127, 127).to(torch.int8)
    return values, scale


class Int8DynamicLinear(nn.Module):
    """A Linear layer with int8 weights (one scale per output channel) and per-token int8 activations.

    y = (x_int8 @ W_int8^T) * x_scale * w_scale + bias, accumulated in int32; the output has x's dtype.
    Weights are buffers, not parameters: nothing here is trainable.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        values, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_int8", values.contiguous())  # [out, in]
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # [1, out], float32
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8DynamicLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_int8, x_scale = quantize_rows(rows)
        # The transposed view of the [out, in] weight is the layout the int8 kernel reads fastest.
        acc = torch._int_mm(x_int8, self.weight_int8.t())
        out = acc.float().mul_(x_scale).mul_(self.weight_scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _layer_name(model: nn.Module, name: str) -> str:
    """The model's name for the Linear layer at `name`: a layer that LoRA adapters wrap
    (`r1.engine.lora.MultiLoRALinear`, its layer in `.base`) keeps the name of the wrapper."""
    from r1.engine.lora import MultiLoRALinear

    parent_name, _, child = name.rpartition(".")
    if child == "base" and parent_name and isinstance(model.get_submodule(parent_name), MultiLoRALinear):
        return parent_name
    return name


def replace_linears(model: nn.Module, replacement: Callable[[nn.Linear], nn.Module], skip: tuple[str, ...] = ()) -> int:
    """Replace every nn.Linear not named in `skip` with `replacement(linear)` (in place); returns the count."""
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and _layer_name(model, name).rsplit(".", 1)[-1] not in skip
    ]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement(linear))
    return len(targets)


def quantize_int8(model: nn.Module, skip: tuple[str, ...] = INT8_SKIP_MODULES) -> int:
    """Replace every nn.Linear not named in `skip` with Int8DynamicLinear (in place); returns the count."""
    return replace_linears(model, Int8DynamicLinear.from_linear, skip)


# -- packed oneDNN Linear layers ------------------------------------------------------------------
# `platform.machine()` of the CPUs `prepack: auto` packs on (Linux and macOS say x86_64, Windows AMD64).
X86_64_MACHINES = ("x86_64", "amd64")
# The batch the weights are packed for (oneDNN picks its blocking from it); any batch still works.
PREPACK_BATCH_HINT = 16
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


class PackedLinear(nn.Module):
    """A Linear layer whose weight is reordered once into oneDNN's blocked layout.

    Runs `torch.ops.mkldnn._linear_pointwise` (the op torch's inductor uses for frozen CPU Linear
    layers) on ordinary dense inputs and outputs; only the weight lives in oneDNN's format, so no
    tensor is converted per call (`torch.utils.mkldnn.MkldnnLinear` converts the input and output
    on every call, which made a 100M model's decode 0.7x slower here). Inference only.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PREPACK_BATCH_HINT)
        self.register_buffer("weight_packed", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@functools.cache
def prepack_unsupported(dtype: torch.dtype) -> str | None:
    """Why oneDNN cannot pack `dtype` weights on this CPU, or None when it can.

    oneDNN packs bf16 weights only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; an AVX2-only
    CPU (many AMD EPYC and older Intel parts) refuses. Asked by packing a one-element weight once.
    """
    if not torch.backends.mkldnn.is_available():
        return "torch here is built without oneDNN (mkldnn)"
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(1, 1, dtype=dtype), 1)
    except RuntimeError as error:
        return str(error).strip().splitlines()[0]
    return None


def packed_linear_count(model: nn.Module | None) -> int:
    """How many of `model`'s layers run packed (0 for None: an engine without a local model)."""
    return 0 if model is None else sum(isinstance(module, PackedLinear) for module in model.modules())


def prepack_applies(model: nn.Module, engine_config: EngineConfig) -> bool:
    """Whether `prepack: auto` packs `model`: on an x86-64 CPU, with no other option replacing or
    compiling its Linear layers, and nothing `prepack_refusal` objects to (every Linear weight fp32,
    or bf16 where this CPU packs it).

    x86-64 only because that is where oneDNN's packed kernels were measured to pay (AMD EPYC with
    and without AVX-512, Intel Xeon); on other CPUs (Arm) oneDNN may run other kernels, so packing
    there is for `prepack: true` after measuring (`bench/cpu_speed.py`)."""
    if engine_config.quantization != "none" or engine_config.compile:
        return False
    if platform.machine().lower() not in X86_64_MACHINES:
        return False
    return (
        any(isinstance(module, nn.Linear) for module in model.modules())
        and next(model.parameters()).device.type == "cpu" and prepack_refusal(model) is None
    )


def prepack_refusal(model: nn.Module) -> str | None:
    """Why `prepack_linear` refuses `model` (the error it raises), or None when it can pack every layer."""
    dtypes = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module.weight.dtype not in _DTYPE_NAMES:
                return f"engine.prepack=true supports fp32 and bf16 weights; {name} is {module.weight.dtype}"
            dtypes.add(module.weight.dtype)
    for dtype in sorted(dtypes, key=str):
        reason = prepack_unsupported(dtype)
        if reason is not None:
            hint = " (use dtype=fp32 with prepack, or prepack=false)" if dtype == torch.bfloat16 else ""
            return f"engine.prepack=true cannot pack {_DTYPE_NAMES[dtype]} weights on this machine: {reason}{hint}"
    return None


def prepack_linear(model: nn.Module) -> int:
    """Replace every nn.Linear with PackedLinear (in place); returns the count.

    Checks every layer first, so a model it refuses is left as it was."""
    refusal = prepack_refusal(model)
    if refusal is not None:
        raise ValueError(refusal)
    return replace_linears(model, PackedLinear.from_linear)



# -- torch.compile ----------------------------------------------------------------------------------
def _is_decode_step(kwargs: dict[str, Any]) -> bool:
    input_ids = kwargs.get("input_ids")
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    return (
        input_ids is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1
        and cache is not None and cache.get_seq_length() > 0
    )


def _normalize_cache(cache: Any) -> None:
    """Give every cached tensor one layout: contiguous, and an inference tensor.

    The compiled graph guards on strides and on the tensor kind, so each variant would compile its
    own graph: a freshly prefilled cache holds transposed views, and removing finished rows (which
    the scheduler does outside inference mode) leaves sliced, ordinary tensors. One copy when that
    happens keeps a single graph; later steps concatenate into contiguous inference tensors anyway.
    """
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and not (tensor.is_contiguous() and tensor.is_inference()):
                with torch.inference_mode():
                    setattr(layer, name, tensor.clone(memory_format=torch.contiguous_format))


def compile_decode(model: nn.Module, backend: str = DEFAULT_COMPILE_BACKEND) -> None:
    """Route decode-step forwards through torch.compile (dynamic batch and cache length); prefill stays eager."""
    if getattr(model.forward, "r1_compiled", False):
        return
    eager = model.forward
    compiled = torch.compile(eager, dynamic=True, backend=backend)

    @functools.wraps(eager)  # keeps the signature: the runner inspects it for the cache keyword
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not args and _is_decode_step(kwargs):
            _normalize_cache(kwargs.get("past_key_values", kwargs.get("cache")))
            return compiled(**kwargs)
        return eager(*args, **kwargs)

    forward.r1_compiled = True  # type: ignore[attr-defined]
    forward.r1_compile_backend = backend  # type: ignore[attr-defined]
    model.forward = forward
