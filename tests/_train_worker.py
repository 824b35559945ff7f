"""Train in a separate process, one second per step, so a test can kill it part-way (see test_checkpoint.py).

usage: python tests/_train_worker.py '<TrainConfig as JSON>' [seconds per step]
"""

import json
import sys
import time

import nbkit.data.images
from nbkit import TrainConfig, train


def main() -> None:
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    batch_indices = nbkit.data.images.batch_indices

    def slow(*args, **kwargs):  # the maths is untouched: only the pace changes
        time.sleep(delay)
        return batch_indices(*args, **kwargs)

    nbkit.data.images.batch_indices = slow
    train(cfg, progress=False)


if __name__ == "__main__":
    main()
