"""The sharding planner without the console script: ``lightning-mtr plan`` by another name.

    python tools/plan.py --config conf/plan/large_ads.yaml --world-size 64 --devices-per-node 8 \\
        --hbm-gb 80 --ddr-gb 512 [--out runs/plan]   (from the repo root)
"""

from __future__ import annotations

import sys

from lightning_mtr.training.distributed.plan_tool import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
