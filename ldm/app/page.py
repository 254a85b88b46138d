"""The gradio page over a `Session`: inputs on the left, a gallery with each image's parameters on the right.

Only page layout and gradio plumbing live here; what a click does is `ldm.app.session.Session.generate`.
`build_page(session)` returns the `gr.Blocks`; `launch(demo, session, ...)` serves it (offline: analytics off,
the theme's fonts served by gradio itself, outputs served from the session's out_dir only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from the page or the server
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from ldm.app.session import Request, Session, editor_image_and_mask  # noqa: E402
from ldm.errors import UserError  # noqa: E402

TITLE = "ldm: sample"
# The inputs of a click, in the order the handler takes them (component elem_id = these names)
FIELDS = (
    "task", "prompt", "negative_prompt", "image", "mask", "segmap", "label",
    "pad_left", "pad_top", "pad_right", "pad_bottom", "strength",
    "sampler", "steps", "cfg_scale", "seed", "n", "height", "width", "loras",
)  # fmt: skip
GROUPS = ("prompt", "image", "mask", "strength", "pad", "segmap", "label")  # shown per task (Session.inputs)


def request_from_values(values: dict[str, Any]) -> Request:
    """The page's component values (FIELDS) -> a Request; the image editor value gives image + painted mask;
    an uploaded mask is used where nothing is painted."""
    image, painted = editor_image_and_mask(values.get("image"))
    mask = painted if painted is not None else values.get("mask")
    return Request(
        task=values["task"],
        prompt=values.get("prompt") or "",
        negative_prompt=values.get("negative_prompt") or "",
        image=image,
        mask=mask,
        segmap=values.get("segmap"),  # gr.File: the uploaded file's path (class ids stay exact)
        label=values.get("label") or "",
        pad=[values.get(f"pad_{side}") or 0 for side in ("left", "top", "right", "bottom")],
        strength=values.get("strength", 0.75),
        sampler=values["sampler"],
        steps=values["steps"],
        cfg_scale=values["cfg_scale"],
        seed=values["seed"],
        n=values["n"],
        height=values.get("height") or None,
        width=values.get("width") or None,
        loras=values.get("loras") or "",
    )


def make_handler(session: Session) -> Callable[..., tuple[list[tuple[str, str]], str, str]]:
    """The function behind Generate: FIELDS values -> (gallery [(png path, caption)], zip path, summary).

    Bad input raises gr.Error with the UserError's one line; progress goes to gradio's bar."""

    def generate(
        *values: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (gradio's way to ask for it)
    ) -> tuple[list[tuple[str, str]], str, str]:
        try:
            request = request_from_values(dict(zip(FIELDS, values, strict=True)))
            report = lambda done, total: progress((done, total), desc="sampling", unit="steps")  # noqa: E731
            out = session.generate(request, on_step=report)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        gallery = [(str(path), text) for path, text in zip(out.files, out.captions, strict=True)]
        t = out.record["timings"]
        summary = (
            f"{len(out.files)} image(s) of {out.record['size']['width']}×{out.record['size']['height']} in "
            f"{t['sample_s'] + t['decode_s'] + t['encode_s']:.1f} s · saved to `{out.folder}`"
        )
        return gallery, str(out.zip_path), summary

    return generate


def visibility(session: Session, task: str) -> dict[str, bool]:
    """Which input groups `task` shows (GROUPS -> visible)."""
    needs = session.inputs(task)
    return {group: group in needs for group in GROUPS}


def build_page(session: Session) -> gr.Blocks:
    """The page for `session`: tasks of its model, samplers of conf/sampler, one Generate button."""
    tasks, (height, width), f = session.tasks, session.default_size, session.factor
    first = visibility(session, tasks[0])  # the groups shown until the task changes
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\n`{session.pipe.loaded.path}` · tasks: {', '.join(tasks)}")
        with gr.Row():
            with gr.Column(scale=1):
                c: dict[str, Any] = {
                    "task": gr.Radio(list(tasks), value=tasks[0], label="Task", elem_id="task")
                }
                groups: dict[str, Any] = {}
                with gr.Group(visible=first["prompt"]) as groups["prompt"]:
                    c["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                    c["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="negative_prompt")
                with gr.Group(visible=first["image"]) as groups["image"]:
                    c["image"] = gr.ImageMask(
                        label="Image (inpaint: paint the area to regenerate)",
                        type="pil",
                        sources=["upload", "clipboard"],
                        format="png",
                        elem_id="image",
                    )
                with gr.Group(visible=first["mask"]) as groups["mask"]:
                    c["mask"] = gr.Image(
                        label="…or upload a mask (white = regenerate)",
                        type="pil",
                        image_mode="L",
                        elem_id="mask",
                    )
                with gr.Group(visible=first["segmap"]) as groups["segmap"]:
                    c["segmap"] = gr.File(label="Segmentation map (PNG of class ids)", elem_id="segmap")
                with gr.Group(visible=first["label"]) as groups["label"]:
                    c["label"] = gr.Textbox(label="Class ids (e.g. 0, 2, 4)", elem_id="label")
                with gr.Row(visible=first["pad"]) as groups["pad"]:
                    for side in ("left", "top", "right", "bottom"):
                        c[f"pad_{side}"] = gr.Number(
                            0, label=f"pad {side} (px)", precision=0, elem_id=f"pad_{side}"
                        )
                with gr.Group(visible=first["strength"]) as groups["strength"]:
                    c["strength"] = gr.Slider(
                        0.01, 1.0, 0.75, step=0.01, label="Strength", elem_id="strength"
                    )
                with gr.Row():
                    c["sampler"] = gr.Dropdown(
                        list(session.samplers), value="ddim", label="Sampler", elem_id="sampler"
                    )
                    c["steps"] = gr.Slider(1, 150, 20, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    c["cfg_scale"] = gr.Slider(0, 20, 5.0, step=0.5, label="CFG scale", elem_id="cfg_scale")
                    c["seed"] = gr.Number(0, label="Seed (image i: seed + i)", precision=0, elem_id="seed")
                    c["n"] = gr.Slider(1, 16, 4, step=1, label="Images", elem_id="n")
                with gr.Row():
                    c["height"] = gr.Number(
                        height, label=f"Height (px, × {f}; 0 = auto)", precision=0, elem_id="height"
                    )
                    c["width"] = gr.Number(
                        width, label=f"Width (px, × {f}; 0 = auto)", precision=0, elem_id="width"
                    )
                c["loras"] = gr.Textbox(
                    label="LoRA files, one per line: path.safetensors:scale", lines=2, elem_id="loras"
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gallery = gr.Gallery(
                    label="Results (caption: seed · sampler · steps · cfg)",
                    columns=2,
                    height=640,  # two rows of two images without scrolling
                    format="png",
                    buttons=["download", "fullscreen"],
                    elem_id="gallery",
                )
                summary = gr.Markdown(elem_id="summary")
                download = gr.File(
                    label="Download (PNGs with their parameters + run.json)", elem_id="download"
                )

        def show(task: str) -> list[Any]:
            shown = visibility(session, task)
            return [gr.update(visible=shown[g]) for g in GROUPS]

        c["task"].change(show, c["task"], [groups[g] for g in GROUPS])
        button.click(make_handler(session), [c[k] for k in FIELDS], [gallery, download, summary])
    return demo


def launch(
    demo: gr.Blocks,
    session: Session,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    block: bool = True,
) -> gr.Blocks:
    """Serve `demo` on host:port (None: gradio's first free port from 7860); block=False returns at once
    (then `demo.close()`). Only the session's out_dir is served besides gradio's own files."""
    Path(session.out_dir).mkdir(parents=True, exist_ok=True)
    demo.queue(default_concurrency_limit=1)  # one model, one click at a time (others wait in line)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        allowed_paths=[str(Path(session.out_dir).resolve())],
        quiet=not block,
    )
    return demo
