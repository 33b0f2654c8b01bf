"""Run under ``torchrun --nproc_per_node=2`` by ``test_distributed_stages.py``: the run directory's checkpoint is
visible to rank 0 only (rank 1 plays a node without shared storage), and ``--resume`` must stop both ranks
with the same error naming the checkpoint. Each rank prints ``RANK <r> ERROR <message>``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_helpers import CountingTask, fast_config, tiny_gpt  # noqa: E402

from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.train import distributed  # noqa: E402
from chatforge.train.loop import train  # noqa: E402

out_dir = Path(sys.argv[1])
ranks = distributed.init("cpu")
if ranks.rank == 1:  # this rank's "disk" has no run directory
    real_exists = Path.exists
    Path.exists = lambda self: False if str(self).startswith(str(out_dir)) else real_exists(self)
# one write per line: both ranks share the pipe, and print's separate write of the newline let two lines run
# together ("...nodeRANK 1 ERROR ...") when the ranks finished at the same moment
try:
    train(tiny_gpt(), CountingTask(8), fast_config(steps=4), out_dir, resume=True)
    sys.stdout.write(f"RANK {ranks.rank} FINISHED\n")
except ChatforgeError as exc:
    sys.stdout.write(f"RANK {ranks.rank} ERROR {exc}\n")
sys.stdout.flush()
