"""Peak memory of the shard-by-shard merge on a ~1B-shaped Gemma-3 (random weights, CPU).

    python bench/merge_rss.py [--dir /tmp/trinity-merge-bench] [--layers 26] [--shard-mb 500]

Builds (once) a random bf16 ``Gemma3ForCausalLM`` checkpoint shaped like gemma-3-1b (hidden 1152,
intermediate 6912, 26 layers, 4 heads x 256, 1 KV head, vocab 262144; ~1.0 B parameters) in shards
of ``--shard-mb``, plus a random rsLoRA + DoRA adapter on all 7 projections (r 64, alpha 32).
The checkpoint is written tensor by tensor from a meta-device model, so building it never holds the
whole model either. Then it runs ``merge_adapter`` (NF4 round trip + DoRA, bf16 output, one output shard per input
shard) in a fresh subprocess and prints that process's peak RSS (``VmHWM``) next to the model
size and the largest shard. The merge streams tensor by tensor, so expect: peak ~ import baseline
+ adapter + the largest tensor and its fp32 temporaries, independent of the shard size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def gemma_1b_config(layers: int):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=262_144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                            sliding_window=512, max_position_embeddings=32_768, tie_word_embeddings=True,
                            dtype="bfloat16")


def build(out: Path, layers: int, shard_bytes: int, r: int = 64) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3ForCausalLM

    from trinity_core.fixtures.tiny import build_tokenizer

    config = gemma_1b_config(layers)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Gemma3ForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    written: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush() -> None:
        path = out / f"part-{len(written)}.safetensors"
        save_file(current, str(path), metadata={"format": "pt"})
        written.append((path, list(current)))
        current.clear()

    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
            size = 0
        current[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    weight_map = {}
    for i, (path, keys) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.architectures = ["Gemma3ForCausalLM"]
    config.save_pretrained(out)
    build_tokenizer(out)

    adapter = out.parent / "adapter"
    adapter.mkdir(exist_ok=True)
    tensors = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in PROJ:
            continue
        n_out, n_in = shape
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.02
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.002
        tensors[f"{prefix}.lora_magnitude_vector"] = 0.45 + 0.05 * torch.rand(n_out, generator=g)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 32, "use_rslora": True, "use_dora": True,
         "target_modules": list(PROJ), "task_type": "CAUSAL_LM"}))


def peak_rss() -> int:
    """This process's peak RSS in bytes: VmHWM (ru_maxrss would include the pre-exec parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge_child(base: Path, adapter: Path, out: Path) -> None:
    """Runs in the measured subprocess."""
    import torch  # noqa: F401  (import cost is part of the baseline)
    import transformers  # noqa: F401

    from trinity_core.export.merge import merge_adapter

    baseline = peak_rss()
    t0 = time.monotonic()
    info = merge_adapter(adapter, out, base_model=base)
    seconds = time.monotonic() - t0
    peak = peak_rss()
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak, "seconds": round(seconds, 1),
                      "shards_out": info["shards"], "merged": info["merged"],
                      "requantized": info["requantized"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/trinity-merge-bench"))
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--child", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    shard_bytes = args.shard_mb * 2**20
    if args.child:
        merge_child(*map(Path, args.child))
        return

    base, adapter, out = args.dir / f"base-{args.layers}-{args.shard_mb}mb", args.dir / "adapter", args.dir / "merged"
    if not (base / "config.json").is_file():
        t0 = time.monotonic()
        build(base, args.layers, shard_bytes)
        print(f"built {base} in {time.monotonic() - t0:.0f} s")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shards = sorted(base.glob("*.safetensors"))
    model_bytes = sum(s.stat().st_size for s in shards)
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    run = subprocess.run([sys.executable, __file__, "--child",
                          str(base), str(adapter), str(out)], capture_output=True, text=True, check=True)
    m = json.loads(run.stdout.strip().splitlines()[-1])
    gib = 2**30
    print(f"model:        {model_bytes / gib:.2f} GiB bf16 in {len(shards)} shards "
          f"(largest {max(s.stat().st_size for s in shards) / gib:.2f} GiB), adapter {adapter_bytes / gib:.2f} GiB")
    print(f"merge:        {m['merged']} modules, {m['requantized']} NF4 round trips, {m['shards_out']} output "
          f"shards, {m['seconds']} s")
    print(f"peak RSS:     {m['peak_rss'] / gib:.2f} GiB (imports alone {m['baseline_rss'] / gib:.2f} GiB; "
          f"merge adds {(m['peak_rss'] - m['baseline_rss']) / gib:.2f} GiB)")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
