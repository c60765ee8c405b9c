"""The names a user can pick for the optimization switches, in a module that imports nothing heavy.

The command line lists and checks these before torch is imported (``--help`` stays instant).  The modules
that implement the switches use these tuples, or are tested to register exactly these names
(``matrix_ops`` registers a kernel per attention name).
"""
from __future__ import annotations

# Every name matrix_ops.attention_backend() accepts, in its registration order: "auto", the backends, and
# the aliases the earlier node pack used (flash_attn = flash_attn_2, sageattn = sageattn_2,
# sageattn_3_fp4 = sageattn_3).
ATTENTION_MODES = (
    "auto", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "sdpa_chunked", "matmul_chunked",
    "triton_wide", "flex", "flash_attn_2", "flash_attn", "flash_attn_3", "xformers", "sageattn_2", "sageattn",
    "sageattn_3", "sageattn_3_fp4", "sageattn_3_fp8",
)

# The DiT's quantization modes (fp4_quantization and gguf implement them).
QUANTIZATION_MODES = ("disabled", "fp8_e4m3fn", "fp4_experimental", "fp4_scaled", "fp4_scaled_fast", "gguf")
