"""Host-resource pre-flight: disk and RAM of the export (trinity_core/export/resources.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trinity_core import model_config
from trinity_core.export import resources
from trinity_core.errors import ExportResourcesError
from trinity_core.spec import JobSpec

GEMMA_12B = "unsloth/gemma-3-12b-it-bnb-4bit"
TB = 10**12


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def meta_numel(config_data: dict) -> int:
    """Parameters of the model transformers builds from this config (meta device: no memory)."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**{k: v for k, v in config_data.items() if k != "quantization_config"})
    cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())  # a tied lm_head counted once, as it is stored


def test_12b_shipped_config_numbers():
    resolved = model_config.resolve(GEMMA_12B)
    config = model_config.load(GEMMA_12B)
    est = resources.estimate(config, JobSpec(), dtype_bytes=resources.dtype_bytes(resolved.data), eval_tokens=512)
    params = sum(t.numel for t in resources.text_tensors(config) + resources.vision_tensors(config))
    # the tensor list counts what transformers builds: text model, SigLIP tower, projector, embeddings
    assert params == meta_numel(resolved.data)
    assert 24.2e9 < est.disk["merged"] < 24.6e9  # 2 bytes x 12.19B parameters
    assert 23.3e9 < est.disk["gguf_f16"] < 23.8e9  # the text model alone (11.77B) in f16
    assert 0.29 < est.disk["gguf_q4_k_m"] / est.disk["gguf_f16"] < 0.33  # ~4.96 bits/weight incl. Q6_K embedding
    assert 0.8e9 < est.disk["mmproj"] < 0.9e9  # 0.42B vision + projector in f16
    assert est.peak_stage == "quantize_q4_k_m"  # the f32 copy of the 262k x 3840 token embedding
    assert max(est.ram.values()) < 8e9  # the goal, at 512 held-out tokens


def test_q4_k_m_types_follow_llama_cpp():
    config = model_config.load(GEMMA_12B)
    text = resources.text_tensors(config)
    kinds = {(t.kind, t.layer): resources.gguf_type(t, "q4_k_m", 48) for t in text}
    assert kinds[("token_embd", -1)] == "Q6_K"  # tied embedding: the output tensor's type
    assert kinds[("attn_v", 0)] == "Q6_K" and kinds[("attn_v", 6)] == "Q4_K" and kinds[("attn_v", 8)] == "Q6_K"
    assert kinds[("ffn_down", 47)] == "Q6_K" and kinds[("attn_q", 0)] == "Q4_K"
    odd = resources.Tensor("x", 64, 96, "text", "attn_q", 3)  # 96 columns: no K-quant
    assert resources.gguf_type(odd, "q4_k_m", 48) == "Q5_0"


def test_estimate_matches_tiny_export(trained_run, tiny_model_dir):
    result, workdir, _ = trained_run
    spec = JobSpec.model_validate(result.resolved_spec)
    resolved = model_config.resolve(str(tiny_model_dir))
    tokenizer = sum((tiny_model_dir / f).stat().st_size for f in resources.TOKENIZER_FILES
                    if (tiny_model_dir / f).is_file())
    est = resources.estimate(resolved.data, spec, dtype_bytes=resources.dtype_bytes(resolved.data),
                             tokenizer_bytes=tokenizer)
    actual = {"merged": du(workdir / "merged"), "adapter": du(workdir / "adapter"),
              "gguf_f16": (workdir / "gguf" / "model-f16.gguf").stat().st_size,
              "gguf_q4_k_m": (workdir / "gguf" / "model-q4_k_m.gguf").stat().st_size,
              # the newest checkpoint, times the number alive at once (save_total_limit + one being written
              # + the best evaluated step kept for export)
              "checkpoints": max(du(p) for p in (workdir / "checkpoints").glob("step-*"))
              * (spec.train.save_total_limit + 1 + resources.kept_best_checkpoint(spec))}
    for part, size in actual.items():
        print(part, size, est.disk[part], est.disk[part] / size)
    assert result.resources["estimate"]["disk"]  # recorded in result.json by run_job
    for part, size in actual.items():
        # checkpoints: the tiny optimizer state is mostly per-tensor overhead (OPTIM_TENSOR_BYTES), hence 1.15
        assert size <= est.disk[part] <= size * (1.15 if part == "checkpoints" else 1.10), (part, size, est.disk[part])


