import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py

# The prompt cache is on by default: keep the suite's entries (and its subprocesses') out of the user's cache.
import os
import tempfile

os.environ["PYLLM_PROMPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="pyllm-test-prompt-cache-")

MODELS = Path(__file__).resolve().parent.parent / "models"


def real_model(file_name: str) -> Path:
    """A pulled real model, or skip the test (CI pulls them; a developer may not have)."""
    import os

    for d in (Path(os.environ.get("PYLLM_MODELS", MODELS)), MODELS):
        p = d / file_name
        if p.exists():
            return p
    pytest.skip(f"{file_name} not pulled (run `pyllm pull`)")


@pytest.fixture(scope="session")
def smollm2():
    return real_model("SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def gemma3():
    return real_model("gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="session")
def qwen25():
    return real_model("qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf")
