"""12B-shaped Gemma-3 benchmark on one GPU: step time and peak memory per variant, two depths,
per-layer fit, extrapolation to 48 layers. One device call:

    python bench/gpu_bench.py build /tmp/m12b 2 4           # random bf16 weights + offline tokenizer
    python bench/gpu_bench.py run peft    /tmp/m12b $OUT/peft.jsonl    --deadline 240
    python bench/gpu_bench.py run unsloth /tmp/m12b $OUT/unsloth.jsonl --deadline 300
    python bench/gpu_bench.py table $OUT/*.jsonl                        # fit + 48-layer table

A step is one micro-batch of ``batch × seq`` random tokens (labels = inputs) + backward + one
8-bit AdamW step (bitsandbytes, not paged: the paged one hides its state from
``max_memory_allocated``), under bf16 autocast, gradient checkpointing on. ``accum`` > 1 steps the
optimizer every ``accum`` micro-batches (fast DoRA refreshes its norm once per optimizer step).
Time: median of the timed micro-batches after warm-up, each synchronised. T4 emulation: the
per-process memory cap is set to 15.1 GiB, fp16 is requested (Gemma-3 then runs in fp32), attention
is eager and the norm refresh runs without the NF4 kernel (``T4_KERNEL``). Plain ``peft`` loads the
4-bit base once per depth and swaps adapters.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QV = ["q_proj", "v_proj"]
SHAPE_12B = dict(hidden_size=3840, intermediate_size=15360, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=256, query_pre_attn_scalar=256, vocab_size=262208, sliding_window=1024,
                 max_position_embeddings=131072, tie_word_embeddings=True, rope_theta=1_000_000.0)
T4_CAP_GIB = 15.1


def variants(backend: str) -> list[dict]:
    """What each process measures, most important first (a deadline cuts the tail). ``_acc4`` rows
    are the recipe's batch 1 × gradient accumulation 4 (one optimizer step, one fast-DoRA norm
    refresh, per 4 micro-batches); the others step the optimizer after every micro-batch."""
    def v(name, dora="none", seq=4096, r=64, targets=ALL7, t4=False, accum=1):
        return dict(name=name, backend=backend, dora=dora, seq=seq, r=r, targets=targets, t4=t4, accum=accum)

    common = [v("lora_acc4", accum=4), v("dora_fast_acc4", "fast", accum=4), v("dora_peft_acc4", "peft", accum=4),
              v("lora"), v("dora_fast", "fast")]
    if backend == "peft":
        return common + [v("lora_s2048_r32_qv", seq=2048, r=32, targets=QV)]
    # the seed ladder's lower rungs on the T4 path (seq_2048, r_32, dora_off, targets_qv): rows the
    # memory estimate was not fitted on (out-of-sample checks, tests/core/test_memory.py); last, so a
    # deadline cuts them first
    rungs = [v("t4_dora_fast_s2048_acc4", "fast", seq=2048, t4=True, accum=4),
             v("t4_dora_fast_s2048_r32_acc4", "fast", seq=2048, r=32, t4=True, accum=4),
             v("t4_lora_s2048_r32_acc4", seq=2048, r=32, t4=True, accum=4),
             v("t4_lora_s2048_r32_qv_acc4", seq=2048, r=32, targets=QV, t4=True, accum=4)]
    above = [v("t4_dora_fast_s8192_acc4", "fast", seq=8192, t4=True, accum=4)]  # a rung above the recipe (#20)
    return common + [v("t4_lora_acc4", t4=True, accum=4), v("t4_dora_fast_acc4", "fast", t4=True, accum=4),
                     v("t4_dora_peft_acc4", "peft", t4=True, accum=4)] + rungs + above


T4_KERNEL = False
"""T4 rows run the norm refresh without the NF4 kernel, as a T4 does (compute capability 7.5 < 8.0);
``--t4-kernel`` keeps it (and its CUDA graph) on, the emulation of the runs before 2026-11-29."""
LEAN_NORMS = True
"""Patch Gemma-3's norms as the Unsloth backend does (trinity_core.train.lean_norm: float32 mode only);
``--stock-norms`` leaves Unsloth's."""
LEAN_ATTENTION = True
"""Patch Gemma-3's attention as the Unsloth backend does (trinity_core.train.lean_attention: float32 mode
only); ``--stock-attention`` leaves Unsloth's."""

COMPILED_KERNELS = True
"""With Unsloth's compile off (UNSLOTH_COMPILE_DISABLE=1), bf16 rows compile Gemma-3's norms and attention
prepare as the Unsloth backend does (trinity_core.train.compiled_kernels); ``--eager-kernels`` leaves them eager."""
COMPILED_LAYERS = False
"""With COMPILED_KERNELS: also each decoder layer as one compiled region (trinity_core.train.compiled_layers);
``--compile-layers``."""
CHECKPOINTING = "unsloth"
"""Unsloth rows' ``use_gradient_checkpointing``: "unsloth" (its offloaded checkpointing, its default and the
recipe's, every row until 2026-11-30) or "off" (every layer keeps its activations: the peer's fastest path where the
card's memory allows: call 56, 8280.2 tok/s for compiled LoRA at 43.1 GiB against 5938.8 with checkpointing in call 54,
docs/BENCHMARKS.md; 0.69 GiB a layer of the 12B at seq 4096, ``train/memory.py``'s term fitted on it); ``--checkpointing``."""
REGION_OPAQUE = False
"""With COMPILED_LAYERS: the regions call bitsandbytes' ``gemm_4bit`` and fast DoRA's Triton custom ops, as
until 2026-11-29, instead of tracing the NF4 dequantisation and DoRA's arithmetic for inductor to fuse;
``--region-opaque``."""
MODULE_GUARDS = False
"""With COMPILED_LAYERS: the layers share one compile with all of Dynamo's guards, as until 2026-11-29, instead of
one compile a kind of layer with the guards on modules dropped (trinity_core.train.compiled_layers.MODULE_GUARDS);
``--module-guards``."""
NO_BNB_SYNC = False
"""The 8-bit AdamW steps without bitsandbytes' ``torch.cuda.synchronize()`` after each parameter
(trinity_core.train.bnb_step); ``--no-bnb-sync``, for any row (the compiled-LoRA reference too)."""
REGION_TORCH_ACT = False
"""With COMPILED_LAYERS: the gated MLP's activation in torch operations for inductor to fuse, as from 2026-11-29
(night), instead of its Triton kernels as triton ops (trinity_core.train.fast_dora.mlp.REGION_KERNELS);
``--region-torch-act``."""
PEAK_TFLOPS = 989.4
"""Dense bf16 peak of an H100 / H200 SXM (NVIDIA's data sheet, without sparsity): the MFU denominator."""

