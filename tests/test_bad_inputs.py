"""Every mistake caught before work starts: one `error:` line naming the key, the value and the fix; exit 2.

Issue 14 §5. `CLI_ROWS` run `python train.py|sample.py <args>` as a user would (Hydra's override parser,
its run-folder creation, `ldm.config_checks`, the `_target_` constructors); `CONFIG_ROWS` put more
values through the same checks on a composed config in-process (no interpreter start-up); `MODEL_ROWS`
need a model to know the value is wrong and use the tiny checkpoints of test_sample_errors.py.
Placeholders in args: {tmp} the test's folder, {file} an existing file, {folder} an existing folder,
{ckpt} an existing (fake) checkpoint file, {root} the tiny models' folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_sample_errors import main_in_process, root  # noqa: F401  (the tiny models; sample.py in-process)
from train_helpers import PYTHON, REPO, compose_train, subprocess_env

from ldm.cli import explain_override, user_key
from ldm.config_checks import Check, check_sample_config, check_train_config, run_checks
from ldm.errors import UserError

READ_ONLY = "/sys/ldm-bad-input-test"  # sysfs refuses new folders, also to root


@dataclass(frozen=True)
class Row:
    script: str  # train | sample
    args: tuple[str, ...]
    words: tuple[str, ...]  # all in the one error line (or, with code 1, in Hydra's own message)
    code: int = 2
    subprocess: bool = True  # False: the same entry point run in this process (sample.py imports take ~5 s)


CLI_ROWS: dict[str, Row] = {
    # sizes and types
    "batch size 0": Row("train", ("data.batch_size=0",), ("data.batch_size=0", ">= 1", "data.batch_size=16")),
    "batch size a string": Row("train", ("data.batch_size=abc",), ("data.batch_size=abc", "whole number")),
    "max_steps 0": Row("train", ("trainer.max_steps=0",), ("trainer.max_steps=0", "or -1")),
    "negative num_workers": Row("train", ("data.num_workers=-1",), ("data.num_workers=-1", ">= 0")),
    "resolution not a multiple of f": Row(
        "train",
        ("experiment=autoencoder_kl", "data.resolution=62"),
        ("data.resolution=62", "factor f=4", "data.resolution=60"),
    ),
    "bad trainer precision": Row(
        "train", ("trainer.precision=fp8",), ("trainer.precision=fp8", "bf16-mixed")
    ),
    "n 0": Row("sample", ("ckpt={ckpt}", "n=0"), ("n=0", ">= 1"), subprocess=False),
    "steps a string": Row(
        "sample", ("ckpt={ckpt}", "steps=abc"), ("steps=abc", "whole number", "steps=50"), subprocess=False
    ),
    "negative cfg_scale": Row(
        "sample", ("ckpt={ckpt}", "cfg_scale=-1"), ("cfg_scale=-1", ">= 0"), subprocess=False
    ),
    # impossible combinations
    "eps with zero-terminal SNR": Row(
        "train",
        ("experiment=txt2img", "model.loss.parameterization=eps"),
        ("model.loss.parameterization=eps", "zero_terminal_snr=true", "model.loss.parameterization=v"),
    ),
    "strength x steps < 1": Row(
        "sample",
        ("ckpt={ckpt}", "task=img2img", "image={file}", "strength=0.01", "steps=50"),
        ("strength=0.01", "steps=50", "0 denoising steps", "strength >= 0.02", "steps >= 100"),
        subprocess=False,
    ),
    "flip on cached latents": Row(
        "train",
        ("experiment=txt2img", "data=shapes_latents", "data.flip=true"),
        ("data.flip=true", "data.latents=true", "data.flip=false"),
    ),
    "task transform on cached latents": Row(
        "train",
        ("experiment=inpaint", "data=shapes_latents"),
        ("data.task=ldm.data.masks.InpaintingMask", "data.latents=true", "InpaintingMask"),
    ),
    # paths: Hydra's run folder (RunDirCheck), checkpoints and inputs
    "run dir inside a file": Row(
        "train", ("hydra.run.dir={file}/run",), ("hydra.run.dir=", "is a file, not a folder")
    ),
    "read-only run dir": Row(
        "train", (f"paths.output_dir={READ_ONLY}",), ("paths.output_dir=", "cannot create")
    ),
    "out_dir is a file": Row("sample", ("ckpt={ckpt}", "out_dir={file}"), ("out_dir=", "existing file")),
    "read-only out_dir": Row(
        "sample", ("ckpt={ckpt}", f"out_dir={READ_ONLY}"), ("out_dir=", "cannot create")
    ),
    "first stage a folder": Row(
        "train", ("experiment=txt2img", "first_stage_ckpt={folder}"), ("first_stage_ckpt=", "is a folder")
    ),
    "ckpt a folder": Row(
        "sample", ("ckpt={folder}",), ("ckpt=", "is a folder", "model.safetensors"), subprocess=False
    ),
    "ckpt missing": Row(
        "sample", ("ckpt=nope.safetensors",), ("ckpt=nope.safetensors", "no such file"), subprocess=False
    ),
    "no ckpt": Row("sample", (), ("ckpt=null", "pass ckpt="), subprocess=False),
    "input image missing": Row(
        "sample",
        ("ckpt={ckpt}", "task=img2img", "image=missing.png"),
        ("image=missing.png", "no such file"),
        subprocess=False,
    ),
    # the command line itself
    "emoji in an override": Row(
        "sample", ("ckpt={ckpt}", "prompt=a 🐱 cat"), ("prompt=a 🐱 cat", "'🐱'", "'prompt=\"a 🐱 cat\"'")
    ),
    "emoji in a train override": Row(
        "train", ("name=my 🐱 run",), ("name=my 🐱 run", "'name=\"my 🐱 run\"'")
    ),
    "not key=value": Row("train", ("batch_size",), ("'batch_size' is not an override", "key=value")),
    # Hydra's own composition errors: no traceback, the options listed (exit code 1, Hydra's)
    "unknown sampler": Row(
        "sample", ("ckpt={ckpt}", "sampler=dpm_fast"), ("sampler/dpm_fast", "ddim", "euler_a"), 1, False
    ),
}


def _fill(args: tuple[str, ...], tmp: Path) -> list[str]:
    names = {
        "tmp": tmp,
        "file": tmp / "a_file.png",
        "folder": tmp / "a_folder",
        "ckpt": tmp / "model.safetensors",
    }
    return [a.format(**names) for a in args]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """cwd and LDM_ROOT of a run (outputs land here), with an existing file, folder and (fake) checkpoint."""
    (tmp_path / "a_file.png").write_bytes(b"not a folder")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"config checks run before anything reads this")
    return tmp_path


def _assert_one_error_line(proc: subprocess.CompletedProcess, code: int, words: tuple[str, ...]) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    if code != 2:  # Hydra's message, printed by Hydra
        assert all(w in out for w in words), out
        return out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{missing} not in: {lines[0]}"
    return lines[0]


def run_entry(script: str, args: list[str], cwd: Path, monkeypatch, capsys) -> subprocess.CompletedProcess:
    """`python <script>.py <args>` run in this process (test_sample_errors.main_in_process), no start-up."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LDM_ROOT", str(cwd))
    capsys.readouterr()
    code = main_in_process(monkeypatch, *args, "hydra/job_logging=none")
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.parametrize("row", CLI_ROWS.values(), ids=CLI_ROWS.keys())
def test_cli_bad_input_is_one_line(row: Row, workdir: Path, monkeypatch, capsys):
    args = _fill(row.args, workdir)
    if row.script == "train" and not any(a.startswith("experiment=") for a in args):
        args = ["experiment=uncond", *args]
    if not row.subprocess:
        assert row.script == "sample"
        proc = run_entry(row.script, args, workdir, monkeypatch, capsys)
    else:
        proc = subprocess.run(
            [PYTHON, str(REPO / f"{row.script}.py"), *args],
            cwd=workdir,
            env=subprocess_env(LDM_ROOT=str(workdir)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    _assert_one_error_line(proc, row.code, row.words)
    if any(key in " ".join(args) for key in ("out_dir=", "run.dir=", "output_dir=")):
        assert not (workdir / "outputs").exists()  # stopped before Hydra made a run folder elsewhere


def test_unwritable_folder_for_a_normal_user(workdir: Path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only-mode folders (the /sys rows cover the read-only case)")
    locked = workdir / "locked"
    locked.mkdir(mode=0o555)
    proc = subprocess.run(
        [PYTHON, str(REPO / "train.py"), "experiment=uncond", f"hydra.run.dir={locked}/run"],
        cwd=workdir,
        env=subprocess_env(LDM_ROOT=str(workdir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_error_line(proc, 2, ("hydra.run.dir=", str(locked), "Permission denied"))


# -- the same checks in-process, on composed configs ------------------------------------------------------

CONFIG_ROWS: dict[str, Row] = {
    "negative max_steps": Row("train", ("trainer.max_steps=-5",), ("trainer.max_steps=-5",)),
    "val batch size 0": Row("train", ("data.val_batch_size=0",), ("data.val_batch_size=0", "or null")),
    "resolution 0": Row("train", ("data.resolution=0",), ("data.resolution=0", "positive")),
    "resolution vs superres scale": Row(
        "train", ("experiment=superres", "data.resolution=66"), ("data.resolution=66", "scale=4", "=64")
    ),
    "random crop on cached latents": Row(
        "train",
        ("experiment=txt2img", "data=shapes_latents", "data.crop=random"),
        ("data.crop=random", "data.crop=center"),
    ),
    "custom data as latents keeps its flip": Row(
        "train",
        (
            "experiment=txt2img",
            "data=custom",
            "data.train_shards=x.tar",
            "data.latents=true",
            "data.crop=center",
        ),
        ("data.flip=true", "data.flip=false"),
    ),
    "unknown parameterization": Row(
        "train", ("experiment=txt2img", "model.loss.parameterization=epsilon"), ("=epsilon", "eps, v, x0")
    ),
    "zero learning rate": Row(
        "train", ("experiment=txt2img", "model.optim.lr=0"), ("model.optim.lr=0", "> 0")
    ),
    "stage-1 learning rate a string": Row(
        "train", ("experiment=autoencoder_kl", "model.learning_rate=fast"), ("model.learning_rate=fast",)
    ),
    "ema decay 1": Row("train", ("experiment=txt2img", "model.ema_decay=1"), ("model.ema_decay=1", "[0, 1)")),
    "seed a float": Row("train", ("seed=1.5",), ("seed=1.5", "whole number")),
    "missing first stage file": Row(
        "train", ("experiment=txt2img", "first_stage_ckpt=nope.safetensors"), ("first_stage_ckpt=", "no such")
    ),
    "steps 0": Row("sample", ("steps=0",), ("steps=0", ">= 1")),
    "default strength with one step": Row(
        "sample", ("task=img2img", "steps=1"), ("strength=null", "default strength 0.75", "steps >= 2")
    ),
    "strength above 1": Row("sample", ("task=img2img", "strength=2"), ("strength=2.0", "(0, 1]")),
    "sample precision": Row("sample", ("precision=fp8",), ("precision=fp8", "fp32, bf16, fp16")),
    "unknown device": Row("sample", ("device=gpu",), ("device=gpu", "cuda:N")),
    "label not an id": Row("sample", ("task=class", "label=abc"), ("label=abc", "label=3")),
    "label for a text task": Row(
        "sample",
        ("task=txt2img", "prompt=x", "label=3"),
        ("label=3", "task=txt2img does not read label", "task=class"),
    ),
    "mask for img2img": Row(
        "sample",
        ("task=img2img", "mask=m.png"),
        ("mask=m.png", "task=img2img does not read mask", "task=inpaint"),
    ),
    "height 0": Row("sample", ("height=0",), ("height=0", ">= 1")),
    "batch size 0 (sample)": Row("sample", ("batch_size=0",), ("batch_size=0",)),
    "CompVis yaml missing": Row(
        "sample", ("config=v1-inference.yaml",), ("config=v1-inference.yaml", "no such")
    ),
}


def _compose(row: Row, tmp: Path):
    from hydra import compose, initialize_config_dir

    args = _fill(row.args, tmp)
    if row.script == "train":
        args = args if any(a.startswith("experiment=") for a in args) else ["experiment=uncond", *args]
        return compose_train([*args, f"paths.output_dir={tmp / 'run'}"])
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            "sample", overrides=[f"ckpt={tmp / 'model.safetensors'}", f"out_dir={tmp / 'out'}", *args]
        )


@pytest.mark.parametrize("row", CONFIG_ROWS.values(), ids=CONFIG_ROWS.keys())
def test_config_check(row: Row, workdir: Path, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LDM_ROOT", str(workdir))
    cfg = _compose(row, workdir)
    check = check_train_config if row.script == "train" else check_sample_config
    with pytest.raises(UserError) as info:
        check(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert all(w in message for w in row.words), message


@pytest.mark.parametrize(
    "script, args",
    [
        ("train", ["experiment=txt2img"]),
        ("train", ["experiment=txt2img", "data=shapes_latents"]),  # the Makefile's demo-txt2img
        ("train", ["experiment=semantic", "data=shapes_latents"]),  # SemanticMap reads only the cached segmap
        ("train", ["experiment=autoencoder_vq", "trainer.max_steps=-1", "trainer.precision=bf16-mixed"]),
        ("train", ["experiment=superres"]),
        ("sample", ["task=img2img", "strength=0.02", "steps=50"]),  # exactly one step
        ("sample", ["task=class", "label=[0,2]", "device=cuda:1", "height=64"]),
    ],
)
def test_good_configs_pass(script: str, args: list[str], workdir: Path, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LDM_ROOT", str(workdir))
    cfg = _compose(Row(script, tuple(args), ()), workdir)
    (check_train_config if script == "train" else check_sample_config)(cfg)


def test_resolution_uses_the_first_stage_file_factor(workdir: Path, tiny_ae: Path, monkeypatch):  # noqa: F811
    """Stage 2: f comes from the autoencoder file's metadata (the tiny one has f=2), read without torch."""
    monkeypatch.setenv("LDM_ROOT", str(workdir))
    cfg = compose_train(["experiment=txt2img", f"first_stage_ckpt={tiny_ae}", "data.resolution=33"])
    with pytest.raises(
        UserError, match=r"data.resolution=33: .*factor f=2 \(the first stage .*data.resolution=32"
    ):
        check_train_config(cfg)
    check_train_config(
        compose_train(["experiment=txt2img", f"first_stage_ckpt={tiny_ae}", "data.resolution=34"])
    )


def test_train_and_sample_run_the_checks_first(workdir: Path, monkeypatch):
    """The one call at the top of train()/sample(): a bad value fails there, before anything is built."""
    sys.path.insert(0, str(REPO))
    import sample as sample_py
    import train as train_py

    monkeypatch.setenv("LDM_ROOT", str(workdir))
    with pytest.raises(UserError, match="data.batch_size=0"):
        train_py.train(
            compose_train(["experiment=uncond", "data.batch_size=0", f"paths.output_dir={workdir}/r"])
        )
    assert not (workdir / "r").exists()
    with pytest.raises(UserError, match="n=0"):
        sample_py.sample(_compose(Row("sample", ("n=0",), ()), workdir))


# -- rows that need a model to know the value is wrong (tiny checkpoints of test_sample_errors) -----------

MODEL_ROWS: dict[str, Row] = {
    "label on a text model": Row(
        "sample", ("task=class", "label=1"), ("task=class needs a model conditioned on class labels",)
    ),
    "superres on a text model": Row(
        "sample",
        ("task=superres", "image={root}/image.png"),
        ("supports: txt2img, img2img, inpaint, outpaint",),
    ),
    "height not a multiple of f": Row(
        "sample", ("prompt=x", "height=9"), ("height=9: must be a positive multiple of 2",)
    ),
    "more steps than timesteps": Row("sample", ("prompt=x", "steps=2000"), ("steps=2000", "1000")),
}


@pytest.mark.parametrize("row", MODEL_ROWS.values(), ids=MODEL_ROWS.keys())
def test_model_bad_input_is_one_line(row: Row, root: Path, tmp_path: Path, monkeypatch, capsys):  # noqa: F811
    args = [f"ckpt={root / 'text' / 'model.safetensors'}", f"out_dir={tmp_path / 'out'}"]
    proc = run_entry(
        "sample", [*args, *(a.format(root=root) for a in row.args)], tmp_path, monkeypatch, capsys
    )
    _assert_one_error_line(proc, row.code, row.words)


# -- files of the wrong kind or in bad shape (issue 14 §2-4): loaders and the image decoder --------------


def _bad_files(models: Path, tmp: Path) -> dict[str, Path]:
    """Files a user might pass: random bytes, a pickle that would run code, a truncated export, ..."""
    import pickle

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file, save_file

    files = {
        "random": tmp / "random.ckpt",
        "pickle": tmp / "evil.ckpt",
        "stripped": tmp / "stripped.safetensors",
    }
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'PWNED'}",))

    files["pickle"].write_bytes(pickle.dumps({"state_dict": {}, "x": Evil()}))
    save_file(load_file(models / "text" / "model.safetensors"), files["stripped"])  # metadata removed
    data = (models / "text" / "model.safetensors").read_bytes()
    files["truncated"] = tmp / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["tiny_image"] = tmp / "dot.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(files["tiny_image"])
    files["stage2"] = models / "text" / "model.safetensors"
    return files


FILE_ROWS: dict[str, Row] = {
    "random bytes as ckpt": Row("sample", ("ckpt={random}",), ("random.ckpt is not a checkpoint",)),
    "a pickle that would run code": Row("sample", ("ckpt={pickle}",), ("evil.ckpt", "stores Python objects")),
    "export with its metadata removed": Row(
        "sample", ("ckpt={stripped}",), ("export whose config metadata was removed", "config.yaml")
    ),
    "truncated export": Row("sample", ("ckpt={truncated}",), ("truncated.safetensors", "truncated")),
    "1x1 image for img2img": Row(
        "sample",
        ("ckpt={stage2}", "task=img2img", "image={tiny_image}", "prompt=x"),
        ("dot.png", "1x1", "8 px"),
    ),
    "stage-2 model as first stage": Row(
        "train",
        ("experiment=txt2img", "first_stage_ckpt={stage2}"),
        ("is a text-to-image model", "not an autoencoder"),
    ),
    "a pickle that would run code as ckpt_path": Row(
        "train", ("experiment=uncond", "ckpt_path={pickle}"), ("evil.ckpt", "stores Python objects")
    ),
}


@pytest.mark.parametrize("row", FILE_ROWS.values(), ids=FILE_ROWS.keys())
def test_bad_file_is_one_line(row: Row, root: Path, tmp_path: Path, monkeypatch, capsys):  # noqa: F811
    files = _bad_files(root, tmp_path)
    args = [a.format(**files) for a in row.args]
    if row.script == "sample":
        proc = run_entry("sample", [*args, f"out_dir={tmp_path / 'out'}"], tmp_path, monkeypatch, capsys)
    else:
        proc = subprocess.run(
            [
                PYTHON,
                str(REPO / "train.py"),
                *args,
                f"hydra.run.dir={tmp_path / 'run'}",
                "trainer.max_steps=1",
            ],
            cwd=tmp_path,
            env=subprocess_env(LDM_ROOT=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=180,
        )
    _assert_one_error_line(proc, row.code, row.words)
    assert not (tmp_path / "PWNED").exists()  # nothing in a file ever runs


# -- the pieces --------------------------------------------------------------------------------------------


def test_a_new_rule_is_one_row():
    cfg = OmegaConf.create({"data": {"batch_size": 3}})
    odd = Check("data.batch_size", lambda key, v, cfg: None if v % 2 == 0 else f"must be even; e.g. {key}=4.")
    with pytest.raises(UserError, match=r"^data.batch_size=3: must be even; e.g. data.batch_size=4.$"):
        run_checks(cfg, [odd])
    run_checks(cfg, [Check("data.not_there", odd.rule)])  # keys a config lacks are skipped


@pytest.mark.parametrize(
    "override, words",
    [
        ("prompt=a 🐱 cat", ("'🐱'", "'prompt=\"a 🐱 cat\"'")),
        ('prompt=say "hi" 🐱', ('"prompt=\'say \\"hi\\" 🐱\'"',)),
        ("prompt=a (b) c", ("Hydra cannot parse it", "'prompt=\"a (b) c\"'")),
    ],
)
def test_override_quoting_fix(override: str, words: tuple[str, ...]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    with pytest.raises(OverrideParseException) as info:
        OverridesParser.create().parse_overrides([override])
    message = explain_override(override, str(info.value))
    assert "\n" not in message and message.startswith(override + ": ")
    assert all(w in message for w in words), message
    fixed = message.rsplit("shell's quotes: ", 1)[1]
    shell = subprocess.run(["bash", "-c", f"printf %s {fixed}"], capture_output=True, text=True, check=True)
    parsed = OverridesParser.create().parse_overrides([shell.stdout])[0]  # the fix parses, to the value typed
    assert parsed.value() == override.split("=", 1)[1]


def test_run_dir_key_follows_the_interpolation():
    cfg = OmegaConf.create({"out_dir": "/x", "paths": {"output_dir": "/r/${out_dir}"}, "hydra": {"run": {}}})
    cfg.hydra.run.dir = "${out_dir}"
    assert user_key(cfg, "hydra.run.dir") == "out_dir"
    cfg.hydra.run.dir = "${paths.output_dir}"
    assert user_key(cfg, "hydra.run.dir") == "paths.output_dir"  # not a plain interpolation further on
    cfg.hydra.run.dir = "/runs/${out_dir}"
    assert user_key(cfg, "hydra.run.dir") == "hydra.run.dir"


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"batch_size": 0}, "data.batch_size=0: must be a whole number >= 1"),
        ({"batch_size": "8"}, "data.batch_size=8: must be a whole number"),
        ({"num_workers": -1}, "data.num_workers=-1: must be a whole number >= 0"),
        ({"val_batch_size": 2.5}, "data.val_batch_size=2.5"),
        ({"timeout": 0}, "data.timeout=0: must be > 0"),
    ],
)
def test_shard_datamodule_checks_its_arguments(kwargs: dict, words: str):
    from ldm.data.datamodule import ShardDataModule

    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        ShardDataModule("unused-*.tar", **kwargs)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"batch_size": 0}, "batch_size=0: must be a whole number >= 1"),
        ({"cfg_scale": "7"}, "cfg_scale=7: must be a number >= 0"),
        ({"cfg_scale": float("nan")}, "cfg_scale=nan"),
        ({"seed": 1.5}, "seed=1.5: must be a whole number"),
    ],
)
def test_sampling_settings_check_their_arguments(kwargs: dict, words: str):
    from ldm.samplers.sigmas import StepSchedule
    from ldm.sampling import Settings

    with pytest.raises(UserError, match=words):
        Settings(sampler=lambda *a, **k: None, steps=StepSchedule(10), **kwargs)


def test_no_experiment_is_one_line(workdir: Path):
    """`python train.py` alone: one line naming the experiments, not Hydra's 200-line traceback."""
    proc = subprocess.run(
        [PYTHON, str(REPO / "train.py")],
        cwd=workdir,
        env=subprocess_env(LDM_ROOT=str(workdir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_error_line(
        proc, 2, ("no experiment chosen", "experiment=autoencoder_kl", "txt2img, txt2img_bert")
    )
    assert not (workdir / "outputs").exists()
