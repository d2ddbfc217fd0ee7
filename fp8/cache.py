"""FP8 caches that outlive one call (TR §3.3.3): each weight's FP8 copy, and what both caches cost.

Weights. A weight changes once per optimizer step but is read by the Fprop and Dgrad of every
micro-batch, so quantizing it per call (and again in every backward) repeats the same work 2 x n_micro
times. Fp8WeightCache keeps one module's (q, s) per weight, keyed on the weight's identity and its
version counter (`tensor._version`, bumped by every in-place write autograd sees: optimizer steps under
no_grad, load_state_dict, nn.init). The first forward after a step re-quantizes; every other forward and
backward until the next step reuses it. No data_ptr: the key is valid under fake tensors (the dry run).
A writer that bypasses the counter (`p.data.copy_`, or writing a buffer the parameter is a `.data` view
of) must call `torch.autograd.graph.increment_version(p)` afterwards, or the cache serves stale codes.

Activations. With Fp8Config.cache_fp8_activations, a Linear keeps its input as the 1 x 128 E4M3 tiles
Fprop made (1 byte per element + one FP32 scale per 128) instead of BF16 (2) or FP32 (4).

The pricing functions below are torch-free, for `moeforge plan`.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Sequence


def weight_cache_bytes(out_features: int, in_features: int, block: int = 128) -> int:
    """Bytes of one weight's cached FP8 copy: 1 per element + an FP32 scale per block x block block."""
    return out_features * in_features + 4 * math.ceil(out_features / block) * math.ceil(in_features / block)


def act_cache_bytes_per_element(block: int = 128) -> float:
    """Bytes per element of an activation cached as 1 x block E4M3 tiles (1 + 4 / block)."""
    return 1 + 4 / block


class Fp8WeightCache:
    """One module's FP8 weight copies: get(slot, weights, make) returns make()'s result, recomputed only when
    a weight in `weights` is another object, or was written in place, or changed dtype/device/shape.

    Not saved (not a buffer), not copied (deepcopy and pickle give an empty cache). Under inference mode it
    neither stores nor serves (an inference tensor cannot be saved for a later backward)."""

    def __init__(self) -> None:
        self._entries: dict = {}  # slot -> (keys, value)

    @staticmethod
    def _key(w) -> tuple:
        return (w._version, w.dtype, w.device, tuple(w.shape))

    def get(self, slot, weights: Sequence, make: Callable[[], tuple]) -> tuple:
        import torch

        if torch.is_inference_mode_enabled() or any(w.is_inference() for w in weights):
            return make()
        hit = self._entries.get(slot)
        if hit is not None:
            refs, keys, value = hit
            if len(refs) == len(weights) and all(r() is w for r, w in zip(refs, weights)) and \
                    all(k == self._key(w) for k, w in zip(keys, weights)):
                return value
        value = make()
        self._entries[slot] = ([weakref.ref(w) for w in weights], [self._key(w) for w in weights], value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        """Bytes held now (every cached tensor owns its storage: q and s are never views of each other)."""
        return sum(t.untyped_storage().nbytes() for _, _, value in self._entries.values() for t in value)

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "Fp8WeightCache":
        return Fp8WeightCache()

    def __getstate__(self) -> dict:
        return {"_entries": {}}

    def __repr__(self) -> str:
        return f"Fp8WeightCache({len(self._entries)} entries)"