ONLY_GROWN = False
"""``--only-grown`` (run_unsloth): skip the rows at the built depths."""
LENGTHS: list[int] = []
"""``--lengths``: after a row's timed steps, two micro-batches (forward and backward, no optimizer step) at each of
these sequence lengths, their wall time and Dynamo's graph count after each: whether a new length compiles again
(call 41 found fast DoRA's compiled layers specialised on 4096)."""

SELECT: tuple[set[str] | None, str] = (None, "")
"""(variants to run, or None for all; prefix for their names), from the command line."""


def selected(backend: str) -> list[dict]:
    only, tag = SELECT
    return [dict(v, name=tag + v["name"]) for v in variants(backend) if only is None or v["name"] in only]


GROWN = {"peft": ["lora_acc4", "dora_fast_acc4"],
         "unsloth": ["lora_acc4", "dora_fast_acc4", "dora_peft_acc4", "t4_dora_fast_acc4", "t4_lora_acc4",
                     "t4_dora_peft_acc4", "t4_dora_fast_s2048_acc4", "t4_dora_fast_s2048_r32_acc4",
                     "t4_lora_s2048_r32_acc4", "t4_lora_s2048_r32_qv_acc4", "t4_dora_fast_s8192_acc4"]}
"""Variants also measured at ``--grow-to`` layers (the built model's layers repeated)."""


# --------------------------------------------------------------------------- build


def build(out: Path, depths: list[int], global_every: int = 0) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from trinity_core.fixtures.tiny import build_tokenizer

    for depth in depths:
        path = out / f"L{depth}"
        if (path / "config.json").exists():
            continue
        tok = build_tokenizer(path)
        types_ = ({"layer_types": ["full_attention" if (i + 1) % global_every == 0 else "sliding_attention"
                                   for i in range(depth)]} if global_every else {})
        config = Gemma3TextConfig(**SHAPE_12B, num_hidden_layers=depth, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **types_)
        config.architectures = ["Gemma3ForCausalLM"]
        t0 = time.time()
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Gemma3ForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path)
        print(f"built {path} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params) "
              f"in {time.time() - t0:.1f}s", flush=True)
        del model
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- measure


def other_lengths(model, v: dict, vocab: int) -> list[dict]:
    """:data:`LENGTHS`' micro-batches: for each length, each micro-batch's seconds and Dynamo's graphs so far."""
    import torch
    from torch._dynamo.utils import counters

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=not v["t4"])
    gen = torch.Generator(device="cuda").manual_seed(1)
    out = []
    for seq in LENGTHS:
        ids = torch.randint(10, vocab, (1, seq), device="cuda", generator=gen)
        for rep in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.cuda.synchronize()
            out.append(dict(seq=seq, rep=rep, s=round(time.perf_counter() - t0, 3),
                            graphs=counters["stats"]["unique_graphs"]))
    model.zero_grad(set_to_none=True)
    return out


