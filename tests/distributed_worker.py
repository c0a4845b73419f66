"""Run under torchrun by tests/test_distributed.py: trains each (recipe, overrides) of a JSON file in
turn, in one process group (so the 2-process tests pay for one launch, not one per method)."""

import json
import sys

from onepoch.distributed import stop
from onepoch.runconfig import load_config
from onepoch.train import train

if __name__ == "__main__":
    for recipe, overrides in json.loads(open(sys.argv[1], encoding="utf-8").read()):
        train(load_config(recipe, overrides), progress_bar=False)
    stop()  # leave the process group before exit (see onepoch.distributed.stop)