def test_job_refused_before_training_when_disk_is_short(tiny_spec, tmp_path):
    from trinity_core.pipeline import run_job

    events = []
    short = resources.HostFree(disk=10**6, ram=TB, where=str(tmp_path), ram_from="test")
    with pytest.raises(ExportResourcesError) as info:
        run_job(tiny_spec, tmp_path, events.append, host_free=short)
    error = info.value
    assert error.code == "insufficient_disk"
    assert "0.00 GB free" in error.message and "export.gguf false" in error.message and str(tmp_path) in error.message
    assert error.details["estimate"]["disk_total"] > 10**6
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "progress.json").exists()
    assert not any(e.data.get("stage") == "train" for e in events)


def test_insufficient_memory_names_the_stage_and_switch(tmp_path):
    config = model_config.load(GEMMA_12B)
    small = resources.HostFree(disk=TB, ram=4 * 10**9, where=str(tmp_path), ram_from="test")
    with pytest.raises(ExportResourcesError) as info:
        resources.check(JobSpec(), tmp_path, config=config, free=small, eval_tokens=512)
    assert info.value.code == "insufficient_memory"
    assert "quantize_q4_k_m" in info.value.message and "export.gguf false" in info.value.message
    est, _ = resources.check(JobSpec(), tmp_path, config=config, eval_tokens=512,
                             free=resources.HostFree(disk=TB, ram=16 * 10**9))
    assert est.disk_total > 55e9


def test_host_free_reads_this_machine(tmp_path):
    free = resources.host_free(tmp_path)
    assert 0 < free.disk and 0 < free.ram < resources._meminfo_available() + 1


def _cgroup(root, path, limit, used, cache=None):
    d = root / path.strip("/")
    d.mkdir(parents=True, exist_ok=True)
    (d / "memory.max").write_text(f"{limit}\n")
    (d / "memory.current").write_text(f"{used}\n")
    if cache is not None:
        (d / "memory.stat").write_text(f"anon {used - cache}\nfile {cache}\nkernel 1000\n")


def test_cgroup_ram_left_reads_the_process_own_cgroup_and_those_above(tmp_path):
    """A process moved into a sub-cgroup (the GPU run's 8e9-byte /trinity8g) is limited there, not
    at the root; a parent's limit counts when it is tighter."""
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    root.mkdir()
    proc.write_text("0::/jobs/trinity8g\n")
    _cgroup(root, "/jobs/trinity8g", 8_000_000_000, 3_000_000_000)
    assert resources.cgroup_ram_left(root, proc) == (5_000_000_000, "cgroup /jobs/trinity8g memory.max - memory.current")
    _cgroup(root, "/jobs", 6_000_000_000, 4_000_000_000)  # the parent leaves less
    assert resources.cgroup_ram_left(root, proc) == (2_000_000_000, "cgroup /jobs memory.max - memory.current")
    (root / "jobs" / "memory.max").write_text("max\n")  # no limit there: the child's counts
    assert resources.cgroup_ram_left(root, proc)[0] == 5_000_000_000
    # page cache is charged but reclaimable: after writing GGUF files it fills the limit
    _cgroup(root, "/jobs/trinity8g", 8_000_000_000, 8_000_000_000, cache=6_500_000_000)
    assert resources.cgroup_ram_left(root, proc)[0] == 6_500_000_000


def test_cgroup_ram_left_without_limits(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    (root / "a").mkdir(parents=True)
    proc.write_text("0::/a\n")
    assert resources.cgroup_ram_left(root, proc) is None
    proc.write_text("")  # cgroup v1 or unreadable: the root's own files, none here
    assert resources.cgroup_ram_left(root, proc) is None
    _cgroup(root, "/", 1_000, 400)  # a container sees its own cgroup at the root
    assert resources.cgroup_ram_left(root, proc) == (600, "cgroup / memory.max - memory.current")
