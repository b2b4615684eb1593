"""What the API's routing (api/routing.py) decides for the recipe spec and two heavier variants,
with a T4 class and an A100 class: the figures in docs/API.md "Scale-out". Offline (the recipe's
model config is shipped). Run: .venv/bin/python bench/routing_cases.py > bench/results/<date>-routing-cases.jsonl"""

from __future__ import annotations

import json

from api import routing
from api.errors import ApiError
from trinity_core.spec import parse_spec
from trinity_service.settings import Settings

SETTINGS = Settings(gpu_queues="gpu.t4,gpu.a100", queue_gpu_gib="gpu.t4=15.1,gpu.a100=79:bf16")
CASES = {
    "recipe": {},
    "recipe, batch 4": {"train": {"batch_size": 4}},
    "recipe, seq 16384, batch 8": {"model": {"max_seq_length": 16384}, "train": {"batch_size": 8}},
    "recipe, seq 65536, batch 2": {"model": {"max_seq_length": 65536}, "train": {"batch_size": 2}},
    "recipe, seq 32768, batch 16, a ladder without seq_2048": {
        "model": {"max_seq_length": 32768}, "train": {"batch_size": 16},
        "ladder": {"rungs": ["r_32", "dora_off", "targets_qv"]}},
}

for case, body in CASES.items():
    spec = parse_spec({**body, "data": {"hub": "org/data"}})
    try:
        queue, why = routing.route(spec, None, SETTINGS)
        print(json.dumps({"case": case, "queue": queue, "routing": why}))
    except ApiError as refused:
        print(json.dumps({"case": case, "status": refused.status, "code": refused.code,
                          "message": refused.message}))
