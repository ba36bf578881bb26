"""Ray job entrypoint for the dense-versus-MoE study: the same as `raymoe compare`.

    ray job submit --working-dir . -- python jobs/compare.py jobs/configs/study-reference.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working_dir

from raymoe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:], "--address", "auto"]))
