"""Decoder layers compiled as one region each with fast DoRA inside (trinity_core.train.compiled_layers), on
the real 4-bit tiny Gemma-3 with gradient checkpointing: traced without a graph break (``aot_eager``: Dynamo's
trace and AOTAutograd's split, which inductor lowers on a GPU), the same losses and gradients as the eager
model from the same weights, step after step (optimizer steps and copies make the DoRA norms stale; the
sequence length changes), to fp32 rounding (the traced norm backward sums its two gradient paths in another
order; without the compiled norms it was bit for bit), and the layer's own forward outside training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from trinity_core.train.compiled_kernels import install_compiled_norms
from trinity_core.train import compiled_layers
from trinity_core.train.compiled_layers import compile_decoder_layers, layer_kind
from trinity_core.train.fast_dora.linear import FastDoraLinearLayer


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("down_in_graph", [False, True], ids=["two_nodes", "down_in_graph"])
def test_compiled_layers_train_as_the_eager_model(tiny_spec, down_in_graph, monkeypatch):
    """With ``down_in_graph`` the defaults (the MLP's activation and down_proj one node, the adapters' products
    inside the base GEMMs: ``fast_dora/lora_in_gemm``); without, the arrangement before either."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.utils import counters
    from torch._functorch.aot_autograd import aot_module_simplified

    from trinity_core.train.backends.peft import PeftBackend
    from trinity_core.train.fast_dora import lora_in_gemm, mlp

    monkeypatch.setattr(mlp, "DOWN_IN_GRAPH", down_in_graph)  # the MLP's activation and down_proj: one node or two
    monkeypatch.setattr(lora_in_gemm, "ENABLED", down_in_graph)  # the adapter's product in the base GEMM or not
    eager, _ = PeftBackend().load(tiny_spec)
    assert any(isinstance(m, FastDoraLinearLayer) for m in eager.modules())
    with torch.no_grad():  # non-zero B, as after some training: the DoRA norms then depend on it
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(5))
    fast = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    # the compiled norms too, as the Unsloth backend installs them: inside a region they must inline (a call to
    # the cached compiled function broke the graph at every norm, 9 breaks on this model, until 2026-11-29)
    assert install_compiled_norms(fast, backend="aot_eager") == 6 * 4 + 6 * 2 + 1
    layers = [m for m in fast.modules() if type(m).__name__ == "Gemma3DecoderLayer"]
    # the regions' own graphs counted: on CPUs where bitsandbytes' native kernel misreads rows the CPU path
    # dequantises through bitsandbytes' torch.compile'd function (nf4.read_rows_flat_on_cpu), once per
    # weight shape, and those graphs count in Dynamo's global counters too (10 on such a machine, 2026-11-29)
    scalars: list[torch.Tensor] = []
    opaque: set[str] = set()
    kernels: set[str] = set()
    frames: list[int] = []
    tails: list[str] = []  # dequantised weights written with the adapter's s·B beside them (lora_in_gemm)

    def record(graph, _):  # AOTAutograd's forward and backward graphs, run as they are (aot_eager)
        opaque.update(str(n.target) for n in graph.graph.nodes if n.op == "call_function" and any(
            lib in str(n.target) for lib in ("bitsandbytes", "trinity.gated_act", "trinity.scale_and_reduce")))
        return make_boxed_func(graph.forward)

    def backend(gm, example_inputs):  # a Python float (eps, LoRA scaling) traced as an input: a 0-dim float64 tensor
        scalars.extend(t for t in example_inputs if isinstance(t, torch.Tensor) and t.dtype == torch.float64)
        frames.append(1)
        kernels.update(str(n.target).split(".")[1] for sub in gm.modules() if isinstance(sub, torch.fx.GraphModule)
                       for n in sub.graph.nodes if str(n.target).startswith("trinity."))
        tails.extend(str(n) for n in gm.graph.nodes if str(n.target).startswith("trinity.nf4_dequantize")
                     and len(n.args) > 11 and n.args[11] is not None)
        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    assert compile_decoder_layers(fast, backend=backend) == len(layers) == 6
    assert compile_decoder_layers(fast, backend=backend) == 0, "already compiled"
    assert all(len(layer._forward_pre_hooks) == 1 for layer in layers), "fast DoRA's norms refreshed before each"
    eager.train(), fast.train()
    opt_eager, opt_fast = torch.optim.SGD(_trainable(eager), lr=0.5), torch.optim.SGD(_trainable(fast), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for step, seq in enumerate((16, 17, 23)):
        with torch.no_grad():  # from the same weights each step (fp32 rounding would otherwise compound at lr 0.5);
            for a, b in zip(_trainable(eager), _trainable(fast)):  # the in-place copy makes the norms stale too
                b.copy_(a)
        ids = torch.randint(7, eager.config.vocab_size, (1, seq), generator=gen)
        losses = []
        for model in (eager, fast):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0), f"step {step}: {losses}"
        for a, b in zip(_trainable(eager), _trainable(fast)):
            err = ((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)).item()
            assert err < 1e-5, f"step {step}: {err:.2e}"
        opt_eager.step(), opt_fast.step()
        opt_eager.zero_grad(), opt_fast.zero_grad()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not scalars, "floats are the graphs' constants (on a GPU inductor compiled C++ CPU kernels for them)"
    # no opaque op that the compiled graph would launch through its Python dispatch (host-bound on the GPU):
    # bitsandbytes' gemm_4bit and dequantize_4bit, fast DoRA's custom ops; fast DoRA's arithmetic is graph
    # operations for inductor to fuse, and the frozen weights are dequantised by a triton_op, whose kernel inductor
    # launches from its own code
    assert not opaque, opaque
    # the triton ops, whose kernels inductor launches from its code: the frozen NF4 projections dequantised, and the
    # MLP's gated activation forward and backward (mlp.REGION_KERNELS; on the CPU their torch fallbacks run), the
    # backward, with down_proj's adapter's part of h's gradient inside where the two are one node
    # (mlp.GatedActDownInGraph)
    backward = "gated_act_down_kernel_backward" if down_in_graph else "gated_act_kernel_backward"
    assert kernels == {"nf4_dequantize", "gated_act_kernel", backward}, kernels
    # q, k, v, o, gate and up (out > in / 2; not down_proj) of each kind of layer's graph
    assert (len(tails) >= 6) if down_in_graph else not tails, tails
    # sliding and global layers, grad on/off: not one graph per layer or length
    assert 0 < len(frames) <= 8, len(frames)
    kinds = {layer._trinity_kind for layer in layers}
    assert len(kinds) == len({layer_kind(layer) for layer in layers}) == len({layer.self_attn.sliding_window for layer in layers}) == 2, "sliding and global"
    assert not layers[0]._trinity_region_state.guarded, "one compile a kind, module guards dropped"
    assert all("forward" in n.__dict__ for n in fast.modules() if type(n).__name__ == "Gemma3RMSNorm")

    fast.eval(), eager.eval()
    ids = torch.randint(7, eager.config.vocab_size, (1, 9), generator=gen)

    def not_in_eval(*args, **kwargs):
        raise AssertionError("evaluation must run the layers' own forward")

    layers[0]._trinity_region_state.forward_of = lambda layer, *_: not_in_eval
    with torch.no_grad():
        for a, b in zip(_trainable(eager), _trainable(fast)):
            b.copy_(a)
        assert torch.equal(fast(input_ids=ids).logits, eager(input_ids=ids).logits)


