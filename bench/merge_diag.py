"""Why the merged-weights check fails under Unsloth: each adapted module's difference split by cause.

    PYTHONPATH=$PWD/.whl/site:$PWD python bench/merge_diag.py --out $OUT/merge_diag.jsonl   # GPU + unsloth
    python bench/merge_diag.py --backend peft --steps 2                                      # CPU: same report

Runs the tiny multimodal stand-in (both variants: pre-quantised 4-bit and 16-bit) through ``run_job``
as ``tests/gpu/test_unsloth_multimodal.py`` does (fp16 asked for: Unsloth's T4 path). The job's own
merged-weights check (:func:`trinity_core.evaluate.merge_check.check_merged_weights`) is wrapped: after
it runs, in the same process and on the trained model it was given, every adapted module's expected
weight is compared piece by piece with what the merge used:

* ``base``: the loaded 4-bit weight dequantised (``merge_check._dense``) vs the merge's base weight
  (the checkpoint's packed tensor dequantised with its stats, or the 16-bit weight re-quantised with
  ``trinity_merge.json``'s quant); for a 16-bit base also which load dtype reproduces the loaded
  packed codes and absmax (``quantized_in``);
* ``A``/``B``/``magnitude``/``scaling``: the model's own vs the adapter file's;
* ``merged_vs_file_inputs``: the stored merged tensor vs ``Delta.apply`` on the merge's inputs (the
  merge's own rounding only).

One JSON line per variant: the check's verdict, the dtypes seen, and per piece the largest difference
over all adapted modules (and the first module's detail).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def _max(a, b) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.float() - b.to(a.device).float()).abs().max().item() if a.numel() else 0.0


def base_tensors(base_dir: Path, rename, wanted: set[str]) -> dict[str, dict]:
    """{module: {"weight": tensor, "stats": {suffix: tensor} or None}} of the base checkpoint."""
    from trinity_core.export.merge import _shard_plan, shard_files
    from trinity_core.export.shards import SafetensorsReader

    found = {}
    for shard in shard_files(base_dir):
        with SafetensorsReader(shard) as reader:
            plan, stats_of = _shard_plan(reader, None)
            for key, _, _ in plan:
                module = rename(key).removesuffix(".weight")
                if key.endswith(".weight") and module in wanted:
                    stats = {s: reader.get(k) for s, k in stats_of[key].items()} if key in stats_of else None
                    found[module] = {"weight": reader.get(key), "stats": stats, "key": key}
    return found


def merged_tensors(merged_dir: Path, keys: set[str]) -> dict[str, object]:
    from trinity_core.export.merge import shard_files
    from trinity_core.export.shards import SafetensorsReader

    out = {}
    for shard in shard_files(merged_dir):
        with SafetensorsReader(shard) as reader:
            out.update({k: reader.get(k) for k in reader.keys() if k in keys})
    return out


def diagnose(trained_model, merged_dir: Path, base_dir: Path) -> dict:
    import bitsandbytes.functional as bnbf
    import torch

    from trinity_core import nf4
    from trinity_core.evaluate import merge_check
    from trinity_core.export.merge import Delta, Quant, checkpoint_renamer, dequantize_prequantized, load_adapter

    workdir = merged_dir.parent
    info = json.loads((merged_dir / "trinity_merge.json").read_text())
    quant = Quant(**info["quant"]) if info.get("quant") else None
    _, deltas = load_adapter(workdir / "adapter")
    adapter = trained_model.active_adapter
    base = trained_model.get_base_model()
    rename = checkpoint_renamer(base)
    modules = {n: m for n, m in base.named_modules() if merge_check._adapted(m, adapter)}
    ckpt = base_tensors(base_dir, rename, set(modules))
    merged = merged_tensors(merged_dir, {c["key"] for c in ckpt.values()})
    worst: dict[str, float] = {}
    dtypes: dict[str, set] = {}
    first = None
    quantized_in: dict[str, int] = {}
    bad_modules = 0
    with torch.no_grad():
        for name, module in modules.items():
            layer = module.get_base_layer()
            weight = layer.weight
            state = getattr(weight, "quant_state", None)
            dev = weight.device
            d = {}
            dense = merge_check._dense(weight)
            c = ckpt.get(name)
            if c is None:
                d["missing_in_checkpoint"] = 1.0
            else:
                if c["stats"] is not None:
                    mine = dequantize_prequantized(c["weight"].to(dev), {k: v.to(dev) for k, v in c["stats"].items()},
                                                   quant)
                    if state is not None:
                        d["packed_codes"] = float(not torch.equal(weight.data.view(torch.uint8).reshape(-1).cpu(),
                                                                  c["weight"].view(torch.uint8).reshape(-1)))
                elif quant is not None:
                    from trinity_core.export.merge import nf4_roundtrip

                    mine = nf4_roundtrip(c["weight"].to(dev), quant)
                    if state is not None:  # which load dtype reproduces the model's codes and absmax
                        for dt in ("float16", "bfloat16", "float32"):
                            packed, st = bnbf.quantize_4bit(c["weight"].to(dev).to(getattr(torch, dt)).contiguous(),
                                                            blocksize=state.blocksize,
                                                            compress_statistics=state.nested,
                                                            quant_type=state.quant_type)
                            same = torch.equal(packed.view(torch.uint8).reshape(-1),
                                               weight.data.view(torch.uint8).reshape(-1))
                            same_w = torch.equal(nf4.dequantize(packed, st, state.dtype), dense)
                            quantized_in[dt] = quantized_in.get(dt, 0) + int(same and same_w)
                else:
                    mine = c["weight"].to(dev)
                d["base"] = _max(dense.float(), mine.float())
                d["base_dtype_model"] = str(dense.dtype)
                d["base_dtype_merge"] = str(mine.dtype)
            f = deltas.get(name)
            if f is None:
                d["missing_in_adapter"] = 1.0
            else:
                d["A"] = _max(module.lora_A[adapter].weight, f.A)
                d["B"] = _max(module.lora_B[adapter].weight, f.B)
                mag = getattr(module, "lora_magnitude_vector", None) or {}
                if adapter in mag:
                    d["magnitude"] = _max(mag[adapter].weight, f.magnitude)
                    dtypes.setdefault("magnitude", set()).add(f"{mag[adapter].weight.dtype}/file {f.magnitude.dtype}")
                d["scaling"] = abs(float(module.scaling[adapter]) - f.scaling)
                dtypes.setdefault("A", set()).add(f"{module.lora_A[adapter].weight.dtype}/file {f.A.dtype}")
                if c is not None:
                    expected = merge_check.expected_weight(module, adapter)
                    from_file = Delta(f.A.to(dev), f.B.to(dev), f.scaling,
                                      None if f.magnitude is None else f.magnitude.to(dev)).apply(mine)
                    d["expected_vs_merge_inputs"] = _max(expected, from_file)
                    stored = merged.get(c["key"])
                    if stored is not None:
                        d["merged_vs_file_inputs"] = _max(from_file, stored)
                        _, bad = merge_check.compare(expected, stored)
                        d["check_bad_elements"] = float(bad)
                        bad_modules += bad > 0
            dtypes.setdefault("state", set()).add(None if state is None else str(state.dtype))
            dtypes.setdefault("weight", set()).add(str(weight.dtype))
            for k, v in d.items():
                if isinstance(v, float):
                    worst[k] = max(worst.get(k, 0.0), v)
            if first is None:
                first = {"module": name, **d}
    return {"modules": len(modules), "modules_failing_check": bad_modules, "worst": worst,
            "dtypes": {k: sorted(map(str, v)) for k, v in dtypes.items()}, "quant": info.get("quant"),
            "quantized_in": quantized_in, "first": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="unsloth")
    p.add_argument("--compute-dtype", default="float16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--variants", default="prequantized,16bit")
    p.add_argument("--out")
    args = p.parse_args()

    from trinity_core.evaluate import merge_check
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model
    from trinity_core.pipeline import run_job
    from trinity_core.spec import load_spec

    original = merge_check.check_merged_weights
    out = open(args.out, "a") if args.out else None
    for variant in args.variants.split(","):
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f"merge_diag_{variant}_"))
        base = build_multimodal_model(tmp / "base", quantized=variant == "prequantized")
        found: dict = {}

        def wrapped(trained_model, merged_dir, base=base, found=found):
            result = original(trained_model, merged_dir)
            found["check"] = {k: result[k] for k in ("ok", "tensors", "adapted", "max_abs_diff", "mismatched_tensors")}
            found["check"]["mismatches"] = result["mismatches"][:3]
            found.update(diagnose(trained_model, Path(merged_dir), base))
            return result

        merge_check.check_merged_weights = wrapped
        spec = load_spec(ROOT / "examples" / "tiny.yaml")
        spec.model.name_or_path, spec.model.backend = str(base), args.backend
        spec.train.max_steps, spec.train.save_steps = args.steps, args.steps
        spec.export.gguf = False
        spec.model.compute_dtype = args.compute_dtype
        result = run_job(spec, tmp / "run")
        line = {"variant": variant, "backend": result.backend, "seconds": round(time.monotonic() - t0, 1), **found}
        text = json.dumps(line, default=str)
        print(text, flush=True)
        if out:
            out.write(text + "\n")
            out.flush()
    merge_check.check_merged_weights = original


if __name__ == "__main__":
    main()