def measure(model, v: dict, vocab: int, warmup: int = 2, timed: int = 4) -> dict:
    """``warmup`` + ``timed`` optimizer steps of ``accum`` micro-batches each; time per micro-batch
    (median when accum is 1, else the mean over the timed steps, optimizer steps included)."""
    import bitsandbytes as bnb
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    if NO_BNB_SYNC:
        from trinity_core.train.bnb_step import without_per_parameter_sync

        v["no_bnb_sync"] = without_per_parameter_sync(opt)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=not v["t4"])
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(10, vocab, (1, v["seq"]), device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    times, losses = [], []
    model.train()
    total = (warmup + timed) * v["accum"]
    snap_dir = os.environ.get("TRINITY_BENCH_MEMSNAP")  # what is alive at the peak of the last optimizer step
    probe = MemoryProbe(model) if snap_dir else None
    for i in range(total):
        torch.cuda.synchronize()
        if snap_dir and i == total - v["accum"]:
            from mem_peak import recording

            rec = recording(Path(snap_dir) / f"mem_peak-{v['name']}-L{v.get('depth', '?')}.txt",
                            f"{v['name']} L{v.get('depth', '?')}")
            rec.__enter__()
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        (loss / v["accum"]).backward()
        if (i + 1) % v["accum"] == 0:
            if probe is not None:
                probe.grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if snap_dir:
        rec.__exit__(None, None, None)  # (its timed micro-batches ran with the recorder on)
        probe.write(Path(snap_dir) / f"probe-{v['name']}-L{v.get('depth', '?')}.txt", params, opt)
    if os.environ.get("TRINITY_BENCH_PROFILE"):  # kernel totals of one more optimizer step
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        cpu = os.environ.get("TRINITY_BENCH_PROFILE_CPU") == "1"  # host side too: where the CPU time goes
        with torch_profile(activities=[ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])) as prof:
            for _ in range(v["accum"]):
                with autocast:
                    loss = model(input_ids=ids, labels=ids).loss
                (loss / v["accum"]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=80, max_name_column_width=120)
        if cpu:
            table += "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60,
                                                         max_name_column_width=120)
        (Path(os.environ["TRINITY_BENCH_PROFILE"]) / f"prof-{v['name']}-L{v.get('depth', '?')}.txt").write_text(table)
        if os.environ.get("TRINITY_BENCH_TRACE") == "1":  # where the GPU waits (bench/gpu_timeline.py)
            import tempfile

            from gpu_timeline import load, report

            with tempfile.TemporaryDirectory() as tmp:
                trace = Path(tmp) / "trace.json"
                prof.export_chrome_trace(str(trace))
                text = report(load(trace))
                if os.environ.get("TRINITY_BENCH_KEEP_TRACE") == "1":  # the trace itself, compacted
                    from gpu_timeline import compact

                    compact(trace, Path(os.environ["TRINITY_BENCH_PROFILE"])
                            / f"trace-{v['name']}-L{v.get('depth', '?')}.json.gz")
            (Path(os.environ["TRINITY_BENCH_PROFILE"]) / f"prof-timeline-{v['name']}-L{v.get('depth', '?')}.txt"
             ).write_text(text)
    timed_times = times[warmup * v["accum"]:]
    # accum > 1: the median of each position within the optimizer step (the last one includes the
    # step and fast DoRA's refresh), averaged: robust to a one-off stall, fair to the step's cost
    step_s = statistics.fmean(statistics.median(timed_times[i::v["accum"]]) for i in range(v["accum"]))
    row = dict(step_s=round(step_s, 4), tok_s=round(v["seq"] / step_s, 1),
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
               weights_gib=round(weights_gib, 3), first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4),
               trainable_m=round(sum(p.numel() for p in params) / 1e6, 2))
    if v["dora"] == "fast":
        row["norm_refresh_ms"] = round(time_norm_refresh(opt) * 1e3, 2)
    return row


class MemoryProbe:
    """What a memory figure is made of (benchmark aid, with ``TRINITY_BENCH_MEMSNAP``): the dtype and
    shape of every tensor entering and leaving each module of the first decoder layer on the first
    forward, and the bytes of parameters (by dtype and trainability), gradients and optimizer state."""

    def __init__(self, model):
        import torch

        self.seen: dict[str, str] = {}
        self.grads = 0
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
        self.hooks = [m.register_forward_hook(self._hook(n)) for n, m in layer.named_modules()]
        self.model, self.torch = model, torch

    def _hook(self, name):
        def describe(x):
            t = self.torch
            if isinstance(x, t.Tensor):
                return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
            if isinstance(x, (tuple, list)):
                return "(" + ", ".join(describe(y) for y in x[:3]) + ")"
            return type(x).__name__

        def hook(module, args, out):
            if name not in self.seen:
                self.seen[name] = f"{type(module).__name__}: in {describe(args)} -> out {describe(out)}"
        return hook

    def _other_tensors(self) -> list[str]:
        """CUDA storages alive now that no parameter owns (the optimizer's state among them), grouped by
        dtype and shape (gc walk)."""
        t = self.torch
        owned = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        seen, groups = set(), {}
        for obj in gc.get_objects():
            try:
                if not isinstance(obj, t.Tensor) or not obj.is_cuda or isinstance(obj, t.nn.Parameter):
                    continue
                ptr = obj.untyped_storage().data_ptr()
            except Exception:  # noqa: BLE001 (fake/meta tensors, freed storages)
                continue
            if ptr in owned or ptr in seen:
                continue
            seen.add(ptr)
            key = f"{str(obj.dtype).removeprefix('torch.')}{list(obj.shape)}"
            g = groups.setdefault(key, [0, 0])
            g[0] += obj.untyped_storage().nbytes()
            g[1] += 1
        total = sum(g[0] for g in groups.values())
        top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:20]
        head = f"other CUDA storages, optimizer state included (gc walk): {total / 2**30:.3f} GiB in {len(seen)}"
        return [head] + [
            f"  {b / 2**20:9.1f} MiB  {n:5d} x {k}" for k, (b, n) in top]

    def write(self, path: Path, params, opt) -> None:
        for h in self.hooks:
            h.remove()
        by: dict[tuple, int] = {}
        for p in self.model.parameters():
            key = (str(p.dtype), p.requires_grad, p.device.type)
            by[key] = by.get(key, 0) + p.numel() * p.element_size()
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if isinstance(v, self.torch.Tensor) and v.is_cuda)
        lines = [f"params {k}: {b / 2**30:.3f} GiB" for k, b in sorted(by.items(), key=lambda kv: -kv[1])]
        lines += [f"grads (before the last optimizer step): {self.grads / 2**30:.3f} GiB",
                  f"optimizer state: {state / 2**30:.3f} GiB",
                  f"allocated now: {self.torch.cuda.memory_allocated() / 2**30:.3f} GiB", ""]
        lines += self._other_tensors() + [""]
        lines += [f"{n or '(layer)'}: {d}" for n, d in self.seen.items()]
        path.write_text("\n".join(lines) + "\n")
        print("\n".join(lines[:8]), flush=True)


def fused_mlps(model) -> int:
    """MLPs that run fast DoRA's fused gated forward (trinity_core.train.fast_dora.mlp)."""
    from trinity_core.train.fast_dora.mlp import gated_dora_forward

    return sum(getattr(m.__dict__.get("forward"), "__func__", None) is gated_dora_forward for m in model.modules())


