import copy, torch
from trinity_core.train.compiled_layers import compile_decoder_layers

def test_diag(tiny_spec, monkeypatch):
    from trinity_core.train.backends.peft import PeftBackend
    from trinity_core.train.fast_dora import lora_in_gemm
    spec = tiny_spec.model_copy(deep=True)
    spec.lora.use_dora = False
    spec.model.attention = "sdpa"
    model, _ = PeftBackend().load(spec)
    import bitsandbytes as bnb
    for n, p in model.named_parameters():
        if "lora_" not in n and p.dtype == torch.float32 and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.to(torch.bfloat16)
    for m in model.modules():
        st = getattr(getattr(m, "weight", None), "quant_state", None)
        if st is not None:
            st.dtype = torch.bfloat16
            if hasattr(m, "compute_dtype"): m.compute_dtype = torch.bfloat16
    for m in model.modules():
        st = getattr(getattr(m, "weight", None), "quant_state", None)
        if st is not None:
            print("quant dtype", st.dtype, getattr(m, "compute_dtype", None)); break
    print("attn", model.config._attn_implementation if hasattr(model.config, "_attn_implementation") else None)
    for n, p in model.named_parameters():
        if "lora_" in n: print(n, p.dtype); break
    import os
    for enabled in ((os.environ.get('DIAG_EN')=='1'),):
        monkeypatch.setattr(lora_in_gemm, "LORA_ENABLED", enabled)
        fast = copy.deepcopy(model)
        def backend(gm, ex):
            for node in gm.graph.nodes:
                t = str(node.target)
                if node.op == "call_function" and any(k in t for k in ("attention", "sdpa", "flex", "apply", "linear")):
                    args = [a.meta.get("example_value") for a in node.args if isinstance(a, torch.fx.Node)]
                    print(enabled, t[:60], [(tuple(a.shape), a.dtype, a.stride()) for a in args if isinstance(a, torch.Tensor)][:3])
            return gm.forward
        torch._dynamo.reset()
        compile_decoder_layers(fast, backend='inductor')
        fast.train()
        ids = torch.randint(7, fast.config.vocab_size if hasattr(fast.config,'vocab_size') else 100, (1, 16))
        with torch.autocast("cpu", torch.bfloat16):
            fast(input_ids=ids, labels=ids).loss.backward()
