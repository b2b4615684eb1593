"""Graph breaks of ``compile_decoder_layers`` on the tiny 4-bit Gemma-3 (PEFT backend, fast DoRA, the compiled
norms installed as the Unsloth backend installs them), ``aot_eager``, one training micro-batch:

    python bench/compile_breaks.py before   # the norms call their cached compiled wrappers inside the region
    python bench/compile_breaks.py after    # compiled_kernels.kernels: the plain functions inline there

Kept output: bench/results/2026-11-29-cpu-compile_breaks.txt.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from trinity_core.fixtures.tiny import build_tiny_model  # noqa: E402
from trinity_core.spec import load_spec  # noqa: E402
from trinity_core.train import compiled_kernels  # noqa: E402
from trinity_core.train.backends.peft import PeftBackend  # noqa: E402
from trinity_core.train.compiled_kernels import install_compiled_norms  # noqa: E402
from trinity_core.train.compiled_layers import compile_decoder_layers  # noqa: E402


def main(when: str) -> None:
    if when == "before":
        compiled_kernels.kernels = compiled_kernels.compiled
    spec = load_spec(Path(__file__).resolve().parents[1] / "examples/tiny.yaml")
    spec.model.name_or_path = str(build_tiny_model(Path("/tmp/compile_breaks-tiny")))
    model, _ = PeftBackend().load(spec)
    print("norms", install_compiled_norms(model, backend="aot_eager"),
          "layers", compile_decoder_layers(model, backend="aot_eager"))
    model.train()
    ids = torch.randint(7, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    print(when, "graph breaks:", sum(counters["graph_break"].values()),
          "unique graphs:", counters["stats"]["unique_graphs"])
    for reason, n in counters["graph_break"].items():
        print(" ", n, reason.splitlines()[0][:120])


if __name__ == "__main__":
    main(sys.argv[1])