def time_norm_refresh(opt, samples: int = 5) -> float:
    """Seconds for the fast-DoRA norm refresh an optimizer step triggers (every layer, one sync): the median of
    ``samples`` refreshes after one untimed (until call 38 one sample: 10.59 ms in call 36, 8.86 in call 37)."""
    import torch

    from trinity_core.train.fast_dora.linear import refresh_after_step

    refresh_after_step(opt)
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        refresh_after_step(opt)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def lora_config(v: dict):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=v["r"], lora_alpha=32, lora_dropout=0.0, use_rslora=True,
                      use_dora=v["dora"] != "none", target_modules=list(v["targets"]), bias="none")


def repeat_layers(model, depth: int) -> None:
    """Grow a loaded model to ``depth`` decoder layers by deep-copying its layers (4-bit included)."""
    layers = model.model.layers
    grown = [layers[i] if i < len(layers) else copy.deepcopy(layers[i % len(layers)]) for i in range(depth)]
    for layer in grown[len(layers):]:
        for m in layer.modules():  # Params4bit.__deepcopy__ copies its quant_state outside deepcopy's memo, so
            state = getattr(getattr(m, "weight", None), "quant_state", None)  # the module's own reference
            if state is not None and getattr(m, "quant_state", None) is not None:  # got a second copy
                m.quant_state = state  # (its absmax: 0.14 GiB at 48 layers of the 12B shape, until 2026-11-29)
    for i, layer in enumerate(grown):
        layer.self_attn.layer_idx = i
    model.model.layers = type(layers)(grown)
    model.config.num_hidden_layers = depth
    model.config.layer_types = [layer.self_attn.layer_type for layer in grown]


def cleanup() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(1.0)


def set_t4(v: dict) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(T4_CAP_GIB / total if v["t4"] else 1.0)


