"""Pre-flight peak-GPU-memory estimate, so the OOM ladder can skip rungs that cannot fit.

peak ≈ weights + adapter state + saved activations + the largest transient, where

- **weights**: 4-bit NF4 projections (½ byte a parameter + one absmax byte per 64 with double
  quantisation) and the 16-bit tied embedding; 16-bit projections when not quantised.
- **vision** (a multimodal config only: ``vision_config``): the SigLIP vision tower and the
  multimodal projector, loaded with the checkpoint and kept unquantised (``backends/common.py``
  ``UNQUANTIZED``), in the compute dtype: 2 bytes a parameter (4 with ``compute_dtype: float32``).
  Gemma-3's SigLIP-so400m + projector: 421M parameters, 0.78 GiB. Not part of the fit (the
  measurements were text-only); counted from the config, exactly.
- **adapter state**: LoRA A/B (+ DoRA magnitudes) in fp32 and 8-bit AdamW's two uint8 states;
  their fp32 gradients are alive at a layer's backward peak (inside the fitted constants) and, with
  gradient accumulation, also at the logits peak of plain PEFT (added then).
- **saved activations**: with gradient checkpointing one hidden-state tensor per layer (Unsloth
  offloads most of them to CPU); without it each layer's activations for its backward (fitted on one
  48-layer row, ``NO_CHECKPOINTING_SAVED_PER_LAYER``), and with Trinity's compiled layers each layer's
  dequantised projections too (``kept_projections``).
- **transient**: plain PEFT materialises the logits over the whole vocabulary (bf16, then fp32
  for the loss, its log-softmax and gradient: ~3 fp32 copies; 12 GiB for Gemma-3's 262k vocab
  at seq 4096); Unsloth's fused loss never does, so its peak is a layer's recompute and backward
  (~12.5 MLP-sized activations). PEFT's DoRA adds its out × in and fp32 element-wise temporaries;
  Trinity's fast DoRA (``train/fast_dora/``) nothing: since its fused gated MLP it peaks
  like LoRA, one (tokens × intermediate) tensor lower.

The constants are fitted on the H100 measurements in docs/BENCHMARKS.md (12B Gemma-3 shape,
2/4/48 layers, seq 2048/4096, r 32/64, all 7 or q,v, bf16 and the T4 fp32 path) and hold them
within ±10%; ``tests/core/test_memory.py`` keeps them honest against that table. Unsloth's T4 path with fast
DoRA has its own constants (``T4_FAST_*``), fitted on H200 rows of 2026-11-29 (4/48 layers, seq 4096/8192). Plain
LoRA on that path keeps the older fit (not re-measured), and it keeps PEFT's fp32 casts of the adapters' inputs that
fast DoRA's cast path avoids: there the ``dora_off`` rung reads above fast DoRA's rung before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trinity_core import gpu, model_config
from trinity_core.errors import ModelUnavailable
from trinity_core.spec import JobSpec

GIB = 2**30

# Fitted constants (see the module docstring; each names what it multiplies).
LOGITS_FP32_COPIES = 3.05  # plain PEFT: loss-time peak / (batch·seq·vocab·4 bytes)
LAYER_TRANSIENT_MLP = 12.5  # Unsloth: a layer's recompute+backward peak / (batch·seq·intermediate·act bytes)
SAVED_PER_LAYER = {("peft", 2): 1.0, ("peft", 4): 2.0, ("unsloth", 2): 0.7, ("unsloth", 4): 1.0}
"""Hidden states kept per layer with checkpointing / (batch·seq·hidden·2 bytes), by (backend, act bytes)."""
PEFT_DORA_SAVED_PER_LAYER = {("peft", 2): 1.0, ("unsloth", 2): 0.5}  # PEFT's DoRA keeps a bit more per layer
PEFT_DORA_TRANSIENT = (4.0, 9.5)  # × (out·in·2 bytes, batch·seq·out·4 bytes) of the largest projection
FAST_DORA_TRANSIENT = -1.0  # × batch·seq·out·act bytes of the widest projection: since v3 the fused
# gated activation keeps one (tokens × intermediate) tensor fewer than the stock MLP (H100, 12B shape,
# vs LoRA: +0.01/+0.05 GiB bf16 at 4/48 layers, −0.20/−0.16 on the fp32 T4 path; v2 needed +3.0 × 2 bytes)
# Unsloth's T4 path (float32 mode) with fast DoRA, refitted 2026-11-29 on the H200 rows of that code
# (fast_dora/cast_input.py, lean_norm.py, lean_attention.py, the in-place gated activation: 4 and 48 layers,
# seq 4096 and 8192, docs/BENCHMARKS.md "T4 headroom"): the adapters' fp32 gradients counted on their own,
# then per layer what the offloaded checkpoints leave on the GPU, and one layer's recompute and backward.
T4_FAST_SAVED_PER_LAYER = 0.07  # × batch·seq·hidden·2 bytes (Unsloth offloads the rest to the CPU)
T4_FAST_LAYER_TRANSIENT = 11.4  # × batch·seq·intermediate·2 bytes (its activations are fp16 there)
T4_STOCK_ATTENTION = 6.0  # × batch·seq·heads·head_dim·4 bytes: Unsloth's fp32 attention intermediates, kept
# through the layer's MLP backward without RunOptions.lean_attention (measured +0.376 GiB at seq 4096, 4 and 48 layers)
NO_CHECKPOINTING_SAVED_PER_LAYER = 5.9  # without gradient checkpointing: the activations a layer keeps for its
# backward / (batch·seq·intermediate·act bytes); fitted 2026-11-30 on the H200's 12B pattern at 48 layers, seq 4096,
# Unsloth's compiled LoRA (43.104 GiB, call 56, bench/results/2026-11-30-h200-nockpt-56.jsonl); until then an
# uncalibrated 12.5 (a layer's transient each) that predicted 80.7 GiB
ALLOCATOR_MARGIN = (0.5, 0.05)  # fits when estimate + max(0.5 GiB, 5%) <= budget
COMPILED_LAYER_MODELS = ("gemma3_text", "gemma3")  # the model types train/compiled_layers compiles (its LAYER_CLASSES)


@dataclass
class Estimate:
    gib: float
    parts: dict[str, float] = field(default_factory=dict)
    assumptions: dict[str, Any] = field(default_factory=dict)

    def fits(self, budget_gib: float) -> bool:
        return self.gib + max(ALLOCATOR_MARGIN[0], ALLOCATOR_MARGIN[1] * self.gib) <= budget_gib

    def to_dict(self) -> dict[str, Any]:
        return {"gib": round(self.gib, 3), "parts": {k: round(v, 3) for k, v in self.parts.items()},
                "assumptions": self.assumptions}


def _shapes(config: Any) -> dict[str, int]:
    cfg = (config.get("text_config") if isinstance(config, dict) else getattr(config, "text_config", None)) or config
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    return {"hidden": hidden, "intermediate": get("intermediate_size"), "layers": get("num_hidden_layers"),
            "heads": heads, "kv_heads": get("num_key_value_heads") or heads, "head_dim": head_dim,
            "vocab": get("vocab_size"), "tied": bool(get("tie_word_embeddings", True)),
            "model_type": str(get("model_type", ""))}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def vision_params(config: Any) -> int:
    """Parameters of a multimodal config's vision tower + projector (0 without ``vision_config``):
    SigLIP (patch embedding, position embedding, encoder layers, post-layernorm, the pooling head when
    ``vision_use_head``) and Gemma-3's projector (``mm_input_projection_weight`` + its RMS norm)."""
    v = _get(config, "vision_config")
    if v is None:
        return 0
    h, i, layers = _get(v, "hidden_size"), _get(v, "intermediate_size"), _get(v, "num_hidden_layers")
    patch, channels = _get(v, "patch_size"), _get(v, "num_channels", 3)
    positions = (_get(v, "image_size") // patch) ** 2
    embeddings = channels * patch * patch * h + h + positions * h
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # q,k,v,o; fc1, fc2; 2 layer norms
    head = (4 * (h * h + h) + h + 2 * h + (h * i + i) + (i * h + h)) if _get(v, "vision_use_head", False) else 0
    text = _get(config, "text_config")
    projector = h * _shapes(text if text is not None else config)["hidden"] + h
    return embeddings + layers * layer + 2 * h + head + projector


def projection_shapes(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(in, out) of each of the 7 projections of one decoder layer."""
    h, i, q, kv = s["hidden"], s["intermediate"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def activation_bytes(spec: JobSpec, backend: str, model_type: str, bf16_supported: bool = True) -> int:
    """Bytes per activation element: 2 for bf16/fp16, 4 for fp32 (CPU, or Unsloth's Gemma-3 fp16
    request, which it runs in fp32: the T4 path)."""
    dtype = spec.model.compute_dtype
    if dtype == "auto":
        dtype = "bfloat16" if bf16_supported else "float16"
    if dtype == "float32" or (dtype == "float16" and backend == "unsloth" and model_type.startswith("gemma3")):
        return 4
    return 2


def estimate(config: Any, spec: JobSpec, backend: str, *, bf16_supported: bool = True,
             fast_dora: bool = True, lean_attention: bool = True, compiled_layers: bool = True) -> Estimate:
    """Predicted peak ``torch.cuda.max_memory_allocated`` for training ``spec`` (as the ladder
    rung would run it) on the model ``config`` with ``backend`` ('peft' or 'unsloth'). ``fast_dora``,
    ``lean_attention``, ``compiled_layers``: the run's ``RunOptions``."""
    s = _shapes(config)
    proj = projection_shapes(s)
    targets = [t for t in spec.lora.target_modules if t in proj]
    L, B, S, H = s["layers"], spec.train.batch_size, spec.model.max_seq_length, s["hidden"]
    act = activation_bytes(spec, backend, s["model_type"], bf16_supported)
    dora = spec.lora.use_dora
    parts: dict[str, float] = {}

    linear_params = sum(i * o for i, o in proj.values())
    per_param = (0.5 + (1 / 64 if spec.model.double_quant else 4 / 64)) if spec.model.load_in_4bit else 2.0
    parts["weights"] = (L * linear_params * per_param + s["vocab"] * H * 2 * (1 if s["tied"] else 2)) / GIB
    if vision := vision_params(config):
        parts["vision"] = vision * (4 if spec.model.compute_dtype == "float32" else 2) / GIB

    trainable = L * sum(spec.lora.r * (proj[t][0] + proj[t][1]) + (proj[t][1] if dora else 0) for t in targets)
    optim = {"adamw_8bit": 2, "paged_adamw_8bit": 0, "adamw_torch": 8}[spec.train.optim]  # paged: managed memory
    parts["adapter"] = trainable * (4 + optim) / GIB

    hidden_state = B * S * H * 2
    assumptions = {"backend": backend, "activation_bytes": act, "layers": L, "vision_params": vision, "seq": S,
                   "batch": B, "r": spec.lora.r, "dora": dora, "fast_dora": fast_dora, "targets": targets}
    if backend == "unsloth" and act == 4 and dora and fast_dora and spec.model.gradient_checkpointing and targets:
        parts["gradients"] = trainable * 4 / GIB
        parts["activations"] = L * T4_FAST_SAVED_PER_LAYER * hidden_state / GIB
        layer = T4_FAST_LAYER_TRANSIENT * B * S * s["intermediate"] * 2
        if not lean_attention:
            layer += T4_STOCK_ATTENTION * B * S * s["heads"] * s["head_dim"] * 4
        parts["transient"] = layer / GIB
        return Estimate(sum(parts.values()), parts, assumptions | {
            "lean_attention": lean_attention,
            "transient": "a layer's recompute and backward (T4 path, fitted 2026-11-29)"})
    if spec.model.gradient_checkpointing:
        saved = SAVED_PER_LAYER.get((backend, act), 1.0)
        if dora and not fast_dora:
            saved += PEFT_DORA_SAVED_PER_LAYER.get((backend, act), 0.0)
        parts["activations"] = L * saved * hidden_state / GIB
    else:  # every layer keeps its MLP's and attention's activations until its backward
        parts["activations"] = L * NO_CHECKPOINTING_SAVED_PER_LAYER * B * S * s["intermediate"] * act / GIB

    layer = LAYER_TRANSIENT_MLP * B * S * s["intermediate"] * act
    if dora and targets:
        widest_out = max(proj[t][1] for t in targets)
        largest = max(proj[t][0] * proj[t][1] for t in targets)
        if fast_dora:
            layer += FAST_DORA_TRANSIENT * B * S * widest_out * act
        else:
            layer += PEFT_DORA_TRANSIENT[0] * largest * 2 + PEFT_DORA_TRANSIENT[1] * B * S * widest_out * 4
    if (compiled_layers and backend == "unsloth" and act == 2 and spec.model.load_in_4bit and targets
            and (fast_dora or not dora) and s["model_type"] in COMPILED_LAYER_MODELS):
        # the compiled layers (train/compiled_layers; a LoRA job's too, backends/unsloth.py) keep a layer's
        # dequantised projections for its backward: all 7, adapted or not (12B shape: 0.42 GiB; measured +0.64
        # at 48 layers with fast DoRA, call 18; +0.30 with LoRA, call 48). With gradient checkpointing that is
        # one layer's at a time (its recompute, then its backward); without it every layer's, from its forward
        # to its backward: 20.0 GiB at the 12B's 48 layers (measured +20.1 over Unsloth's compiled LoRA, call 56)
        kept = linear_params * act
        if spec.model.gradient_checkpointing:
            layer += kept
        else:
            parts["kept_projections"] = L * kept / GIB
        assumptions["compiled_layers"] = True
    loss = LOGITS_FP32_COPIES * B * S * s["vocab"] * 4 if backend == "peft" else 0.0
    parts["transient"] = max(layer, loss) / GIB
    if loss >= layer and spec.train.grad_accum > 1:
        # The logits peak comes before any gradient of this micro-batch exists; with accumulation
        # the previous micro-batches' fp32 gradients are alive then (+1.0 GiB at 48 layers,
        # measured). A layer's backward peak has them either way (T4 path, 48 layers: 13.11 GiB
        # with accumulation 1, 13.14 with 4), and the fitted constants hold them.
        parts["accumulated_grads"] = trainable * 4 / GIB
    return Estimate(sum(parts.values()), parts, assumptions | {
        "transient": "logits and loss" if loss >= layer else "a layer's recompute and backward"})


@dataclass
class RungPlan:
    index: int
    name: str
    estimate: Estimate
    fits: bool


def plan(rungs: list, spec: JobSpec, config: Any, backend: str, budget_gib: float, **kw: Any) -> list[RungPlan]:
    """Estimate every rung of ``ladder.rungs(spec)`` against ``budget_gib``."""
    out = []
    for index, rung in enumerate(rungs):
        est = estimate(config, rung.settings.apply(spec), backend, **kw)
        out.append(RungPlan(index, rung.name, est, est.fits(budget_gib)))
    return out


def pick_rung(rungs: list, spec: JobSpec, config: Any, backend: str, budget_gib: float, **kw: Any) -> int:
    """Index of the first rung predicted to fit ``budget_gib``; the last rung if none does (it is
    still tried: the estimate is a prediction, a real OOM is the verdict)."""
    for p in plan(rungs, spec, config, backend, budget_gib, **kw):
        if p.fits:
            return p.index
    return len(rungs) - 1


def preflight(spec: JobSpec, backend: str, *, fast_dora: bool = True, lean_attention: bool = True,
              compiled_layers: bool = True) -> tuple[Estimate, float] | None:
    """(estimate, budget) for this spec on this GPU, or None where there is nothing to check
    (no CUDA, or a config we cannot read). ``fast_dora``, ``lean_attention``, ``compiled_layers``: the run's
    ``RunOptions``."""
    budget = gpu.budget_gib()
    if budget is None:
        return None
    try:
        config = model_config.load(spec.model.name_or_path, spec.model.revision)
        return estimate(config, spec, backend, bf16_supported=gpu.bf16_supported(), fast_dora=fast_dora,
                        lean_attention=lean_attention, compiled_layers=compiled_layers), budget
    except (ModelUnavailable, OSError, ValueError, TypeError, KeyError):
        return None
