"""Convert a trusted legacy pickle checkpoint into safetensors: `python -m ldm.interop.convert IN OUT`."""

from __future__ import annotations

import argparse
import sys

import torch

from ldm.errors import UserError
from ldm.interop.checkpoint import load_checkpoint_file, save_safetensors


def convert(src: str, dst: str, trust_pickle: bool = False) -> int:
    """Read `src` (weights_only unless trusted) and write its tensors to `dst`; returns the tensor count."""
    if trust_pickle:
        # Explicit opt-in: unpickling can run code, so only for files the user vouches for.
        ckpt = torch.load(src, map_location="cpu", weights_only=False)
    else:
        ckpt = load_checkpoint_file(src)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{src} contains no tensors to convert.")
    config = ckpt.get("ldm_config") if isinstance(ckpt, dict) else None
    save_safetensors(tensors, dst, config if isinstance(config, dict) else None)
    return len(tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow unpickling (runs code from the file)"
    )
    args = parser.parse_args(argv)
    try:
        n = convert(args.src, args.dst, args.trust_pickle)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
