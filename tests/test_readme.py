"""What the README shows runs as written."""

import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_quick_example_runs_and_prints_what_it_says():
    code = re.search(r"```python\n(import torchvision, se_surgery.*?)```", README, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ResNet SE_5_2" in out and "28,088,024" in out and "25,557,032" in out


def test_surgery_cli_output_in_readme_is_current():
    shown = re.search(r"\$ python -m se_surgery.summary resnet50\n(.*?)```", README, re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-m", "se_surgery.summary", "resnet50"], capture_output=True, text=True, check=True
    ).stdout
    assert shown.strip() == out.strip()
