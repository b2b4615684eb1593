"""Helpers shared by the export tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

EVAL_ROWS = 6  # held-out conversations in the session workdir
FIDELITY: dict[str, float] = {}
"""Measured numbers (max |logit diff|, top-1 agreement), printed at the end of the session (pytest -s)."""


class Events(list):
    """``emit`` for tests: records each event as a dict."""

    def __call__(self, message, *, level="info", type="message", **data):
        self.append({"message": message, "level": level, "type": type, **data})


def perturb_adapter(model, seed: int = 1) -> None:
    """Make a fresh LoRA/DoRA adapter non-trivial: B is zero and the DoRA magnitude equals the
    weight norm at init, so without this the merge would be the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
            elif "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()
