"""Ray job entrypoint for training: the same as `raymoe train`, on the job's cluster.

    ray job submit --working-dir . -- python jobs/pretrain.py jobs/configs/gpt-1.3b-moe128.yaml \
        data.path=s3://bucket/prepared train.storage=s3://bucket/runs
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working_dir

from raymoe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:], "--address", "auto"]))