@pytest.mark.parametrize("failure", ["compiler error", "oom"])
def test_a_failed_compile_leaves_the_layers_eager(tiny_spec, failure):
    """The regions are an optimisation: a compiler that raises (here the backend itself) turns them off for the
    whole model after one try, with a warning naming the error, and the step trains as the eager model does; a
    CUDA OOM while compiling reaches the OOM ladder as an OOM."""
    from trinity_core.train.backends.peft import PeftBackend

    eager, _ = PeftBackend().load(tiny_spec)
    fast = copy.deepcopy(eager)
    tries = []

    def failing(gm, example_inputs):
        tries.append(len(example_inputs))
        if failure == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        raise RuntimeError("lowering failed (injected)")

    torch._dynamo.reset()
    assert compile_decoder_layers(fast, backend=failing) == 6
    eager.train(), fast.train()
    ids = torch.randint(7, eager.config.vocab_size, (1, 19), generator=torch.Generator().manual_seed(3))
    if failure == "oom":
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            fast(input_ids=ids, labels=ids)
        return
    with pytest.warns(UserWarning, match=r"layers run eagerly \(RuntimeError: lowering failed \(injected\)\)"):
        loss = fast(input_ids=ids, labels=ids).loss
    loss.backward()
    want = eager(input_ids=ids, labels=ids).loss
    want.backward()
    assert torch.equal(loss, want)
    for a, b in zip(_trainable(eager), _trainable(fast)):
        assert torch.equal(a.grad, b.grad)
    assert len(tries) == 1, "one try for the whole model"
    fast(input_ids=ids, labels=ids).loss.backward()
    assert len(tries) == 1


