"""Host time of one call of a compiled decoder layer (``trinity_core/train/compiled_layers.py``) beyond its compiled
graph: the region's own Python (the adapter-state check, finding the kind's compile, the norm-refresh hook), on
the tiny Gemma-3 on this machine's CPU. Inductor compiles the layers (CPU kernels); the graph's own time is the
same in both columns, so the difference is the wrapper's.

    python bench/region_host_cost.py [--calls 50] [--rounds 9] [--out bench/results/…-region_host_cost.jsonl]

Prints, for one layer's training forward under ``torch.no_grad`` (the first pass of gradient checkpointing):
µs a call through the layer (hooks, ``compiled_layer_forward``, the compile it finds), the same as until
2026-11-30 (the kind a plain tuple, hashed again at every lookup; the norm-refresh hook on a LoRA job's layers
too), and through the compiled function directly; and one lookup of the layer's kind in a dict, as a plain tuple
and as ``compiled_layers._Kind`` (hashed once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=50, help="calls a round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)

    import torch

    from trinity_core.fixtures.tiny import build_tiny_model
    from trinity_core.spec import load_spec
    from trinity_core.train import compiled_layers
    from trinity_core.train.backends.peft import PeftBackend

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(ROOT / "examples" / "tiny.yaml")
        spec.model.name_or_path = str(build_tiny_model(Path(tmp) / "model"))
        spec.lora.use_dora = False
        model, _ = PeftBackend().load(spec)
    torch._dynamo.reset()
    compiled_layers.compile_decoder_layers(model, backend="inductor")
    model.train()
    layer = next(m for m in model.modules() if type(m).__name__ == "Gemma3DecoderLayer")
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, args, kwargs: seen.setdefault("call", (args, kwargs)),
                                           with_kwargs=True)
    ids = torch.randint(7, model.config.vocab_size, (1, a.seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)  # compiles
    hook.remove()
    args, kwargs = seen["call"]
    state = layer._trinity_region_state
    direct = state.forward_of(layer, compiled_layers._block_length(args, kwargs))

    def per_call(fn, calls: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls * 1e6

    kind = layer._trinity_kind
    plain = tuple(kind)

    def as_before():  # as until 2026-11-30: the kind a plain tuple (hashed at each lookup), the refresh hook too
        layer._trinity_kind = plain
        refresh = layer.register_forward_pre_hook(compiled_layers.refresh_norms, with_kwargs=True)
        try:
            layer(*args, **kwargs)
        finally:
            refresh.remove()
            layer._trinity_kind = kind

    ways = {"now": lambda: layer(*args, **kwargs), "before": as_before,
            "graph": lambda: direct(layer, *args, **kwargs)}
    best = dict.fromkeys(ways, float("inf"))
    with torch.no_grad():  # interleaved rounds, the fastest of each: the graph's own time (ms) varies more than this
        for _ in range(a.rounds):
            for name, fn in ways.items():
                best[name] = min(best[name], per_call(fn, a.calls))
    through, before, graph = best["now"], best["before"], best["graph"]
    # the hook's registration and removal are part of "before": measured alone and taken off
    def hook_churn():
        layer.register_forward_pre_hook(compiled_layers.refresh_norms, with_kwargs=True).remove()

    churn = min(per_call(hook_churn, a.calls) for _ in range(a.rounds))
    before -= churn
    lookups = {"plain tuple": ({plain: 1}, plain), "_Kind": ({kind: 1}, kind)}
    lookup_us = {}
    for name, (table, key) in lookups.items():
        lookup_us[name] = min(per_call(lambda table=table, key=key: table[key], 1000) for _ in range(a.rounds))
    row = dict(seq=a.seq, calls=a.calls, rounds=a.rounds, hook_churn_us=round(churn, 1), layer_call_us=round(through, 1), compiled_fn_us=round(graph, 1),
               wrapper_us=round(through - graph, 1), layer_call_before_us=round(before, 1),
               wrapper_before_us=round(before - graph, 1), kind_lookup_us={k: round(v, 2) for k, v in lookup_us.items()},
               kind_entries=len(kind), refresh_hook=bool(layer._forward_pre_hooks), torch=torch.__version__,
               threads=torch.get_num_threads())
    print(json.dumps(row))
    if a.out:
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
