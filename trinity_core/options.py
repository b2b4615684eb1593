"""``RunOptions``: how to run a job, as opposed to what to train (the spec).

Given to ``run_job`` explicitly: the worker builds it from the service settings, ``trinity train``
from its flags, tests and benchmarks directly. trinity_core reads no environment variable of its
own; the one it writes is Unsloth's (``UNSLOTH_COMPILE_DISABLE``, read by Unsloth at import, so
the backend sets it from ``unsloth_compile`` before importing it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    fast_dora: bool = True
    """Trinity's fast DoRA (``train/fast_dora``); False runs PEFT's own DoRA (benchmarks). The
    memory estimate follows the choice."""
    lean_attention: bool = True
    """Under Unsloth's float32 mode (the T4 path) recompute Gemma-3's attention core in backward
    (``train/lean_attention``): 0.38 GiB lower peak at the 12B shape and seq 4096, for ~14% of the step's
    speed on the H200 emulation (docs/BENCHMARKS.md, "T4 headroom"). False keeps Unsloth's attention."""
    compiled_kernels: bool = True
    """With Unsloth's compile mode off on a bf16 GPU (the DoRA path), compile Gemma-3's norms and the
    attention's q/k norm + RoPE (``train/compiled_kernels``). False leaves them eager (benchmarks)."""
    compiled_layers: bool = True
    """With ``compiled_kernels`` and fast DoRA or LoRA: also compile each decoder layer as one region, fast DoRA inside
    (``train/compiled_layers``: fast DoRA's arithmetic fused by inductor, the frozen NF4 weights dequantised by
    ``train/nf4_dequant``'s kernel). H200, 12B shape at 48 layers, one run (call 18): 5815 tok/s against 6091 for
    Unsloth's compiled LoRA (0.955×), peak 11.33 GiB (+0.64: each layer's dequantised weights kept for its
    backward; the memory estimate counts them); the first step compiles (~60 s at 48 layers, as Unsloth's compile
    mode does for LoRA); run_job's tiny job and the multimodal GPU tests pass with it (call 19).
    docs/BENCHMARKS.md, "Goal 1, 2026-11-29 (night)". A LoRA job on a bf16 GPU runs them too, with Unsloth's compile
    mode off (``backends/unsloth.trinity_layers_for``; 12B layer pattern at 48 layers, H200, call 54: 6356.1 tok/s
    against 5938.8 for Unsloth's compiled LoRA, 1.070×, peak 11.06 against 10.75 GiB). False: the layers run eagerly
    and a LoRA job keeps Unsloth's compile mode."""
    unsloth_compile: bool | None = None
    """Unsloth's torch.compile mode; None: off with DoRA (it stalls or crashes there) and where Trinity's compiled
    layers run a LoRA job (``backends/unsloth.trinity_layers_for``: a bf16 GPU, a 4-bit Gemma-3), on otherwise."""
    debug_memory: bool = False
    """After a failed ladder attempt, print what still holds CUDA memory (stderr)."""
    mlflow_tracking_uri: str | None = None
    """Also log the job to MLflow there (``trinity_core.tracking_mlflow``); None: TensorBoard only."""
    test_seams: bool = False
    """Allow the test seams below; only test settings turn it on."""
    inject_oom: int = 0
    """Test seam: the first N training attempts of the job raise ``torch.OutOfMemoryError`` at their
    first step, whatever their settings (the OOM ladder's walk is then real)."""

    def __post_init__(self) -> None:
        if self.inject_oom < 0:
            raise ValueError("RunOptions.inject_oom must be >= 0")
        if self.inject_oom and not self.test_seams:
            raise ValueError("RunOptions.inject_oom is a test seam: it needs test_seams=True")
