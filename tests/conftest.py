import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SD pipeline folder, built once per test session."""
    from tiny_sd import save_tiny_pipeline

    out = str(tmp_path_factory.mktemp("tiny_model"))
    save_tiny_pipeline(out)
    return out
