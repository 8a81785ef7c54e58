"""Installing puzzle must not make transformers believe Hugging Face's `kernels` hub package is present.

`kernels/` and `scoring/` are top-level folders of the repository but install as `puzzle.kernels`
and `puzzle.scoring` (pyproject's package-dir mapping), so nothing named `kernels` or `scoring`
lands in site-packages. These checks run in a fresh interpreter from a neutral working directory,
as a user's program would.
"""

import subprocess
import sys

PROBE = """
import importlib.util, json
import transformers
from transformers.utils import import_utils
import puzzle.kernels, puzzle.scoring
print(json.dumps({
    "kernels_spec": importlib.util.find_spec("kernels") is not None,
    "scoring_spec": importlib.util.find_spec("scoring") is not None,
    "hub_kernels_available": bool(import_utils.is_kernels_available()),
    "puzzle_kernels": puzzle.kernels.__name__,
}))
"""


def test_nothing_named_kernels_is_importable_and_transformers_sees_no_kernel_hub(tmp_path):
    import json

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"kernels_spec": False, "scoring_spec": False, "hub_kernels_available": False,
                     "puzzle_kernels": "puzzle.kernels"}


def test_gguf_loading_still_works_next_to_our_kernels(tmp_path):
    """transformers' own GGUF path (used for the default parent) must work with puzzle installed."""
    import importlib.util

    assert importlib.util.find_spec("gguf") is not None
    from transformers.utils import import_utils

    assert import_utils.is_gguf_available()
