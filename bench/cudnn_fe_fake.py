"""cudnn-frontend's SDPA ops without a GPU: that ``import cudnn.sdpa.fwd.torch_op`` works (the cuDNN library it
finds) and what the forward and backward return at the 12B attention shape under ``FakeTensorMode`` (shapes, strides,
dtypes: what torch.compile plans the layers' graphs with). Needs Python 3.12 with torch (a CUDA build, for its cuDNN
library) and the wheel of ``bench/gpu_cudnn_fe.sh``, e.g.:

    python3.12 -m venv /tmp/py312 && /tmp/py312/bin/pip install torch==2.13.0 numpy .gpu-cudnn/*.whl --no-deps
    /tmp/py312/bin/python bench/cudnn_fe_fake.py
"""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import cudnn
import cudnn.sdpa.fwd.torch_op  # noqa: F401  (registers torch.ops.cudnn.sdpa_fwd / sdpa_bwd)

print(f"# torch {torch.__version__}, cuDNN {cudnn.backend_version_string()}, cuda available: {torch.cuda.is_available()}")
with FakeTensorMode(shape_env=ShapeEnv()):
    def bhsd(heads):  # (batch, seq, heads, dim) memory seen as (batch, heads, seq, dim), as transformers passes it
        return torch.empty(1, 4096, heads, 256, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    q, k, v, dout = bhsd(16), bhsd(8), bhsd(8), bhsd(16)
    o, lse = torch.ops.cudnn.sdpa_fwd(q, k, v, 256 ** -0.5, is_causal=True, window_left=1024, return_lse=True)
    print("forward: o", tuple(o.shape), o.stride(), o.dtype, "| lse", tuple(lse.shape), lse.dtype,
          "| o.transpose(1, 2) contiguous:", o.transpose(1, 2).is_contiguous())
    dq, dk, dv = torch.ops.cudnn.sdpa_bwd(dout, q, k, v, o, lse, 256 ** -0.5, is_causal=True, window_left=1024)
    print("backward: dq", tuple(dq.shape), dq.stride(), "| dk", tuple(dk.shape), dk.stride(), "| dv", tuple(dv.shape))
