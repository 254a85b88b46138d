"""python -m ldm.app ckpt=<file> [config=<yaml> text_encoder=<folder> device=auto port=7860 share=false]

Loads the model once, then serves the sampling page (see `ldm.app`) until Ctrl+C. Options (key=value, as for
sample.py; OPTIONS below has the defaults):

    ckpt          model.safetensors / .ckpt from train.py, or an original SD file (+ config=, text_encoder=)
    config        the CompVis yaml of an original checkpoint
    text_encoder  local tokenizer / text-encoder folder (the CLIP tokenizer for SD v1)
    device        auto (cuda > mps > cpu) | cpu | cuda | cuda:N
    precision     fp32 | bf16 | fp16 (autocast of the UNet)
    use_ema       true | false: the EMA weights when the file has them
    host          127.0.0.1 serves this machine only; 0.0.0.0 serves the network
    port          7860; 0 = the first free port from 7860
    share         true: also a public gradio.live link (downloads gradio's tunnel client once)
    out_dir       where each click's PNGs, run.json and zip go (outputs/app)
    batch_size    images per forward pass (does not change the images)
"""

from __future__ import annotations

import sys
from typing import Any

OPTIONS: dict[str, Any] = {
    "ckpt": None,
    "config": None,
    "text_encoder": None,
    "device": "auto",
    "precision": "fp32",
    "use_ema": True,
    "host": "127.0.0.1",
    "port": 7860,
    "share": False,
    "out_dir": "outputs/app",
    "batch_size": 4,
}
BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_args(argv: list[str]) -> dict[str, Any]:
    """["ckpt=a.safetensors", "port=8000"] -> OPTIONS with those values; UserError (one line) for an unknown
    key, a value of the wrong type, or no ckpt."""
    from ldm.errors import UserError

    out = dict(OPTIONS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or key not in OPTIONS:
            raise UserError(f"{arg!r}: expected key=value with key one of {', '.join(OPTIONS)}.")
        if key in ("use_ema", "share"):
            if value.lower() not in BOOLEANS:
                raise UserError(f"{key}={value}: use true or false.")
            out[key] = BOOLEANS[value.lower()]
        elif key in ("port", "batch_size"):
            low, high = (0, 65535) if key == "port" else (1, 1024)
            if not value.isdigit() or not low <= int(value) <= high:
                raise UserError(f"{key}={value}: must be a whole number from {low} to {high}.")
            out[key] = int(value)
        else:
            out[key] = value or None if key in ("config", "text_encoder") else value
    if not out["ckpt"]:
        raise UserError(
            "pass ckpt=<model file>, e.g. python -m ldm.app ckpt=outputs/txt2img/latest/model.safetensors"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """Parse, load once, serve (blocks until interrupted); mistakes print one `error:` line, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    from ldm.cli import fail
    from ldm.errors import UserError

    try:
        opts = parse_args(argv)
        import torch

        from ldm.app.page import build_page, launch
        from ldm.app.session import Session
        from ldm.sampling.runner import PRECISIONS

        if opts["precision"] not in PRECISIONS:
            raise UserError(f"precision={opts['precision']}: use one of {', '.join(PRECISIONS)}.")
        session = Session.from_file(
            opts["ckpt"],
            config=opts["config"],
            text_encoder=opts["text_encoder"],
            device=opts["device"],
            out_dir=opts["out_dir"],
            dtype=PRECISIONS[opts["precision"]] or torch.float32,
            use_ema=opts["use_ema"],
        )
        session.batch_size = opts["batch_size"]
        demo = build_page(session)
    except UserError as e:
        fail(str(e))
    print(f"loaded {opts['ckpt']} (tasks: {', '.join(session.tasks)}); gradio prints the page's address")
    launch(demo, session, host=opts["host"], port=opts["port"] or None, share=opts["share"], block=True)


if __name__ == "__main__":
    main()
