"""The tiny models of tests/diagnostics (imported, so pytest sees the fixtures here too)."""
from tests.conftest import SMOLLM_GGUF  # noqa: F401  (the real model, for the slow check)
from tests.diagnostics.conftest import f32_gguf, hf_folder, q4k_gguf  # noqa: F401