def _one_step(eager, fast, ids):
    """One training forward and backward of both models: the same loss and gradients (to fp32 rounding)."""
    for model in (eager, fast):
        for p in _trainable(model):
            p.grad = None
    losses = []
    for model in (eager, fast):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-6, atol=0), losses
    for a, b in zip(_trainable(eager), _trainable(fast)):
        err = ((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)).item()
        assert err < 1e-5, f"{err:.2e}"
    return losses[1]


def _nonzero_b(model, seed=5):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))


def test_layer_kind_ignores_the_layer_index_and_tells_sliding_from_global(tiny_spec):
    from trinity_core.train.backends.peft import PeftBackend

    model, _ = PeftBackend().load(tiny_spec)
    layers = [m for m in model.modules() if type(m).__name__ == "Gemma3DecoderLayer"]
    kinds = [layer_kind(layer) for layer in layers]
    sliding = [layer.self_attn.is_sliding for layer in layers]
    assert sliding.count(True) == 5 and sliding.count(False) == 1
    for i, layer in enumerate(layers):
        for j in range(len(layers)):
            assert (kinds[i] == kinds[j]) == (sliding[i] == sliding[j]), (i, j)
    hash(kinds[0])
    layers[0].self_attn.scaling = 0.5  # an attribute the graph reads as a constant: another kind
    assert layer_kind(layers[0]) != kinds[1]
    layers[1].mlp.up_proj.scaling["default"] = 2.0  # a LoRA scaling: another kind
    assert layer_kind(layers[1]) != kinds[2]


def test_regions_check_the_adapter_state_that_dropped_guards_would_have(tiny_spec):
    """With Dynamo's module guards dropped, a training-mode call with the adapters disabled (PEFT's
    ``disable_adapter()``) must not run the graph traced with them: the layers run their own forward then, and
    the compiled graphs again once the adapters are back."""
    from trinity_core.train.backends.peft import PeftBackend

    eager, _ = PeftBackend().load(tiny_spec)
    _nonzero_b(eager)
    fast = copy.deepcopy(eager)
    torch._dynamo.reset()
    compile_decoder_layers(fast, backend="eager")
    eager.train(), fast.train()
    ids = torch.randint(7, eager.config.vocab_size, (1, 18), generator=torch.Generator().manual_seed(4))
    with_adapters = _one_step(eager, fast, ids)
    with eager.disable_adapter(), fast.disable_adapter():
        without = _one_step(eager, fast, ids)
    assert not torch.equal(with_adapters, without), "the adapters change the loss"
    assert torch.equal(_one_step(eager, fast, ids), with_adapters)


def test_two_models_do_not_share_compiled_graphs(tiny_spec):
    """Each model's layers get their own copies of the forward (Dynamo's graphs live on the code object): a second
    model with another rank, compiled in the same process (the OOM ladder's next rung), traces its own graphs
    rather than running the first model's, which the dropped guards on its modules would no longer catch."""
    from trinity_core.train.backends.peft import PeftBackend

    torch._dynamo.reset()
    ids = torch.randint(7, 300, (1, 17), generator=torch.Generator().manual_seed(6))
    for rank in (8, 4):
        spec = tiny_spec.model_copy(deep=True)
        spec.lora.r = rank
        eager, _ = PeftBackend().load(spec)
        _nonzero_b(eager, seed=rank)
        fast = copy.deepcopy(eager)
        compile_decoder_layers(fast, backend="eager")
        eager.train(), fast.train()
        _one_step(eager, fast, ids)
        assert next(p for n, p in fast.named_parameters() if "lora_A" in n).shape[0] == rank


