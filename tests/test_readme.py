"""The README's usage example runs exactly as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_block() -> str:
    text = README.read_text()
    section = text.split("## Use", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_usage_example_runs_as_written(tmp_path):
    script = tmp_path / "usage.py"
    script.write_text(_usage_block())
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("torch.Size([8, 1, 16, 16]) [10, 10, 10, 10, 10, 10, 10, 10] 10")
    # StepDrop per sample: NFE counted per sample, mean near the budget
    nfe = [int(v) for v in re.search(r"\[(.*?)\]", lines[1]).group(1).split(",")]
    assert len(nfe) == 8 and all(n >= 1 for n in nfe)
