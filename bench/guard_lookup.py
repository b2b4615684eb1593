"""Dynamo's cache lookup (its guard checks) before each compiled decoder-layer call, on the tiny 4-bit Gemma-3 (PEFT
backend, fast DoRA, the compiled norms installed as the Unsloth backend installs them), backend "eager", the
CPU profiler's ``TorchDynamo Cache Lookup`` events over 3 training micro-batches:

    python bench/guard_lookup.py guarded   # one compile of the layers' forward with every guard (MODULE_GUARDS)
    python bench/guard_lookup.py kinds     # one compile a kind of layer, Dynamo's guards on modules dropped

The per-call host cost, which at the 12B shape on an H200 was ~500 µs a region call (call 16's profile). The tiny
model's layers hold the same modules, so about the same number of guards. Kept output:
bench/results/2026-11-29-cpu-guard_lookup.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from trinity_core.fixtures.tiny import build_tiny_model  # noqa: E402
from trinity_core.spec import load_spec  # noqa: E402
from trinity_core.train import compiled_layers  # noqa: E402
from trinity_core.train.backends.peft import PeftBackend  # noqa: E402
from trinity_core.train.compiled_kernels import install_compiled_norms  # noqa: E402


def main(mode: str) -> None:
    compiled_layers.MODULE_GUARDS = mode == "guarded"
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples/tiny.yaml")
    spec.model.name_or_path = str(build_tiny_model(Path("/tmp/guard_lookup-tiny")))
    model, _ = PeftBackend().load(spec)
    install_compiled_norms(model, backend="eager")
    layers = compiled_layers.compile_decoder_layers(model, backend="eager")
    state = next(m._trinity_region_state for m in model.modules() if hasattr(m, "_trinity_region_state"))
    model.train()
    ids = torch.randint(7, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # compile, then warm
        model(input_ids=ids, labels=ids).loss.backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
    print(f"{mode}: {layers} layers, {len(state.kinds)} kinds, all guards: {state.guarded}")
    for event in prof.key_averages():
        if "Cache Lookup" in event.key:
            print(f"  {event.key}: {event.count} calls, {event.cpu_time_total / event.count:.1f} µs each")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kinds")
