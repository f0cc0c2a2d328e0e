"""Run one rank of a Python-API function under the Ray launcher: ``python -m distrain.launchers.ray_fn
PAYLOAD RESULT``.

``PAYLOAD`` holds the launcher's ``sys.path`` and the pickled ``(fn, args)``; the return value is
pickled to ``RESULT``. The function runs through the local launcher's ``run_function`` so the
process group is torn down before interpreter exit (no gloo teardown abort).
"""

from __future__ import annotations

import os
import pickle
import sys


def main(argv: list[str]) -> int:
    payload_path, result_path = argv
    with open(payload_path, "rb") as f:
        launcher_path, call = pickle.load(f)
    # The function's module must import here as it did in the launcher (multiprocessing's
    # spawn does the same): add the launcher's path entries that exist on this node.
    sys.path.extend(p for p in launcher_path if p not in sys.path and os.path.isdir(p))
    fn, args = pickle.loads(call)
    from distrain.launchers.local import run_function

    value = run_function(fn, *args)
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(value, f)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
