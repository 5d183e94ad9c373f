"""Regenerate tests/data/golden.cllm (only on purpose: a change to the format or the converter's output)."""

import sys
import tempfile
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root / "tests"))
import golden  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    golden.build(Path(tmp) / "src", root / "tests" / "data" / "golden.cllm")
print("wrote", root / "tests" / "data" / "golden.cllm")
