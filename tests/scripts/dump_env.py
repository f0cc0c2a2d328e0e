"""Write this worker's environment (minus the caller's) as JSON to $OUT_DIR/env-<rank>.json."""

import json
import os
import sys
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
base = set(os.environ.get("BASE_KEYS", "").split(","))
env = {k: v for k, v in os.environ.items() if k not in base}
env["__argv__"] = json.dumps(sys.argv[1:])
env["__name__"] = __name__
env["__sys_path0__"] = sys.path[0]
(out / f"env-{os.environ['RANK']}.json").write_text(json.dumps(env, sort_keys=True))
