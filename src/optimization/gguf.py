"""GGUF DiT weights: keep quantized weights packed, dequantize per layer.

Files are read by :mod:`src.models.gguf_reader` and ggml blocks decoded by :mod:`src.models.gguf_codecs`
(file-format facts, with the other checkpoint readers).  Quantized tensors stay as raw ggml blocks
(:class:`GGUFWeight`) and a :class:`GGUFLinear` dequantizes its weight just before each matmul, on the
weight's device, so the model is never dequantized as a whole.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping
import weakref

import gguf
import torch
import torch.nn.functional as F
from torch import nn

from .linear_quantization import COMPUTE_DTYPES, QuantizationReport

# Reading and decoding GGUF files lives with the other checkpoint readers; these names stay importable here.
from ..models.gguf_codecs import DEQUANTIZERS, PLAIN_TYPES, dequantize, packed_size  # noqa: E402
from ..models.gguf_reader import (  # noqa: E402
    COMFY_PREFIX, ORIG_SHAPE_KEY, GGUFError, GGUFWeight, load_gguf_state_dict, plain_types,
)


# ------------------------------------------------------------------------------------------- the layer
class DequantizedWeightCache:
    """The most recently dequantized weights, up to ``max_bytes``, least recently used dropped first.

    Meant to stay small: it helps when one layer runs several times in a row (the 3B's shared ``all``
    blocks apply the same Linear to the video and then the text tokens); a model-sized cache would
    defeat the point of GGUF.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, tuple[weakref.ref, tuple, torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def get(self, layer: GGUFLinear, dtype: torch.dtype) -> torch.Tensor:
        """``layer``'s weight in ``dtype``, dequantized now or reused."""
        # The storage pointer and device change when the layer is reloaded or moved: a stale entry never matches.
        version = (layer.weight.data_ptr(), layer.weight.device, dtype)
        entry = self._entries.get(id(layer))
        if entry is not None and entry[0]() is layer and entry[1] == version:
            self._entries.move_to_end(id(layer))
            return entry[2]
        weight = dequantize(layer.weight, layer.qtype, (layer.out_features, layer.in_features), dtype)
        self._drop(id(layer))
        if weight.nbytes <= self.max_bytes:
            self._entries[id(layer)] = (weakref.ref(layer), version, weight)
            self._bytes += weight.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        return weight

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[2].nbytes

    def clear(self) -> None:
        """Forget every cached weight."""
        self._entries.clear()
        self._bytes = 0


class GGUFLinear(nn.Module):
    """``nn.Linear`` whose weight stays in ggml blocks (``weight``: flat uint8) and is dequantized to
    ``compute_dtype`` just before each matmul; load it with a :class:`GGUFWeight` of its ``qtype``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        qtype: gguf.GGMLQuantizationType,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        cache: DequantizedWeightCache | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if qtype not in DEQUANTIZERS:
            raise GGUFError(f"GGUF type {getattr(qtype, 'name', qtype)} is not supported; supported: "
                            f"{_supported_list()}.")
        self.in_features, self.out_features = in_features, out_features
        self.qtype = qtype
        self.compute_dtype = compute_dtype
        self.cache = cache
        self.weight = nn.Parameter(
            torch.empty(packed_size(qtype, in_features * out_features), dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
            if bias else None
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(out, in)`` weight in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self.cache is not None:
            return self.cache.get(self, dtype)
        return dequantize(self.weight, self.qtype, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        if weight is not None:
            if not isinstance(weight, GGUFWeight):
                raise GGUFError(f"{prefix}weight: a GGUF layer loads the packed weight from a .gguf file, "
                                f"got a plain {getattr(weight, 'dtype', type(weight).__name__)} tensor.")
            if weight.qtype != self.qtype or tuple(weight.shape) != (self.out_features, self.in_features):
                raise GGUFError(
                    f"{prefix}weight: the layer expects {self.qtype.name} {(self.out_features, self.in_features)}, "
                    f"the file holds {weight.qtype.name} {tuple(weight.shape)}."
                )
            state_dict[prefix + "weight"] = weight.data
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor):
            state_dict[prefix + "bias"] = bias.to(self.compute_dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"qtype={self.qtype.name}, compute_dtype={self.compute_dtype}")


def prepare_model_for_gguf(
    model: nn.Module,
    gguf_state: Mapping[str, torch.Tensor | GGUFWeight],
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    cache_bytes: int = 0,
) -> QuantizationReport:
    """Swap every ``nn.Linear`` whose weight is quantized in ``gguf_state`` for a :class:`GGUFLinear`
    (call on the ``meta`` model before ``load_state_dict(gguf_state, assign=True)``).

    ``cache_bytes`` > 0 shares one :class:`DequantizedWeightCache` of that size between the layers.
    ``key in report`` is True for the packed weights, which must reach the model untouched.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise GGUFError(f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}, got {compute_dtype}.")
    cache = DequantizedWeightCache(cache_bytes) if cache_bytes > 0 else None
    report = QuantizationReport("gguf", "gguf")
    for name, module in list(model.named_modules()):
        weight = gguf_state.get(f"{name}.weight")
        if not name or not isinstance(module, nn.Linear) or not isinstance(weight, GGUFWeight):
            continue
        if tuple(weight.shape) != (module.out_features, module.in_features):
            raise GGUFError(
                f"{name}.weight has shape {tuple(weight.shape)} in the GGUF file but the model expects "
                f"{(module.out_features, module.in_features)}: the file belongs to another model."
            )
        layer = GGUFLinear(module.in_features, module.out_features, module.bias is not None, weight.qtype,
                           compute_dtype=compute_dtype, cache=cache, device=module.weight.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        report.add(name, module, layer, f"gguf {weight.qtype.name}", compute_dtype)
    leftover = [key for key, value in gguf_state.items() if isinstance(value, GGUFWeight) and key not in report]
    if leftover:
        raise GGUFError(
            f"{len(leftover)} quantized GGUF tensors belong to no Linear layer of the model (first: {leftover[0]}); "
            f"only Linear weights may be quantized. Re-convert the file keeping other tensors in F16/F32."
        )
    return report
