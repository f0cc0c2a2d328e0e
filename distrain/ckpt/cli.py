"""``distrain ckpt``: list, inspect, verify and export checkpoints, no training code needed.

::

    distrain ckpt ls runs/x/ckpt                      # step, time, size, kind, valid?
    distrain ckpt inspect runs/x/ckpt/step-00001200   # metadata, objects, tensor shapes/dtypes
    distrain ckpt verify runs/x/ckpt                  # every checkpoint; exit 1 naming a bad file
    distrain ckpt export runs/x/ckpt --out model.pt   # bare model weights (a plain state dict)
    distrain ckpt consolidate runs/x/ckpt --out model.pt  # the same; says it for sharded checkpoints

A PATH may be one checkpoint directory or a root holding ``step-*`` directories (``inspect`` and
``export`` then take the newest valid one). Exit codes: 0 fine, 1 a checkpoint failed
verification or could not be read safely, 2 bad input. Every command reads only the manifest,
JSON and ``torch.load(weights_only=True)``: inspecting an untrusted checkpoint runs no code.

Each subcommand is one row of :data:`COMMANDS` (arguments + handler). Every command reads both
kinds of checkpoint, told apart by the manifest's ``kind``: ``"full"`` (rank 0 wrote ``.pt``
files) and ``"sharded"`` (every rank wrote its shard through ``torch.distributed.checkpoint``;
read with :mod:`distrain.ckpt.dcp_io`, which unpickles nothing but DCP's own metadata classes).
``consolidate`` (an alias of ``export``) assembles whole tensors from the shards with no process
group, and writes one plain state dict.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distrain.ckpt.objstore import ObjectStore, open_store
from distrain.ckpt.store import (
    MANIFEST,
    CheckpointError,
    CheckpointPath,
    CheckpointStore,
    Verification,
    read_manifest,
    verify,
)
from distrain.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, OneLineParser

EXIT_BAD_CHECKPOINT = EXIT_FAILED
MAX_TENSOR_LINES = 60


class UsageError(Exception):
    """Bad input on the command line: printed as one line, exit 2."""


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GB"


def _is_checkpoint(path: CheckpointPath) -> bool:
    return (path / MANIFEST).is_file()


def _store(path: CheckpointPath) -> CheckpointStore | ObjectStore:
    """The store of root ``path`` (a directory, or a URL read through ``path``'s connection)."""
    return CheckpointStore(path) if isinstance(path, Path) else ObjectStore(path.url, remote=path.remote)


def _read_once(path: CheckpointPath) -> contextlib.AbstractContextManager[None]:
    """Objects under ``path`` that are verified and then read (all but DCP shards, which are only
    verified) downloaded once, not once per reader."""
    if isinstance(path, Path):
        return contextlib.nullcontext()
    from distrain.ckpt.dcp_names import SHARD_SUFFIX

    return path.remote.read_once(lambda url: not url.endswith(SHARD_SUFFIX))


def _existing_dir(text: str) -> CheckpointPath:
    """``text`` (a path or a URL such as s3://bucket/run) if something is there."""
    path = open_store(text).root
    if not path.exists():
        what = "file or directory" if isinstance(path, Path) else "object or prefix"
        raise UsageError(f"{text}: no such {what}")
    return path


def _checked(path: CheckpointPath, text: str) -> Verification:
    """Checkpoint directory ``path`` verified, or the newest valid checkpoint under root ``path``
    (verified once: its verification is returned)."""
    return verify(path) if _is_checkpoint(path) else _newest_valid(path, text)


def _newest_valid(path: CheckpointPath, text: str) -> Verification:
    store = _store(path)
    if not path.is_dir() or not store.checkpoints():
        raise UsageError(f"{text}: expected a checkpoint directory (with {MANIFEST}) or a root "
                         "holding step-* checkpoints")
    found = store.newest_valid()
    if found is None:
        raise CheckpointError(f"{text}: no checkpoint under it verifies (see distrain ckpt verify)")
    return found


def _total_size(manifest: dict[str, Any]) -> int:
    return sum(int(r.get("size", 0)) for r in manifest.get("files", {}).values())


# -- ls ------------------------------------------------------------------------------------


def _ls_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a checkpoint root")
    parser.add_argument("--quick", action="store_true", help="check sizes only, not digests")


def _ls(args: argparse.Namespace) -> int:
    root = _existing_dir(args.dir)
    store = _store(root)
    found = store.checkpoints()
    if not found:
        print(f"no checkpoints under {root}")
        return 0
    checked = [(step, path, verify(path, hashes=not args.quick)) for step, path in found]
    # The star marks what load_latest would load: the newest checkpoint that verifies.
    latest = next((path.name for _, path, result in reversed(checked) if result.ok), None)
    rows = [("", "step", "time", "size", "kind", "world", "valid")]
    for step, path, result in checked:
        manifest = result.manifest or {}
        rows.append((
            "*" if path.name == latest else "", str(step), str(manifest.get("time", "?")),
            _size(_total_size(manifest)) if manifest else "?", str(manifest.get("kind", "?")),
            str(manifest.get("world_size", "?")),
            "yes" if result.ok else "NO: " + "; ".join(result.problems),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


# -- inspect -------------------------------------------------------------------------------


def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint directory, a root (newest valid), or a .pt file")


def _tensor_lines(prefix: str, value: Any, out: list[tuple[str, str, int]]) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        shape = "x".join(str(d) for d in value.shape) or "scalar"
        out.append((prefix, f"{shape} {str(value.dtype).replace('torch.', '')}", value.numel()))
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensor_lines(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _tensor_lines(f"{prefix}[{index}]", item, out)


def _describe_state(state: Any, *, module: bool) -> list[str]:
    found: list[tuple[str, str, int]] = []
    _tensor_lines("", state, found)
    lines = []
    if module:
        lines.append(f"    parameters: {sum(n for _, _, n in found):,} in {len(found)} tensors")
    elif isinstance(state, dict):
        lines.append(f"    keys: {', '.join(str(k) for k in state)}")
        lines.append(f"    tensors: {len(found)} ({sum(n for _, _, n in found):,} elements)")
    shown = found if module else found[:8]
    width = max((len(name) for name, _, _ in shown[:MAX_TENSOR_LINES]), default=0)
    for name, desc, _ in shown[:MAX_TENSOR_LINES]:
        lines.append(f"      {name.ljust(width)}  {desc}")
    if len(found) > min(len(shown), MAX_TENSOR_LINES):
        lines.append(f"      ... {len(found) - min(len(shown), MAX_TENSOR_LINES)} more tensors")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from distrain.ckpt.state import safe_load

    target = _existing_dir(args.path)
    if target.is_file():
        state = safe_load(target, map_location="cpu")
        print(f"{target} ({_size(target.stat().st_size)})")
        print("\n".join(_describe_state(state, module=_is_flat_tensors(state))))
        return 0
    with _read_once(target):
        return _inspect_checkpoint(_checked(target, args.path))


def _inspect_checkpoint(result: Verification) -> int:
    from distrain.ckpt.state import safe_load

    path = result.path
    manifest = result.manifest or read_manifest(path)
    print(f"checkpoint {path}")
    for key in ("kind", "step", "world_size", "time", "hostname", "torch", "distrain", "python"):
        print(f"  {key}: {manifest.get(key, '?')}")
    print(f"  files: {len(manifest.get('files', {}))}, {_size(_total_size(manifest))}")
    print(f"  valid: {'yes' if result.ok else 'NO: ' + '; '.join(result.problems)}")
    described = {}
    if manifest.get("kind") == "sharded":
        from distrain.ckpt.dcp_io import describe, read_metadata, shard_names

        shards = shard_names(manifest)
        print(f"  shards: {len(shards)} ({', '.join(shards)}), written by {manifest.get('world_size')} "
              "ranks; loads on any number of ranks")
        if not result.ok:  # the metadata is only unpickled (safely) from a verified checkpoint
            return EXIT_BAD_CHECKPOINT
        described = describe(read_metadata(path, shards))
    import json

    values = json.loads((path / "extra.json").read_text())
    print("  objects:")
    for name, record in manifest.get("objects", {}).items():
        where = "shards" if record.get("storage") == "dcp" else record["file"]
        print(f"  - {name}: {record['type']} {record['class']} ({where})")
        if record["type"] == "json":
            text = json.dumps(values.get(name))
            print(f"    value: {text if len(text) <= 200 else text[:200] + ' ...'}")
        elif record.get("storage") == "dcp":
            print("\n".join(_describe_sharded(described.get(name, []), module=record["type"] == "module")))
        else:
            state = safe_load(path / record["file"], map_location="cpu")
            print("\n".join(_describe_state(state, module=record["type"] == "module")))
    return 0 if result.ok else EXIT_BAD_CHECKPOINT


def _describe_sharded(entries: list[tuple[str, str, int, int]], *, module: bool) -> list[str]:
    """Global shapes (as if unsharded) and how many pieces each tensor is split into."""
    tensors = [e for e in entries if e[1] != "value"]
    lines = [f"    {'parameters' if module else 'tensors'}: {sum(e[2] for e in tensors):,} in "
             f"{len(tensors)} tensors (global shapes; pieces = shards holding a part)"]
    if not module:
        values = [e[0] for e in entries if e[1] == "value"]
        lines.append(f"    values: {len(values)}")
    shown = tensors if module else tensors[:8]
    width = max((len(name) for name, *_ in shown[:MAX_TENSOR_LINES]), default=0)
    for name, desc, _, chunks in shown[:MAX_TENSOR_LINES]:
        lines.append(f"      {name.ljust(width)}  {desc}  {chunks} piece{'s' if chunks != 1 else ''}")
    if len(tensors) > min(len(shown), MAX_TENSOR_LINES):
        lines.append(f"      ... {len(tensors) - min(len(shown), MAX_TENSOR_LINES)} more tensors")
    return lines


def _is_flat_tensors(state: Any) -> bool:
    import torch

    return isinstance(state, dict) and bool(state) and all(
        isinstance(v, torch.Tensor) for v in state.values())


# -- verify --------------------------------------------------------------------------------


def _verify_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint directory, or a root: every checkpoint in it")


def _verify(args: argparse.Namespace) -> int:
    path = _existing_dir(args.path)
    if _is_checkpoint(path):
        results = [verify(path)]
    else:
        found: list[tuple[int, Any]] = _store(path).checkpoints() if path.is_dir() else []
        if not found:
            raise UsageError(f"{args.path}: expected a checkpoint directory (with {MANIFEST}) "
                             "or a root holding step-* checkpoints")
        results = [verify(p) for _, p in found]
    for result in results:
        _print_verification(result)
    bad = [r for r in results if not r.ok]
    if bad:
        print(f"{len(bad)} of {len(results)} checkpoint(s) failed verification", file=sys.stderr)
        return EXIT_BAD_CHECKPOINT
    return 0


def _print_verification(result: Verification) -> None:
    if result.ok:
        manifest = result.manifest or {}
        count = len(manifest.get("files", {}))
        print(f"OK      {result.path} ({count} files, {_size(_total_size(manifest))})")
    else:
        print(f"FAILED  {result.path}: {'; '.join(result.problems)}")


# -- export --------------------------------------------------------------------------------


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a checkpoint directory, or a root (newest valid)")
    parser.add_argument("--out", required=True, help="where to write the bare state dict (.pt)")
    parser.add_argument("--name", default=None,
                        help="which saved module, when the checkpoint holds several")


def _export(args: argparse.Namespace) -> int:


    target = _existing_dir(args.path)
    with _read_once(target):
        return _export_checkpoint(_checked(target, args.path), args)


def _export_checkpoint(result: Verification, args: argparse.Namespace) -> int:
    import torch

    from distrain.ckpt.state import safe_load

    path = result.path
    if not result.ok:
        _print_verification(result)
        return EXIT_BAD_CHECKPOINT
    manifest = result.manifest or {}
    modules = [n for n, r in manifest.get("objects", {}).items() if r["type"] == "module"]
    name = args.name or (modules[0] if len(modules) == 1 else None)
    if name is None or name not in modules:
        raise UsageError(f"--name={args.name!r}: expected one of the saved modules "
                         f"({', '.join(modules) or 'none'})")
    out = Path(args.out)
    if out.parent and not out.parent.is_dir():
        raise UsageError(f"--out={args.out!r}: its directory does not exist")
    if manifest["objects"][name].get("storage") == "dcp":  # sharded: whole tensors from the pieces
        from distrain.ckpt.dcp_io import read_object

        state = read_object(path, manifest, name)
    else:
        state = safe_load(path / manifest["objects"][name]["file"], map_location="cpu")
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(state, temp)
    os.replace(temp, out)
    count = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor))
    print(f"wrote {out}: {name} from {path} ({len(state)} tensors, {count:,} elements); load it "
          "with model.load_state_dict(torch.load(path, weights_only=True))")
    return 0


# -- dispatch ------------------------------------------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: dict[str, Command] = {
    "ls": ("list checkpoints: step, time, size, kind, valid?", _ls_args, _ls),
    "inspect": ("metadata, objects, tensor shapes and dtypes, parameter count",
                _inspect_args, _inspect),
    "verify": ("check sizes and digests of every file; exit 1 naming a bad one",
               _verify_args, _verify),
    "export": ("write the bare model weights (a plain state dict)", _export_args, _export),
    "consolidate": ("merge a sharded checkpoint's shards into one plain state dict (model weights)",
                    _export_args, _export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="distrain ckpt", description="Inspect and check checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    handler = COMMANDS[args.command][2]
    prog = f"distrain ckpt {args.command}"
    error_line: str | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = handler(args)
            sys.stdout.flush()  # a closed pipe shows here, not in interpreter shutdown
        except BrokenPipeError:  # the reader left (`| head`): stop quietly, as cat does
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (UsageError, ConfigError) as error:
            code, error_line = EXIT_USAGE, str(error)
        except (CheckpointError, OSError) as error:
            code, error_line = EXIT_BAD_CHECKPOINT, str(error)
    for warning in caught:  # skipped checkpoints, named before the outcome
        print(f"{prog}: warning: {warning.message}", file=sys.stderr)
    if error_line is not None:
        print(f"{prog}: error: {error_line}", file=sys.stderr)
    return code
