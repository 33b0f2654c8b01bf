"""chatforge: a complete ChatGPT-style system, from raw text to a chat service."""

import os

# On CPUs with AMX (Intel Sapphire Rapids and later) oneDNN's AMX bf16 matmul kernels sum in an order that
# depends on the number of rows, so a bf16 decode row's tokens changed with the rest of the batch (measured:
# tests/test_fast_decode.py's bf16 batch test fails there, passes with this cap). Capping oneDNN at AVX-512 bf16
# keeps a seeded request's output independent of the batch, as on CPUs without AMX. oneDNN reads this when it
# first runs a kernel, so it is set on import, before any; a value set by the user wins.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")

__version__ = "0.1.0"
