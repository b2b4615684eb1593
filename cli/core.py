"""Local commands around trinity_core: ``tiny-model`` and ``train``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trinity_core.errors import TrinityError


def add_parsers(sub) -> None:
    p = sub.add_parser("tiny-model", help="write the tiny random Gemma-3 + offline tokenizer to DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multimodal", action="store_true",
                   help="a Gemma3ForConditionalGeneration (vision tower + projector + processor) in the layout "
                        "of google/gemma-3-12b-it")
    p.add_argument("--prequantized", "--quantized", action="store_true", dest="prequantized",
                   help="with --multimodal: pre-quantised bitsandbytes NF4, like unsloth/gemma-3-12b-it-bnb-4bit")
    p.add_argument("--text-shape", choices=("tiny", "12b"), default="tiny", help="with --multimodal")
    p.add_argument("--vision-shape", choices=("tiny", "siglip-so400m"), default="tiny", help="with --multimodal")
    p.add_argument("--layers", type=int, default=None, help="text layers (default: the shape's)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision layers (default: the shape's)")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB: a sharded checkpoint with an index")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("train", help="run a job spec locally: train, export, report")
    p.add_argument("spec", type=Path, help="YAML or JSON job spec")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="print events as JSON lines")
    p.add_argument("--no-fast-dora", action="store_true", help="PEFT's own DoRA instead of Trinity's fast DoRA")
    p.add_argument("--no-lean-attention", action="store_true",
                   help="on the T4 path keep Unsloth's Gemma-3 attention (faster, ~0.38 GiB more at seq 4096)")
    p.add_argument("--unsloth-compile", choices=("auto", "on", "off"), default="auto",
                   help="Unsloth's torch.compile mode (auto: off where Trinity's compiled layers run the job (LoRA on a bf16 GPU) and with DoRA, on otherwise)")
    p.add_argument("--no-compiled-layers", action="store_true",
                   help="with fast DoRA on a bf16 GPU, run the decoder layers eagerly (no compile at the first step)")
    p.add_argument("--debug-memory", action="store_true",
                   help="after a failed OOM-ladder attempt, print what still holds CUDA memory")
    p.add_argument("--mlflow-uri", default=None, metavar="URI",
                   help="also log the job to MLflow (http://host:5000, file:///path/mlruns); needs the tracking extra")
    p.set_defaults(func=cmd_train)


def cmd_tiny_model(args) -> int:
    if args.multimodal:
        from trinity_core.fixtures.tiny_multimodal import build_multimodal_model

        path = build_multimodal_model(args.dir, quantized=args.prequantized, text_shape=args.text_shape,
                                      vision_shape=args.vision_shape, num_hidden_layers=args.layers,
                                      vision_layers=args.vision_layers, seed=args.seed,
                                      max_shard_size=args.max_shard_size)
        kind = "pre-quantised 4-bit" if args.prequantized else "16-bit"
        print(f"Gemma3ForConditionalGeneration ({kind}, text {args.text_shape}, vision {args.vision_shape}) "
              f"written to {path}")
        return 0
    if args.prequantized or args.text_shape != "tiny" or args.vision_shape != "tiny" or args.vision_layers:
        print("error: --prequantized, --text-shape, --vision-shape and --vision-layers need --multimodal",
              file=sys.stderr)
        return 2
    from trinity_core.fixtures.tiny import build_tiny_model

    kwargs = {} if args.layers is None else {"num_hidden_layers": args.layers}
    path = build_tiny_model(args.dir, seed=args.seed, max_shard_size=args.max_shard_size, **kwargs)
    print(f"tiny Gemma-3 written to {path}")
    return 0


class ProgressPrinter:
    """A one-line progress bar on a terminal; plain lines otherwise (logs, CI, pipes)."""

    def __init__(self, stream=sys.stderr, as_json: bool = False):
        self.stream = stream
        self.tty = stream.isatty() and not as_json
        self.as_json = as_json

    def __call__(self, event) -> None:
        if self.as_json:
            print(json.dumps(event.to_dict()), file=self.stream, flush=True)
            return
        d = event.data
        if event.type == "metrics" and self.tty:
            step, total = d.get("step", 0), d.get("total_steps") or 1
            filled = int(30 * step / total)
            eta = f" eta {d['eta_s']:.0f}s" if d.get("eta_s") is not None else ""
            line = f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{total} loss {d['loss']:.4f}{eta}"
            print(line, end="", file=self.stream, flush=True)
            if step >= total:
                print(file=self.stream)
            return
        prefix = {"warning": "WARNING ", "error": "ERROR "}.get(event.level, "")
        end = "\n"
        if self.tty:
            print("\r\033[K", end="", file=self.stream)
        print(f"{prefix}{event.message}", end=end, file=self.stream, flush=True)


def cmd_train(args) -> int:
    from trinity_core.options import RunOptions
    from trinity_core.pipeline import run_job
    from trinity_core.spec import load_spec

    options = RunOptions(fast_dora=not args.no_fast_dora, lean_attention=not args.no_lean_attention,
                         debug_memory=args.debug_memory,
                         unsloth_compile={"auto": None, "on": True, "off": False}[args.unsloth_compile],
                         compiled_layers=not args.no_compiled_layers, mlflow_tracking_uri=args.mlflow_uri)
    try:
        spec = load_spec(args.spec)
        result = run_job(spec, args.workdir, ProgressPrinter(as_json=args.json), options=options)
    except TrinityError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        for d in e.details if isinstance(e.details, list) else []:
            print(f"  - {json.dumps(d)}", file=sys.stderr)
        return 1
    losses = [h["loss"] for h in result.loss_history]
    print(f"status: {result.status}")
    print(f"rung: {result.final_rung}  settings: {json.dumps(result.final_settings)}")
    if losses:
        print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f} over {result.global_step} steps "
              f"({result.train_seconds:.1f}s)")
    if result.eval_history:
        print("eval loss: " + ", ".join(f"{h['eval_loss']:.4f} (step {h['step']})" for h in result.eval_history))
    if result.early_stopping:
        print(f"stopped early at step {result.early_stopping['step']}: {result.early_stopping['why']}")
    if result.checkpoint:
        print(f"exported: step {result.checkpoint['step']} ({result.checkpoint['checkpoint']}): {result.checkpoint['why']}")
    if result.report.get("verdict"):
        from trinity_core.evaluate.verdict import headline

        print("verdict: " + headline(result.report["verdict"])[0].replace("**", ""))
    if result.tracking.get("mlflow_run_id"):
        print(f"mlflow run: {result.tracking['mlflow_run_id']} (experiment {result.tracking['mlflow_experiment_id']})")
    print(f"workdir: {args.workdir}")
    return 0
