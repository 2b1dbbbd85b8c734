"""Per-GPU memory of a fine-tuning run, estimated from shapes alone (a meta-device model).

An estimate, not a measurement: it counts the tensors a training step keeps, by a model of what
autograd saves in a Llama-style decoder (below), and leaves out the CUDA context (~0.5 GiB), the
allocator's fragmentation and cached blocks, kernels' workspaces, and the attention scores of an
attention kernel that stores them (SDPA's flash / memory-efficient kernels do not: s² is not counted).

Components, in bytes on one GPU:

* base: frozen weights in their precision. ``nf4``: 0.5 byte per weight plus QLoRA's scales (one
  8-bit absmax per 64 weights and one float32 per 256 of those: 1/64 + 4/16384 bytes per weight);
  ``int8``: 1 byte plus one float32 absmax per output row. Quantization covers the nn.Linear layers
  but the output head; everything else stays in bf16 (as BitsAndBytesConfig with dtype=bfloat16).
* trainable, grads, optimizer: trainable parameters in float32 (4 bytes), their gradients (4) and
  AdamW's two float32 moments (8).
* activations (per token, per decoder layer, in the activation dtype), what autograd keeps:
  attention 5h + 3h_kv (the block's input, its norm's output, q, k, v, q and k after RoPE, the
  attention output); MLP 2h + 4f (input, norm output, gate, up, act(gate), act(gate)·up); each
  adapted module r (A x) and for DoRA its output width (g's product is saved for the magnitude's
  gradient). Plus the logits and their log-softmax in float32 (2 · 4 · vocab bytes). With gradient
  checkpointing only each layer's input h is kept, plus the larger of the logits and one layer's full
  set (recomputed in backward after the logits are freed).
* gathered (FSDP over N > 1 GPUs): base, trainable, grads and optimizer are divided by N, except a
  quantized base's scales (``scales``: FSDP2 shards the packed codes, each GPU keeps the whole quant
  state); two decoder layers' base weights are whole at a time (the one computing and the one prefetched).
* transient: the largest linear weight dequantized to the compute dtype (a quantized base's matmul
  and the DoRA norm make one such copy at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .inject import adapter_layers

GiB = 2 ** 30
BASES = ("fp32", "bf16", "int8", "nf4")
HEADS = ("lm_head", "score", "classifier")


@dataclass(frozen=True)
class MemoryPlan:
    """The run whose per-GPU memory is estimated."""

    base: str = "bf16"
    """Precision of the frozen base: fp32, bf16, int8 (LLM.int8()) or nf4 (QLoRA, double quantization)."""
    batch_size: int = 1
    """Sequences per micro-batch on one GPU."""
    seq_len: int = 512
    """Tokens per sequence."""
    act_bytes: int = 2
    """Bytes per activation element: 2 under bf16 autocast, 4 in fp32."""
    gradient_checkpointing: bool = False
    gpus: int = 1
    """GPUs the base, gradients and optimizer state are sharded over with FSDP (1: no sharding)."""

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}.")
        for name in ("batch_size", "seq_len", "gpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.act_bytes not in (2, 4):
            raise ValueError(f"act_bytes must be 2 or 4, got {self.act_bytes}.")


def _weight_bytes(module_name: str, module: nn.Module, numel: int, rows: int, base: str) -> tuple[float, float]:
    """(bytes of one frozen weight in the base's precision, of them its quantization scales)."""
    quantized = isinstance(module, nn.Linear) and module_name.rpartition(".")[2] not in HEADS
    if base == "fp32":
        return 4.0 * numel, 0.0
    if base == "bf16" or not quantized:
        return 2.0 * numel, 0.0
    if base == "int8":
        return numel + 4.0 * rows, 4.0 * rows
    scales = numel * (1 / 64 + 4 / (64 * 256))
    return 0.5 * numel + scales, scales


def _base_bytes(model: nn.Module, base: str) -> tuple[float, float, float, int]:
    """(frozen bytes, of them quantization scales, the largest decoder layer's frozen bytes without its
    scales, the largest linear's numel)."""
    adapted = {id(layer.base_layer): name for name, layer in adapter_layers(model)}
    total, scales, per_layer, largest = 0.0, 0.0, {}, 0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                continue
            if pname == "weight":
                rows = p.shape[0] if p.dim() == 2 else 1
                b, s = _weight_bytes(adapted.get(id(module), name), module, p.numel(), rows, base)
            else:                                                   # biases, norms: fp32 or bf16
                b, s = (4.0 if base == "fp32" else 2.0) * p.numel(), 0.0
            total, scales, b = total + b, scales + s, b - s
            key = _layer_key(name)
            if key is not None:
                per_layer[key] = per_layer.get(key, 0.0) + b
            if isinstance(module, nn.Linear):
                largest = max(largest, p.numel())
    return total, scales, max(per_layer.values(), default=0.0), largest


def _layer_key(name: str) -> str | None:
    """"model.layers.3" for any module under decoder layer 3, else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "layer") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


def _activation_elems_per_token(model: nn.Module, plan: MemoryPlan) -> tuple[float, float]:
    """(elements kept per token for the whole stack, elements of one layer's full set)."""
    c = model.config
    h, f, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = h // c.num_attention_heads * getattr(c, "num_key_value_heads", c.num_attention_heads)
    layer = 5 * h + 3 * kv + 2 * h + 4 * f
    adapters = 0
    for _, a in adapter_layers(model):
        out = a.weight_2d().shape[0] if a.variant != "lora" else 0
        adapters += a.rank + out
    adapter_per_layer = adapters / n_layers
    full = layer + adapter_per_layer
    return (n_layers * h if plan.gradient_checkpointing else n_layers * full), full


def estimate_memory(model: nn.Module, plan: MemoryPlan) -> dict[str, float]:
    """Bytes per GPU by component (see the module docstring) and their ``total``, for ``model`` (meta
    device, adapters applied or not) trained as ``plan`` says."""
    base, scales, layer_bytes, largest = _base_bytes(model, plan.base)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = plan.batch_size * plan.seq_len
    kept, full = _activation_elems_per_token(model, plan)
    logits = 2 * 4 * model.config.vocab_size                   # bytes per token: float32 logits, log-softmax
    if plan.gradient_checkpointing:   # the logits are freed before the last layer is recomputed in backward
        per_token = kept * plan.act_bytes + max(full * plan.act_bytes, logits)
    else:
        per_token = kept * plan.act_bytes + logits
    n = plan.gpus
    out = {
        "base": (base - scales) / n,
        "scales": scales,
        "trainable": 4.0 * trainable / n,
        "grads": 4.0 * trainable / n,
        "optimizer": 8.0 * trainable / n,
        "activations": tokens * per_token,
        "gathered": 2 * layer_bytes * (n - 1) / n if n > 1 else 0.0,
        "transient": float(largest * plan.act_bytes) if plan.base in ("int8", "nf4") else 0.0,
    }
    out["total"] = sum(out.values())
    return out


def format_memory(est: dict[str, float]) -> str:
    """One line per component in GiB, the total last."""
    return "\n".join(f"  {k:<12}{v / GiB:9.2f} GiB" for k, v in est.items())
