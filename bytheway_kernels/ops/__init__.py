"""The package's ops, one folder each, every backend under the same name in each folder:

- `attention_probs/`: the map op (scores -> ByTheWay probabilities), `torch.ops.bytheway.attention_probs`;
- `temporal_attention/`: fused temporal attention (q, k, v -> out with ByTheWay inside),
  `torch.ops.bytheway.temporal_attention`.

In each: `op.py` (registration, dispatch, public function), `reference.py` (pure torch ground
truth), `triton.py` (GPU kernels), `cpp.py` (CPU kernel from `csrc/`) where it exists.
"""

from .dispatch import BACKEND_ENV, BACKENDS, select_backend

__all__ = ["BACKEND_ENV", "BACKENDS", "select_backend"]
