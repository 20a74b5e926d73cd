"""torch-fidelity's ``fidelity`` command with stepdrop's offline Inception registered:
``python -m stepdrop.fidelity --fid --kid --input1 samples/ddim-25 --input2 real/``.

torch-fidelity downloads its Inception weights on first use; offline, this runs the same
command with ``--feature-extractor inception-v3-tfscript`` (the same TF weights, shipped as
TorchScript, :mod:`stepdrop.metrics`) unless the arguments name an extractor or the
downloaded weights are cached. Every other argument is torch-fidelity's own.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from stepdrop import metrics

    metrics._require_fidelity()
    metrics._make_tfscript_class()  # registers inception-v3-tfscript with torch-fidelity
    args = list(sys.argv[1:] if argv is None else argv)
    if "--feature-extractor" not in args and not any(a.startswith("--feature-extractor=") for a in args):
        args += ["--feature-extractor", metrics.default_extractor()]
    from torch_fidelity.fidelity import main as fidelity_main

    sys.argv = ["fidelity", *args]
    fidelity_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