def test_a_graph_break_falls_back_to_every_guard(tiny_spec):
    """The kinds' compiles are fullgraph: with a graph break Dynamo would compile a nested frame on its shared code
    object under the reduced guards. A graph break (here one injected in an MLP) turns the model's layers to one
    compile with every guard, with a warning, and the step trains as the eager model does."""
    from trinity_core.train.backends.peft import PeftBackend

    eager, _ = PeftBackend().load(tiny_spec)
    fast = copy.deepcopy(eager)
    mlp = next(m for m in fast.modules() if type(m).__name__ == "Gemma3MLP")
    own = mlp.forward

    def breaking(x):
        torch._dynamo.graph_break()
        return own(x)

    mlp.forward = breaking
    torch._dynamo.reset()
    compile_decoder_layers(fast, backend="eager")
    eager.train(), fast.train()
    ids = torch.randint(7, eager.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    with pytest.warns(UserWarning, match="graph break"):
        _one_step(eager, fast, ids)
    state = mlp._trinity_region_state if hasattr(mlp, "_trinity_region_state") else next(
        m for m in fast.modules() if hasattr(m, "_trinity_region_state"))._trinity_region_state
    assert state.guarded and state.classes
    _one_step(eager, fast, ids)


def test_too_many_kinds_share_one_guarded_compile(tiny_spec, monkeypatch):
    from trinity_core.train.backends.peft import PeftBackend

    monkeypatch.setattr(compiled_layers, "MAX_KINDS", 1)
    eager, _ = PeftBackend().load(tiny_spec)
    fast = copy.deepcopy(eager)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="more than 1 kinds"):
        compile_decoder_layers(fast, backend="eager")
    eager.train(), fast.train()
    ids = torch.randint(7, eager.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(8))
    _one_step(eager, fast, ids)
    state = next(m for m in fast.modules() if hasattr(m, "_trinity_region_state"))._trinity_region_state
    assert state.guarded and len(state.classes) == 1


