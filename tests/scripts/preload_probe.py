"""Which of its imports a worker found already loaded when the script began (--preload auto)."""

import gc
import sys

PROBED = ("tensorboardX", "sklearn.datasets", "sibling_helper", "torch._dynamo")
LOADED_AT_START = sorted(name for name in PROBED if name in sys.modules)
FROZEN_AT_START = gc.get_freeze_count()

import json  # noqa: E402 - the probe above must run before these imports
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import sibling_helper  # noqa: E402,F401 - the script's own module: never preloaded
import tensorboardX  # noqa: E402,F401 - installed: preloaded by --preload auto

import distrain.data.datasets  # noqa: E402,F401 - names sklearn.datasets in DISTRAIN_PRELOAD

distrain_env = sorted(k for k in os.environ if k.startswith("DISTRAIN"))
Path(os.environ["OUT_DIR"], f"probe-{os.environ['RANK']}.json").write_text(
    json.dumps({"loaded": LOADED_AT_START, "frozen": FROZEN_AT_START, "env": distrain_env}))