def run_peft(model_root: Path, depths: list[int], out, deadline: float, grow_to: int) -> None:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trinity_core.train.fast_dora import enable_fast_dora

    for depth in depths + ([grow_to] if grow_to else []):
        src = model_root / f"L{depth if depth != grow_to else depths[-1]}"
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        t0 = time.time()
        base = AutoModelForCausalLM.from_pretrained(src, quantization_config=quant, dtype=torch.bfloat16,
                                                    device_map={"": 0}, attn_implementation="sdpa")
        if depth == grow_to:
            repeat_layers(base, grow_to)
        base.config.use_cache = False
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        print(f"[peft] loaded L{depth} in {time.time() - t0:.1f}s", flush=True)
        todo = [v for v in selected("peft") if depth != grow_to or v["name"].removeprefix(SELECT[1]) in GROWN["peft"]]
        for v in todo:
            if time.time() > deadline:
                emit(out, dict(v, depth=depth, status="skipped: deadline"))
                continue
            v = dict(v, depth=depth)
            model = None
            try:
                model = get_peft_model(base, lora_config(v))
                v["fast_dora_layers"] = enable_fast_dora(model) if v["dora"] == "fast" else 0
                v["fused_mlps"] = fused_mlps(model)
                v.update(measure(model, v, base.config.vocab_size, *((1, 3) if depth == grow_to else (2, 4))))
                v["status"] = "ok"
            except torch.OutOfMemoryError as e:
                v["status"] = f"oom: {str(e).splitlines()[0][:120]}"
            except Exception as e:  # a bench records failures and moves on
                v["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
            emit(out, v)
            if model is not None:
                base = model.unload()
                base.__dict__.pop("peft_config", None)  # else get_peft_model warns of a second adapter
            model = None
            cleanup()
        del base
        cleanup()


def run_unsloth(model_root: Path, depths: list[int], out, deadline: float, grow_to: int) -> None:
    from unsloth import FastLanguageModel  # noqa: I001  (before transformers is used)
    import torch

    from trinity_core.train.fast_dora import enable_fast_dora
    from trinity_core.train.fast_dora import linear as qdora
    from torch._dynamo.utils import counters

    from trinity_core.train.backends.unsloth import compile_gemma3_kernels, patch_lean_attention
    from trinity_core.train.lean_norm import patch_gemma3_norms

    todo = [] if ONLY_GROWN else [dict(v, depth=d) for v in selected("unsloth") for d in depths]
    if grow_to:
        todo += [dict(v, depth=grow_to) for name in GROWN["unsloth"] for v in selected("unsloth")
                 if v["name"].removeprefix(SELECT[1]) == name]
    for v2 in todo:
        if time.time() > deadline:
            emit(out, dict(v2, status="skipped: deadline"))
            continue
        set_t4(v2)
        model = None
        try:
            t0 = time.time()
            model, _ = FastLanguageModel.from_pretrained(
                model_name=str(model_root / f"L{min(v2['depth'], depths[-1])}"), max_seq_length=v2["seq"],
                load_in_4bit=True, dtype=torch.float16 if v2["t4"] else torch.bfloat16,
                **({"attn_implementation": "eager"} if v2["t4"] else {}))
            if v2["depth"] > depths[-1]:
                repeat_layers(model, v2["depth"])
            v2["load_s"] = round(time.time() - t0, 1)
            model = FastLanguageModel.get_peft_model(
                model, r=v2["r"], lora_alpha=32, lora_dropout=0.0, target_modules=list(v2["targets"]),
                use_rslora=True, use_dora=v2["dora"] != "none", bias="none",
                use_gradient_checkpointing="unsloth" if CHECKPOINTING == "unsloth" else False, random_state=0,
                max_seq_length=v2["seq"])
            v2["checkpointing"] = CHECKPOINTING
            v2["fast_dora_layers"] = enable_fast_dora(model) if v2["dora"] == "fast" else 0
            v2["fused_mlps"] = fused_mlps(model)
            v2["lean_norms"] = patch_gemma3_norms(model) if LEAN_NORMS else 0  # as the Unsloth backend does
            v2["lean_attention"] = patch_lean_attention(model) if LEAN_ATTENTION else 0
            compile_off = os.environ.get("UNSLOTH_COMPILE_DISABLE") == "1"
            v2["unsloth_compile"] = not compile_off
            v2["compiled_kernels"] = (compile_gemma3_kernels(model, layers=COMPILED_LAYERS)
                                      if COMPILED_KERNELS and compile_off else {})
            if REGION_OPAQUE:
                v2["region_opaque"] = opaque_regions(model)
            v2["nf4_kernel"] = qdora.USE_NF4_KERNEL = not v2["t4"] or T4_KERNEL
            v2["param_dtype"] = str(next(p for p in model.parameters() if p.is_floating_point()).dtype)
            v2["attn"] = getattr(model.config, "_attn_implementation", "?")
            v2["force_fp32"] = os.environ.get("UNSLOTH_FORCE_FLOAT32")
            if v2.get("fused_mlps"):
                from trinity_core.train.fast_dora import mlp

                v2["gated_tiles"] = list(dataclasses.astuple(mlp.BACKWARD_TILES))
            v2.update(measure(model, v2, model.config.vocab_size, *((1, 3) if v2["depth"] > depths[-1] else (2, 4))))
            if LENGTHS:
                v2["lengths"] = other_lengths(model, v2, model.config.vocab_size)
            from trinity_core.train import block_masks

            if (masks := block_masks.installed()) is not None:  # the cache's calls (backends.unsloth.BLOCK_MASKS)
                v2["block_masks"] = dict(hits=masks.hits, misses=masks.misses, uncached=masks.uncached)
            from trinity_core.train import dense_attention

            if (dense := dense_attention.installed()) is not None:  # backends.unsloth.DENSE_ATTENTION
                states = {id(s): s for m in model.modules() if (s := getattr(m, "_trinity_region_state", None))}
                v2["dense_attention"] = dict(
                    global_kernel=dense_attention.GLOBAL_KERNEL, sliding=dense_attention.SLIDING,
                    sliding_kernel=dense_attention.SLIDING_KERNEL,
                    projection_layout=dense_attention.PROJECTION_LAYOUT,
                    cudnn_frontend=dense_attention._CUDNN_ERROR or ("loaded" if dense_attention._CUDNN_SDPA else "-"),
                    eager_calls=dense.calls, declined=dense.declined,
                    layer_calls_with_pattern=sum(s.dense_calls for s in states.values()))
            if COMPILED_LAYERS:  # the adapters' products inside the base GEMMs: fast DoRA's, plain LoRA's
                from trinity_core.train.fast_dora import lora_in_gemm

                dora = bool(v2.get("fused_mlps"))
                v2["lora_in_gemm"] = lora_in_gemm.ENABLED if dora else lora_in_gemm.LORA_ENABLED
                chosen = lora_in_gemm.PROJECTIONS if dora else lora_in_gemm.LORA_PROJECTIONS
                v2["lora_in_gemm_projections"] = "all" if chosen is None else sorted(chosen)
            if v2.get("fused_mlps") and COMPILED_LAYERS:
                from trinity_core.train.fast_dora import mlp

                v2["down_in_graph"] = mlp.DOWN_IN_GRAPH
                v2["down_tiles"] = list(dataclasses.astuple(mlp.DOWN_TILES))
                v2["down_paths"] = {" ".join(k): n for k, n in mlp.DOWN_PATHS.items()}  # traced backward launches
            types_ = getattr(model.config, "layer_types", None) or []
            v2["global_layers"] = sum(t == "full_attention" for t in types_)  # the grown model's own pattern
            v2.update(model_flops(v2))
            region = next((m._trinity_region_state for m in model.modules() if hasattr(m, "_trinity_region_state")),
                          None)
            if region is not None:  # the compiled layers: how many kinds, or one compile with every guard
                v2["region_kinds"], v2["region_guarded"] = len(region.kinds), region.guarded
                v2["whole_block_compiles"] = len(region.whole_blocks)  # compiled_layers.WHOLE_BLOCKS (--no-whole-blocks)
            v2["dynamo_graphs"] = counters["stats"]["unique_graphs"]  # both: so far in this process
            v2["graph_breaks"] = {" | ".join(reason.splitlines()[:3])[:400]: n
                                  for reason, n in counters["graph_break"].items()}
            v2["status"] = "ok"
        except torch.OutOfMemoryError as e:
            v2["status"] = f"oom: {str(e).splitlines()[0][:120]}"
            v2["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        except Exception as e:
            v2["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
        emit(out, v2)
        model = None
        cleanup()


def opaque_regions(model) -> int:
    """REGION_OPAQUE: the compiled layers' frozen NF4 projections back to bitsandbytes' forward, fast DoRA's
    arithmetic back to its custom ops (before the layers' first compile). How many projections."""
    from trinity_core.train.compiled_layers import nf4_base_forward
    from trinity_core.train.fast_dora import linear as fast_linear

    fast_linear.REGION_CUSTOM_OPS = True
    undone = 0
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is nf4_base_forward:
            del module.forward
            undone += 1
    return undone


def model_flops(v: dict) -> dict:
    """Model FLOPs per token of a row's training step and its MFU against :data:`PEAK_TFLOPS`.

    The 4-bit base is frozen: its projections cost 2 FLOPs a weight forward, 2 in the checkpointed
    recompute and 2 for the input gradient (no weight gradient): 6; the tied lm_head 4 (no recompute).
    LoRA's A and B: 2 + 2 + 4 (weight gradients too). Attention (QKᵀ and PV, 4·heads·head_dim a key):
    forward, recompute and a backward of twice the forward, over the keys a token attends to. A row without
    gradient checkpointing (``checkpointing: "off"``) has no recompute: 4, 6 and three forwards of attention
    (until 2026-11-30's call 56 such rows were counted with it, their MFU 1.4× too high). The keys: causal,
    on sliding layers at most ``sliding_window``. The global layers: the row's ``global_layers`` (its model's
    ``layer_types``: none in a model grown from 4 layers of transformers' default pattern; rows before
    2026-11-30's call 50 counted every 6th, so their MFU is ~1% high); without it, every 6th. Norms, RoPE,
    the activation, DoRA's rescale and the loss are not counted."""
    s, depth, seq, r = SHAPE_12B, v["depth"], v["seq"], v["r"]
    hidden, inter, head_dim = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q_out, kv_out = s["num_attention_heads"] * head_dim, s["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
              "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    base = sum(i * o for i, o in shapes.values())
    lora = sum(r * (shapes[t][0] + shapes[t][1]) for t in v["targets"])

    def mean_keys(window):
        return sum(min(i + 1, window or seq) for i in range(seq)) / seq

    global_layers = v.get("global_layers", depth // 6)
    keys = global_layers * mean_keys(None) + (depth - global_layers) * mean_keys(s["sliding_window"])
    passes = 3 if v.get("checkpointing") == "off" else 4  # forward, recompute, backward (2): in forwards' FLOPs
    attention = passes * 4 * q_out * keys
    flop = depth * (2 * (passes - 1) * base + 2 * passes * lora) + 4 * s["vocab_size"] * hidden + attention
    tflops = v["tok_s"] * flop / 1e12
    return dict(flop_per_token=round(flop / 1e9, 2), model_tflops=round(tflops, 1),
                mfu=round(tflops / PEAK_TFLOPS, 3))


def profile(model_root: Path, depth: int, out_dir: Path, grow_to: int = 0) -> None:
    """Where fast DoRA's extra time goes: CUDA kernel totals for LoRA vs fast DoRA (plain peft)."""
    import torch
    from peft import get_peft_model
    from torch.profiler import ProfilerActivity
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trinity_core.train.fast_dora import enable_fast_dora

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(model_root / f"L{depth}", quantization_config=quant,
                                                dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    if grow_to:
        repeat_layers(base, grow_to)
        depth = grow_to
    base.config.use_cache = False
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for v in [v for v in variants("peft") if v["name"] in ("lora", "dora_fast")]:
        model = get_peft_model(base, lora_config(v))
        enable_fast_dora(model) if v["dora"] == "fast" else None
        ids = torch.randint(10, base.config.vocab_size, (1, v["seq"]), device="cuda")
        for _ in range(2):  # warm-up
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):  # micro-batches between optimizer steps: no norm refresh
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    model(input_ids=ids, labels=ids).loss.backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
        (out_dir / f"profile_{v['name']}.txt").write_text(table)
        # device-side events (kernels, memcpys) only, as the table's "Self CUDA time total" footer does:
        # an operator's self CUDA time already holds the kernels it launched, so summing every event
        # counted each kernel twice (the 216.3/207.9 ms of 2026-11-26 were that double count)
        total = sum(e.self_device_time_total for e in prof.key_averages()
                    if e.device_type == torch.autograd.DeviceType.CUDA) / 3e3
        print(f"[profile] {v['name']} L{depth}: CUDA self time {total:.1f} ms per micro-batch", flush=True)
        print("\n".join(table.splitlines()[:14]), flush=True)
        base = model.unload()
        base.__dict__.pop("peft_config", None)
        model = None
        cleanup()


def emit(out, row: dict) -> None:
    row = {k: v for k, v in row.items() if k != "targets"} | {"targets": "all7" if row["targets"] == ALL7 else "qv"}
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    out.flush()


# --------------------------------------------------------------------------- table


def fit(rows: list[dict], to_depth: int = 48) -> list[dict]:
    """Per (backend, variant): linear fit of memory and time over depth, extrapolated to ``to_depth``."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            groups.setdefault((r["backend"], r["name"]), {})[r["depth"]] = r
    table = []
    for (backend, name), by_depth in groups.items():
        ds = sorted(d for d in by_depth if d <= 8)
        row = dict(backend=backend, name=name, depths=ds)
        if len(ds) >= 2:
            d0, d1 = ds[0], ds[-1]
            for key in ("peak_alloc_gib", "peak_reserved_gib", "step_s"):
                slope = (by_depth[d1][key] - by_depth[d0][key]) / (d1 - d0)
                row[key + "_per_layer"] = round(slope, 4)
                row[key + f"_at{to_depth}"] = round(by_depth[d1][key] + slope * (to_depth - d1), 3)
            row[f"tok_s_at{to_depth}"] = round(by_depth[d1]["seq"] / row[f"step_s_at{to_depth}"], 1)
        if to_depth in by_depth:
            row["measured_at48"] = {k: by_depth[to_depth][k] for k in ("peak_alloc_gib", "step_s", "tok_s")}
        table.append(row)
    return table


def print_table(paths: list[str]) -> None:
    rows = [json.loads(line) for p in paths if Path(p).exists() for line in Path(p).read_text().splitlines()
            if line.strip() and not line.startswith("#")]  # bench/results' copies start with a "# call N" line
    rows = [r for r in rows if "backend" in r]  # $OUT may hold other benchmarks' JSON lines
    print(f"{'backend':8} {'variant':20} {'L':>3} {'status':8} {'step_s':>7} {'tok/s':>8} {'alloc':>7} {'resv':>7} "
          f"{'weights':>7} {'ckpt':>7} {'mfu':>6}")
    for r in rows:
        targets = {"all7": ALL7, "qv": ("q_proj", "v_proj")}.get(r.get("targets"))  # as emit() wrote them
        mfu = model_flops(dict(r, targets=targets))["mfu"] if r.get("tok_s") and targets else ""  # by today's count
        print(f"{r['backend']:8} {r['name']:20} {r['depth']:>3} {r['status'][:8]:8} {r.get('step_s', ''):>7} "
              f"{r.get('tok_s', ''):>8} {r.get('peak_alloc_gib', ''):>7} {r.get('peak_reserved_gib', ''):>7} "
              f"{r.get('weights_gib', ''):>7} {r.get('checkpointing', 'unsloth' if r['backend'] == 'unsloth' else ''):>7} "
              f"{mfu:>6}")
    print("\nfit to 48 layers (from the two smallest depths):")
    for f in fit(rows):
        print(f"{f['backend']:8} {f['name']:20} alloc/L {f.get('peak_alloc_gib_per_layer', ''):>7} "
              f"alloc@48 {f.get('peak_alloc_gib_at48', ''):>7} step/L {f.get('step_s_per_layer', ''):>7} "
              f"tok/s@48 {f.get('tok_s_at48', ''):>8} measured@48 {f.get('measured_at48', '')}")


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("root", type=Path)
    b.add_argument("depths", type=int, nargs="+")
    b.add_argument("--global-every", type=int, default=0, help="every Nth layer global (full attention), the rest "
                   "sliding (Gemma-3: 6; default transformers' pattern, which makes a model of 4 layers all sliding "
                   "and so the 48 grown from it)")
    r = sub.add_parser("run")
    r.add_argument("backend", choices=["peft", "unsloth"])
    r.add_argument("root", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    r.add_argument("--deadline", type=float, default=300, help="seconds after which variants are skipped")
    r.add_argument("--grow-to", type=int, default=0, help="also measure GROWN variants at this depth")
    r.add_argument("--only", nargs="+", default=None, help="measure only these variants")
    r.add_argument("--tag", default="", help="prefix for variant names (e.g. 'compiled_' for a run "
                   "without UNSLOTH_COMPILE_DISABLE)")
    r.add_argument("--t4-kernel", action="store_true", help="T4 rows keep the NF4 refresh kernel (see T4_KERNEL)")
    r.add_argument("--stock-norms", action="store_true", help="leave Unsloth's Gemma-3 norms (see LEAN_NORMS)")
    r.add_argument("--stock-attention", action="store_true",
                   help="leave Unsloth's Gemma-3 attention (see LEAN_ATTENTION)")
    r.add_argument("--eager-kernels", action="store_true",
                   help="leave Gemma-3's norms and attention prepare eager (see COMPILED_KERNELS)")
    r.add_argument("--compile-layers", action="store_true", help="compile each decoder layer (see COMPILED_LAYERS)")
    r.add_argument("--region-opaque", action="store_true", help="bitsandbytes' op and fast DoRA's custom ops "
                   "inside the compiled layers (see REGION_OPAQUE)")
    r.add_argument("--no-bnb-sync", action="store_true", help="8-bit AdamW without the per-parameter device sync "
                   "(see NO_BNB_SYNC)")
    r.add_argument("--region-torch-act", action="store_true", help="the gated activation's arithmetic in torch "
                   "operations inside the compiled layers (see REGION_TORCH_ACT)")
    r.add_argument("--no-down-in-graph", action="store_true", help="the compiled layers' gated activation and "
                   "down_proj's input GEMMs as two nodes (trinity_core.train.fast_dora.mlp.DOWN_IN_GRAPH off)")
    r.add_argument("--no-lora-in-gemm", action="store_true", help="the compiled layers' adapter products (fast "
                   "DoRA's and LoRA's) as PEFT's accumulating GEMM, not inside the base GEMM "
                   "(trinity_core.train.fast_dora.lora_in_gemm.ENABLED, LORA_ENABLED)")
    r.add_argument("--lora-in-gemm", action="store_true", help="a LoRA job's adapter products inside the base "
                   "GEMMs in the compiled layers (lora_in_gemm.LORA_ENABLED; the default since call 38)")
    r.add_argument("--lora-in-gemm-projections", default="", help="comma-separated projections (q_proj, ...) "
                   "where the adapter's product goes inside the base GEMM, or `all`; default fast DoRA every "
                   "eligible one, LoRA gate, up and o_proj (lora_in_gemm.PROJECTIONS, LORA_PROJECTIONS)")
    r.add_argument("--module-guards", action="store_true", help="the compiled layers keep Dynamo's guards on "
                   "their modules (see MODULE_GUARDS)")
    r.add_argument("--no-whole-blocks", action="store_true", help="lengths in whole 128-token blocks run the compiled "
                   "layers' general compile, flex attention with bounds checks (default since call 44: their "
                   "whole-block compile; trinity_core.train.compiled_layers.WHOLE_BLOCKS)")
    r.add_argument("--lengths", default="", help="comma-separated sequence lengths: after the timed steps, two "
                   "micro-batches at each, timed, with Dynamo's graph count (recompiles by length)")
    r.add_argument("--no-block-masks", action="store_true", help="flex attention's block masks built every "
                   "micro-batch, as transformers does (trinity_core.train.backends.unsloth.BLOCK_MASKS)")
    r.add_argument("--no-dense-attention", action="store_true", help="plain masks' attention through flex "
                   "attention, as transformers runs it (trinity_core.train.backends.unsloth.DENSE_ATTENTION)")
    r.add_argument("--global-kernel", choices=("cudnn", "flash"), default="cudnn", help="a global layer's dense "
                   "attention kernel (trinity_core.train.dense_attention.GLOBAL_KERNEL)")
    r.add_argument("--sliding-kernel", choices=("cudnn", "flash", "flex"), default="cudnn", help="sliding layers' "
                   "plain masks: cuDNN's banded kernel through cudnn-frontend (the default where it loads; "
                   "bench/gpu_cudnn_fe.sh), FlashAttention-2, or flex attention (trinity_core.train.dense_attention."
                   "SLIDING / SLIDING_KERNEL)")
    r.add_argument("--attention-layout", choices=("projection", "heads"), default="projection", help="q, k, v "
                   "into cuDNN's kernels in the projections' (batch, seq, heads, dim) memory order, or (batch, heads, "
                   "seq, dim)-contiguous (trinity_core.train.dense_attention.PROJECTION_LAYOUT)")
    r.add_argument("--only-grown", action="store_true", help="measure only the --grow-to rows")
    r.add_argument("--checkpointing", choices=("unsloth", "off"), default="unsloth",
                   help="Unsloth rows' gradient checkpointing (see CHECKPOINTING)")
    r.add_argument("--gated-tiles", default="", help="ROWS,BLOCK_T,BLOCK_N,WARPS of the gated activation's "
                   "backward kernel (trinity_core.train.fast_dora.mlp.BACKWARD_TILES; bench/gated_act_sweep.py)")
    r.add_argument("--down-tiles", default="", help="ROWS,BLOCK_T,BLOCK_N,WARPS[,DOT_ACC] of that kernel with "
                   "down_proj's adapter part (mlp.DOWN_TILES; bench/gated_act_sweep.py --lora 64)")
    pr = sub.add_parser("profile")
    pr.add_argument("root", type=Path)
    pr.add_argument("out", type=Path)
    pr.add_argument("--depth", type=int, default=4)
    pr.add_argument("--grow-to", type=int, default=0)
    t = sub.add_parser("table")
    t.add_argument("paths", nargs="+")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.root, a.depths, a.global_every)
    elif a.cmd == "run":
        deadline = time.time() + a.deadline
        global SELECT, T4_KERNEL, LEAN_NORMS, LEAN_ATTENTION, COMPILED_KERNELS, COMPILED_LAYERS, REGION_OPAQUE
        global ONLY_GROWN, NO_BNB_SYNC, LENGTHS, CHECKPOINTING
        CHECKPOINTING = a.checkpointing
        SELECT = (set(a.only) if a.only else None, a.tag)
        T4_KERNEL, LEAN_NORMS, LEAN_ATTENTION = a.t4_kernel, not a.stock_norms, not a.stock_attention
        COMPILED_KERNELS, COMPILED_LAYERS, REGION_OPAQUE = not a.eager_kernels, a.compile_layers, a.region_opaque
        ONLY_GROWN = a.only_grown
        LENGTHS = [int(n) for n in a.lengths.split(",") if n]
        NO_BNB_SYNC = a.no_bnb_sync
        if a.module_guards:
            from trinity_core.train import compiled_layers

            compiled_layers.MODULE_GUARDS = True
        if a.no_whole_blocks:
            from trinity_core.train import compiled_layers

            compiled_layers.WHOLE_BLOCKS = False
        if a.no_block_masks:
            from trinity_core.train.backends import unsloth as unsloth_backend

            unsloth_backend.BLOCK_MASKS = False
        from trinity_core.train import dense_attention
        from trinity_core.train.backends import unsloth as unsloth_backend

        unsloth_backend.DENSE_ATTENTION = not a.no_dense_attention
        dense_attention.GLOBAL_KERNEL = a.global_kernel
        dense_attention.PROJECTION_LAYOUT = a.attention_layout == "projection"
        dense_attention.SLIDING = a.sliding_kernel != "flex"
        if dense_attention.SLIDING:
            dense_attention.SLIDING_KERNEL = a.sliding_kernel
        if a.region_torch_act:
            from trinity_core.train.fast_dora import mlp

            mlp.REGION_KERNELS = False
        from trinity_core.train.fast_dora import mlp

        if a.no_down_in_graph:
            mlp.DOWN_IN_GRAPH = False
        from trinity_core.train.fast_dora import lora_in_gemm

        if a.no_lora_in_gemm:
            lora_in_gemm.ENABLED = lora_in_gemm.LORA_ENABLED = False
        if a.lora_in_gemm:
            lora_in_gemm.LORA_ENABLED = True
        if a.lora_in_gemm_projections:
            chosen = a.lora_in_gemm_projections
            lora_in_gemm.PROJECTIONS = lora_in_gemm.LORA_PROJECTIONS = (
                None if chosen == "all" else frozenset(chosen.split(",")))
        if a.gated_tiles:
            mlp.BACKWARD_TILES = mlp.BackwardTiles(*(int(x) for x in a.gated_tiles.split(",")))
        if a.down_tiles:
            mlp.DOWN_TILES = mlp.BackwardTiles(*(int(x) for x in a.down_tiles.split(",")))
        with open(a.out, "a") as out:
            if a.backend == "peft":
                run_peft(a.root, a.depths, out, deadline, a.grow_to)
            else:
                run_unsloth(a.root, a.depths, out, deadline, a.grow_to)
    elif a.cmd == "profile":
        profile(a.root, a.depth, a.out, a.grow_to)
    else:
        print_table(a.paths)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/mem_peak.py
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