def test_a_lora_job_s_mlp_traces_where_its_class_forward_is_compile_disabled(tiny_spec, monkeypatch):
    """Unsloth replaces Gemma-3's MLP forward by one under ``torch.compiler.disable`` (a graph break in every region,
    and with the per-kind fullgraph compiles the fallback to every guard). Inside the regions a LoRA job's gated
    MLPs run :func:`gated_mlp_forward` instead: one graph a kind, the eager model's loss and gradients."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

    from trinity_core.train.backends.peft import PeftBackend

    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = False
    eager, _ = PeftBackend().load(spec)
    assert not any(isinstance(m, FastDoraLinearLayer) for m in eager.modules())
    _nonzero_b(eager)
    fast = copy.deepcopy(eager)
    monkeypatch.setattr(Gemma3MLP, "forward", torch.compiler.disable(Gemma3MLP.forward))  # as Unsloth's is
    torch._dynamo.reset()
    compile_decoder_layers(fast, backend="eager")
    eager.train(), fast.train()
    ids = torch.randint(7, eager.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _one_step(eager, fast, ids)
    assert not [w for w in caught if "compiled decoder layers" in str(w.message)], "no fallback"
    state = next(m for m in fast.modules() if hasattr(m, "_trinity_region_state"))._trinity_region_state
    assert not state.guarded and len(state.kinds) == 2


def test_a_lora_job_s_adapters_inside_the_base_gemms_train_as_the_eager_model(tiny_spec, monkeypatch):
    """``lora_in_gemm.LORA_ENABLED``: a LoRA job's projections (all but down_proj) as ``[x | A x]·[W | s·B]ᵀ`` inside
    the regions, the dequantised weights written beside their tails: the eager model's loss and gradients (fp32
    rounding), two steps with an optimizer step between; with ``LORA_PROJECTIONS`` (the default: gate, up and
    o_proj) only those projections' weights get tails; off, no tail in any graph."""
    from trinity_core.train.backends.peft import PeftBackend
    from trinity_core.train.fast_dora import lora_in_gemm

    assert lora_in_gemm.LORA_ENABLED and lora_in_gemm.LORA_PROJECTIONS == {"gate_proj", "up_proj", "o_proj"}, \
        "the defaults measured in call 38 (docs/BENCHMARKS.md)"
    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = False
    start, _ = PeftBackend().load(spec)
    _nonzero_b(start)
    shapes = {}  # the projections' (out, in) on this model
    for name, module in start.named_modules():
        if hasattr(module, "lora_A") and ".layers.0." in name:
            shapes[name.rsplit(".", 1)[-1]] = tuple(module.get_base_layer().weight.quant_state.shape)
    counted = {}
    for enabled, projections in ((True, None), (True, frozenset({"gate_proj", "o_proj"})), (False, None)):
        monkeypatch.setattr(lora_in_gemm, "LORA_ENABLED", enabled)
        monkeypatch.setattr(lora_in_gemm, "LORA_PROJECTIONS", projections)
        eager = copy.deepcopy(start)  # each arrangement from the same weights
        fast = copy.deepcopy(start)
        tails: list[int] = []  # the output width of each weight dequantised with a tail

        def backend(gm, example_inputs):
            for n in gm.graph.nodes:
                if str(n.target).startswith("trinity.nf4_dequantize") and len(n.args) > 11 and n.args[11] is not None:
                    tails.append(n.args[11].meta["example_value"].shape[0])
            return gm.forward

        torch._dynamo.reset()
        compile_decoder_layers(fast, backend=backend)
        eager.train(), fast.train()
        opt_eager, opt_fast = torch.optim.SGD(_trainable(eager), lr=0.5), torch.optim.SGD(_trainable(fast), lr=0.5)
        for seq in (16, 19):
            ids = torch.randint(7, eager.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
            _one_step(eager, fast, ids)
            opt_eager.step(), opt_fast.step()
            with torch.no_grad():  # from the same weights again (lr 0.5 would compound fp32 rounding)
                for a, b in zip(_trainable(eager), _trainable(fast)):
                    b.copy_(a)
        counted[enabled, projections] = tails
    every, chosen, off = (counted[True, None], counted[True, frozenset({"gate_proj", "o_proj"})],
                          counted[False, None])
    assert len(every) >= 6, every  # the projections with out > in / 2, over each kind's graphs
    eligible = {p for p, (out, n_in) in shapes.items() if 2 * out > n_in}
    assert {"gate_proj", "o_proj"} <= eligible, shapes
    assert chosen and set(chosen) == {shapes["gate_proj"][0], shapes["o_proj"][0]}, (chosen, shapes)
    assert len(chosen) < len(every)
    assert not off  # off: no tail


def _graph_facts(block: int, graphs: list):
    """A Dynamo backend recording, per graph, whether its length is known to fill whole blocks of ``block`` tokens
    and the ``IS_DIVISIBLE`` kernel option of each flex-attention call in it."""
    import sympy
    from torch._guards import TracingContext
    from torch._inductor.sizevars import statically_known_true
    from torch.utils._sympy.functions import Mod

    def backend(gm, example_inputs):
        shape_env = TracingContext.get().fake_mode.shape_env
        hidden = next(n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"
                      and isinstance(n.meta.get("example_value"), torch.Tensor) and n.meta["example_value"].dim() == 3)
        tokens = hidden.shape[-2]
        assert isinstance(tokens, torch.SymInt), "the length stays symbolic in both compiles"
        flex = [n for n in gm.graph.nodes if n.op == "call_function" and "flex_attention" in str(n.target)]
        options = [next((a for a in n.args if isinstance(a, dict) and "BACKEND" in a), {}).get("IS_DIVISIBLE")
                   for n in flex]
        graphs.append((statically_known_true(shape_env, sympy.Eq(Mod(tokens.node.expr, block), 0)), options))
        return gm.forward

    return backend


def test_lengths_in_whole_blocks_run_a_compile_that_knows_it(tiny_spec, monkeypatch):
    """With ``WHOLE_BLOCKS`` (the default) a call whose sequence length is a multiple of ``TOKEN_BLOCK`` runs its
    kind's second compile, which states it to Dynamo (``torch._check``), for the first such length; other lengths
    the general one. Neither recompiles by length, and both train as the eager model."""
    from trinity_core.train.backends.peft import PeftBackend

    monkeypatch.setattr(compiled_layers, "WHOLE_BLOCKS", True)
    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = False
    eager, _ = PeftBackend().load(spec)
    _nonzero_b(eager)
    fast = copy.deepcopy(eager)
    block = compiled_layers.TOKEN_BLOCK
    graphs: list[tuple[bool, list]] = []
    torch._dynamo.reset()
    compile_decoder_layers(fast, backend=_graph_facts(block, graphs))
    eager.train(), fast.train()
    for seq in (19, block, 23, 2 * block):
        ids = torch.randint(7, eager.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
        _one_step(eager, fast, ids)
    state = next(m for m in fast.modules() if hasattr(m, "_trinity_region_state"))._trinity_region_state
    assert len(state.kinds) == len(state.whole_blocks) == 2, "sliding and global, each: general and whole blocks"
    assert [known for known, _ in graphs].count(True) == [known for known, _ in graphs].count(False) == 2, graphs
    # the whole-block compile serves the first such length only (fast DoRA's would compile again for another)
    assert set(state.block_length.values()) == {block}
    layer = next(m for m in fast.modules() if hasattr(m, "_trinity_kind"))
    assert not layer._forward_pre_hooks, "a LoRA job's layers have no DoRA norms to refresh"
    assert state.forward_of(layer, block) is state.whole_blocks[layer._trinity_kind]
    assert state.forward_of(layer, 2 * block) is state.forward_of(layer, None) is state.kinds[layer._trinity_kind]


def test_whole_blocks_tell_flex_attention_it_needs_no_bounds_checks(tiny_spec, monkeypatch):
    """The whole-block compile's flex-attention calls carry ``kernel_options={"IS_DIVISIBLE": True}`` (through
    transformers' flex attention, as on the GPU; the general compile's do not). Forward only: flex attention has no
    backward on the CPU. With ``WHOLE_BLOCKS`` off (the A/B's other row): no whole-block compile."""
    from trinity_core.train.backends.peft import PeftBackend

    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = False
    spec.model.attention = "flex_attention"
    start, _ = PeftBackend().load(spec)
    assert start.config._attn_implementation == "flex_attention"
    block = compiled_layers.TOKEN_BLOCK
    seen = {}
    for switch in (False, True):
        monkeypatch.setattr(compiled_layers, "WHOLE_BLOCKS", switch)
        model, graphs = copy.deepcopy(start), []
        torch._dynamo.reset()
        compile_decoder_layers(model, backend=_graph_facts(block, graphs))
        model.train()
        with torch.no_grad():
            for seq in (block, 23):
                ids = torch.randint(7, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(seq))
                model(input_ids=ids, labels=ids)
        seen[switch] = graphs
    assert not any(known for known, _ in seen[False]), seen[False]
    flex_off = [o for _, options in seen[False] for o in options]
    assert flex_off and not any(o is True for o in flex_off), seen[False]
    whole = [options for known, options in seen[True] if known]
    general = [options for known, options in seen[True] if not known]
    assert whole and general, seen[True]
    assert all(options and all(o is True for o in options) for options in whole), whole
    assert all(options and not any(o is True for o in options) for options in general), general


@pytest.mark.parametrize("dora", [True, False], ids=["fast_dora", "lora"])
def test_the_multimodal_checkpoint_compiles_its_text_layers_only(tiny_spec, tmp_path, dora):
    """The published checkpoint's layout (Gemma3ForConditionalGeneration, pre-quantised 4-bit, SigLIP tower and
    projector): the language model's 6 Gemma3DecoderLayers compile, nothing of the vision tower or projector is
    touched, and two training steps (text rows, as a text fine-tune's) give the eager model's losses and gradients.
    On a GPU the same with inductor: ``tests/gpu/test_unsloth_multimodal.py``."""
    from trinity_core.fixtures.tiny_multimodal import build_multimodal_model
    from trinity_core.train.backends.peft import PeftBackend

    spec = tiny_spec.model_copy(deep=True)
    spec.model.name_or_path = str(build_multimodal_model(tmp_path / "mm", quantized=True))
    spec.lora.use_dora = dora
    start, _ = PeftBackend().load(spec)
    assert type(start.get_base_model()).__name__ == "Gemma3ForConditionalGeneration"
    _nonzero_b(start)
    eager, fast = copy.deepcopy(start), copy.deepcopy(start)
    vision_forwards = {name: dict(m.__dict__).get("forward") for name, m in fast.named_modules()
                       if "vision_tower" in name or "multi_modal_projector" in name}
    torch._dynamo.reset()
    graphs: list[int] = []

    def backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    assert compile_decoder_layers(fast, backend=backend) == 6
    layers = [m for m in fast.modules() if type(m).__name__ == "Gemma3DecoderLayer"]
    assert len(layers) == 6 and all("language_model" in n for n, m in fast.named_modules() if m in layers)
    assert vision_forwards and all(dict(m.__dict__).get("forward") is vision_forwards[name]
                                   for name, m in fast.named_modules() if name in vision_forwards)
    assert sum(isinstance(d, FastDoraLinearLayer) for m in layers for m2 in m._trinity_lora_modules
               for d in m2.lora_magnitude_vector.values()) == (42 if dora else 0)
    eager.train(), fast.train()
    for seq in (16, 21):
        ids = torch.randint(7, 200, (1, seq), generator=torch.Generator().manual_seed(seq))
        _one_step(eager, fast, ids)
    assert graphs, "the regions ran"
