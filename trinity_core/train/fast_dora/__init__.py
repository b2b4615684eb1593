"""Fast DoRA: PEFT's DoRA layers with a factored weight norm refreshed in the optimizer step
(``linear``) and a fused gated MLP (``mlp``); PEFT's names and adapter file format are kept."""
