"""Shared pieces of the end-to-end `train.py` tests: tiny data, a tiny stage 1, shrinking overrides."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from ldm_fixtures import save_tiny_autoencoder
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
PYTHON = sys.executable
# Recipes that train from the config alone; experiment=finetune needs a base file (tests/test_finetune.py).
# Recipes that start from a base file (base_model=...) have their own tests (test_finetune, test_lora, ...).
FROM_BASE = ("finetune", "lora", "textual_inversion", "dreambooth")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem not in FROM_BASE)
STAGE1 = ("autoencoder_kl", "autoencoder_vq")
PIXEL_SPACE = ("superres_pixel",)  # stage 2 on the lossless SpaceToDepth first stage: no first_stage_ckpt
RESOLUTION = 32  # the tiny autoencoder (tests/ldm_fixtures.TINY_AE) has f=2: 16x16 latents

_spec = importlib.util.spec_from_file_location("make_dataset", REPO / "data" / "make_dataset.py")
make_dataset = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_dataset)

# What each experiment needs on top of the common overrides to fit the tiny data and stage 1
# (f=2 instead of the f=4 the recipes assume for 64 px images).
PER_EXPERIMENT: dict[str, list[str]] = {
    "txt2img_bert": [
        "model.conditioner.conditioners.text.n_layer=1",
        "model.conditioner.conditioners.text.n_embed=32",
        "model.unet.context_dim=32",
    ],
    "superres": ["model.conditioner.conditioners.lowres.upscale=2.0"],  # 8 px low-res -> 16 px latent
    "semantic": ["model.conditioner.conditioners.segmap.downsample_factor=2"],
}


def make_tiny_data(out: Path, train: int = 64, val: int = 16, train_shards: int = 4) -> Path:
    """The embedded shapes set at 32 px: `train` samples in `train_shards` shards, `val` in 2."""
    code = make_dataset.main(
        ["--out", str(out), "--resolution", str(RESOLUTION), "--train", str(train), "--val", str(val)]
        + ["--train-shards", str(train_shards), "--val-shards", "2", "--workers", "1"]
    )
    assert code in (0, None)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """64 train samples in 4 shards and 16 val samples in 2, at 32 px (once per importing test file)."""
    return make_tiny_data(tmp_path_factory.mktemp("shapes32"))


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory) -> Path:
    """A random tiny KL autoencoder (f=2, 4 latent channels) exported as stage 1 would be."""
    return save_tiny_autoencoder(tmp_path_factory.mktemp("tiny_ae"))


def tiny_overrides(
    experiment: str,
    data_dir: Path,
    output_dir: Path,
    ae_path: Path | None,
    max_steps: int = 3,
    every: int = 2,
    ckpt_every: int | None = None,
) -> list[str]:
    """Overrides that shrink `experiment` to seconds on a CPU: tiny widths, batch 4, few steps, csv logs."""
    out = [
        f"experiment={experiment}",
        "trainer=cpu",
        "logger=csv",
        f"paths.runs_dir={output_dir.parent}",
        f"paths.output_dir={output_dir}",
        f"data.train_shards={data_dir}/train-*.tar",
        f"data.val_shards={data_dir}/val-*.tar",
        f"data.resolution={RESOLUTION}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={every}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"callbacks.image_logger.every_n_steps={every}",
        "callbacks.image_logger.max_images=4",
        f"callbacks.periodic_checkpoint.every_n_train_steps={ckpt_every or every}",
    ]
    if experiment in STAGE1:
        out += [
            "model.autoencoder.ddconfig.ch=16",
            "model.autoencoder.ddconfig.ch_mult=[1,2]",
            "model.lr_warmup_steps=0",
            "model.loss.disc_start=1",  # both optimizers step from the second batch on
        ]
    else:
        out += [] if experiment in PIXEL_SPACE else [f"first_stage_ckpt={ae_path}"]
        out += [
            "model.unet.model_channels=32",
            "model.unet.channel_mult=[1,2]",
            "model.unet.attention_resolutions=[2]",
            "model.unet.num_res_blocks=1",
            "model.preview_steps=2",
            "model.optim.warmup_steps=0",
        ]
    return out + PER_EXPERIMENT.get(experiment, [])


def compose_train(overrides: list[str]) -> DictConfig:
    """conf/train.yaml composed with `overrides`, as `python train.py <overrides>` would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a `train.py` child: offline, one thread (2-core CI), repo importable."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    )
    env.update(extra)
    return env


def start_train(args: list[str], **env: str) -> subprocess.Popen:
    """`python train.py <args>` in the background; stdout and stderr piped as text."""
    return subprocess.Popen(
        [PYTHON, str(REPO / "train.py"), *args],
        cwd=REPO,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_train(args: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """`python train.py <args>` to completion; stdout and stderr captured as text."""
    proc = start_train(args, **env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_ckpt(path: Path) -> dict:
    """A Lightning checkpoint the safe way (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RankProbe(pl.Callback):
    """Test-only callback (`+callbacks.probe._target_=train_helpers.RankProbe`): per rank, the sample keys
    it trained on and its final UNet/EMA weights, saved to `<out_dir>/rank<r>.pt`."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.keys: list[list[str]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {k: v.detach().cpu().clone() for k, v in pl_module.unet.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.append(list(batch.get("key", [])))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        unet = {k: v.detach().cpu().clone() for k, v in pl_module.unet.state_dict().items()}
        ema = pl_module.ema.averaged_state(pl_module.model) if getattr(pl_module, "ema", None) else {}
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "keys": self.keys,
                "unet": unet,
                "unet_start": self.start,
                "ema_unet": {
                    k[5:]: v.detach().cpu().clone() for k, v in ema.items() if k.startswith("unet.")
                },
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


class SendSignal(pl.Callback):
    """Test-only: the process signals itself at a chosen point (`where`: train | val), once, at `step`."""

    def __init__(self, step: int, signum: int = 15, where: str = "train") -> None:
        self.step, self.signum, self.where = step, signum, where
        self.sent = False

    def _maybe_send(self, trainer) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.where == "train":
            self._maybe_send(trainer)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.where == "val" and batch_idx == 0:
            self._maybe_send(trainer)
