"""AutoencoderModule: learning, step counting with two optimizers, exact resume, callback methods."""

import pytest
import torch
from ldm_fixtures import bare_trainer as trainer
from pytorch_lightning.callbacks import Callback
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from ldm.interop.checkpoint import load_checkpoint_file
from ldm.models.autoencoder import AutoencoderKL, VQModel
from ldm.models.discriminator import NLayerDiscriminator
from ldm.models.losses import AutoencoderLoss
from ldm.training.autoencoder_module import AutoencoderModule, LinearWarmup, psnr


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread costs more in barriers than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


DDCONFIG = dict(
    double_z=True,
    z_channels=4,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=16,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
    norm_groups=4,  # 4+ channels per group: a narrow model learns colours much faster than with 32 groups
)


def synthetic_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth colour gradients in [-1, 1]: easy to reconstruct, so a few steps show real learning."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    coef = torch.rand(n, 3, 3, generator=g) * 2 - 1  # per image and channel: a*x + b*y + c
    img = coef[..., 0, None, None] * xs + coef[..., 1, None, None] * ys + coef[..., 2, None, None]
    return img.clamp(-1, 1)


def loader(n: int = 8, batch_size: int = 4, size: int = 32) -> DataLoader:
    data = [{"image": img} for img in synthetic_images(n, size)]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def make_module(
    kind: str = "kl", disc_start: int = 1000, seed: int = 0, **module_kwargs
) -> AutoencoderModule:
    torch.manual_seed(seed)
    if kind == "kl":
        autoencoder = AutoencoderKL(DDCONFIG, embed_dim=4)
    else:
        autoencoder = VQModel({**DDCONFIG, "double_z": False}, n_embed=32, embed_dim=4, ema_decay=0.9)
    loss = AutoencoderLoss(
        disc_start=disc_start,
        perceptual_weight=0.0,  # LPIPS is tested on its own; keep these runs fast
        kl_weight=1e-6,
        discriminator=NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2),
    )
    kwargs = {"learning_rate": 1e-3, **module_kwargs}
    return AutoencoderModule(autoencoder, loss, **kwargs)


@torch.no_grad()
def eval_rec_loss(module: AutoencoderModule, images: torch.Tensor) -> float:
    module.eval()
    dec = module.autoencoder(images, sample_posterior=False)[0]
    module.train()  # Lightning keeps the mode it finds
    return (dec - images).abs().mean().item()


class CountBatches(Callback):
    def __init__(self) -> None:
        self.batches = 0
        self.steps_seen: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1
        self.steps_seen.append(trainer.global_step)


def test_short_training_lowers_reconstruction_loss():
    module = make_module("kl")
    images = synthetic_images(8)
    before = eval_rec_loss(module, images)
    trainer(40).fit(module, loader())
    after = eval_rec_loss(module, images)
    assert after < 0.6 * before, (before, after)  # typically 0.61 -> 0.29


def test_global_step_counts_batches_and_discriminator_starts_at_disc_start():
    module = make_module("kl", disc_start=3)
    disc_before = {k: v.clone() for k, v in module.loss.discriminator.state_dict().items()}
    counter = CountBatches()
    t = trainer(5, callbacks=[counter])
    t.fit(module, loader())
    assert (
        t.global_step == 5 and counter.batches == 5
    )  # max_steps=5 means 5 iterations, not 5 optimizer steps
    assert counter.steps_seen == [0, 1, 2, 3, 4]
    opt_g, opt_d = t.optimizers
    gen_param = module.autoencoder.get_last_layer()
    disc_param = module.loss.discriminator.main[0].weight
    assert int(opt_g.state[gen_param]["step"]) == 5
    assert int(opt_d.state[disc_param]["step"]) == 2  # steps 3 and 4
    sch_g, sch_d = t.lr_scheduler_configs[0].scheduler, t.lr_scheduler_configs[1].scheduler
    assert sch_g.last_epoch == 5 and sch_d.last_epoch == 2
    assert not torch.equal(disc_before["main.0.weight"], module.loss.discriminator.main[0].weight)
    assert "train/disc_loss" in t.callback_metrics and t.callback_metrics["train/disc_loss"] > 0


def test_discriminator_untouched_before_disc_start():
    module = make_module("kl", disc_start=100)
    disc_before = {k: v.clone() for k, v in module.loss.discriminator.state_dict().items()}
    t = trainer(3)
    t.fit(module, loader())
    for k, v in module.loss.discriminator.state_dict().items():
        assert torch.equal(disc_before[k], v), k
    assert len(t.optimizers[1].state) == 0
    assert t.callback_metrics["train/g_loss"] == 0 and t.callback_metrics["train/disc_weight"] == 0


class CaptureAtStart(Callback):
    """Optimizer and scheduler states as restored, before the first resumed step."""

    def on_train_start(self, trainer, pl_module):
        self.global_step = trainer.global_step
        self.optimizers = [_clone(o.state_dict()) for o in trainer.optimizers]
        self.schedulers = [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_restores_step_optimizers_and_schedulers_exactly(tmp_path):
    # VQ with EMA, no LPIPS: training is deterministic, so 4 + 2 resumed steps must equal 6 straight ones
    kwargs = dict(kind="vq", disc_start=2, lr_warmup_steps=3)
    first = make_module(**kwargs)
    t1 = trainer(4)
    # one batch per epoch, so the comparison does not depend on how Lightning resumes a data loader
    t1.fit(first, loader(n=4, batch_size=4))
    ckpt = tmp_path / "run.ckpt"
    t1.save_checkpoint(ckpt)
    saved = load_checkpoint_file(ckpt)  # weights_only=True: the checkpoint holds no pickled objects
    assert saved["global_step"] == 4

    capture = CaptureAtStart()
    resumed = make_module(**kwargs, seed=123)  # different init: everything must come from the checkpoint
    t2 = trainer(6, callbacks=[capture])
    t2.fit(resumed, loader(n=4, batch_size=4), ckpt_path=str(ckpt))
    assert capture.global_step == 4 and t2.global_step == 6
    assert len(saved["optimizer_states"]) == 2 and len(saved["optimizer_states"][1]["state"]) > 0
    for restored, stored in zip(capture.optimizers, saved["optimizer_states"]):
        _assert_same(restored, stored, "optimizer")
    for restored, stored in zip(capture.schedulers, saved["lr_schedulers"]):
        _assert_same(restored, stored, "scheduler")
    assert saved["lr_schedulers"][0]["last_epoch"] == 4 and saved["lr_schedulers"][1]["last_epoch"] == 2

    straight = make_module(**kwargs)
    trainer(6).fit(straight, loader(n=4, batch_size=4))
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_warmup_schedule():
    warmup = LinearWarmup(4)
    assert [warmup(n) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LinearWarmup(0)(0) == 1.0


def test_vq_logs_codebook_metrics_and_validation_metrics():
    module = make_module("vq", disc_start=1)
    t = trainer(3, limit_val_batches=1)
    t.fit(module, loader(), val_dataloaders=loader(n=4))
    metrics = t.callback_metrics
    for key in ("train/codebook_loss", "train/perplexity", "train/codebook_usage", "train/rec_loss"):
        assert key in metrics, key
    assert 1.0 <= metrics["train/perplexity"] <= 32
    for key in ("val/loss", "val/rec_loss", "val/psnr"):
        assert torch.isfinite(metrics[key]), key
    # val/loss = NLL + codebook term (no GAN term without gradients)
    assert metrics["val/loss"] >= metrics["val/rec_loss"] * 0.5


def test_kl_logs_and_psnr():
    module = make_module("kl", disc_start=0)
    t = trainer(2)
    t.fit(module, loader())
    for key in (
        "train/rec_loss",
        "train/nll_loss",
        "train/kl_loss",
        "train/g_loss",
        "train/disc_loss",
        "train/disc_weight",
        "train/logvar",
    ):
        assert key in t.callback_metrics, key
    assert t.callback_metrics["train/disc_weight"] > 0
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.2)  # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    torch.testing.assert_close(psnr(x, y), torch.tensor(20.0))


def test_log_images_and_export(tmp_path):
    module = make_module("vq")
    batch = next(iter(loader(n=4)))
    module.train()
    codebook = module.autoencoder.quantize.embedding.weight.clone()
    images = module.log_images(batch, max_images=3)
    assert set(images) == {"inputs", "reconstructions"}
    assert images["inputs"].shape == images["reconstructions"].shape == (3, 3, 32, 32)
    assert images["reconstructions"].min() >= -1 and images["reconstructions"].max() <= 1
    assert torch.equal(module.autoencoder.quantize.embedding.weight, codebook)  # no codebook update
    assert module.autoencoder.training  # mode restored

    state = module.export_state_dict()
    assert set(state) == set(module.autoencoder.state_dict())
    assert not any(k.startswith(("loss.", "discriminator", "perceptual")) for k in state)
    save_file(state, str(tmp_path / "ae.safetensors"))
    fresh = make_module("vq", seed=7).autoencoder
    fresh.load_state_dict(load_file(str(tmp_path / "ae.safetensors")))
    module.autoencoder.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(module.autoencoder(batch["image"])[0], fresh(batch["image"])[0])


def test_non_finite_loss_names_the_step():
    module = make_module("kl")
    images = synthetic_images(4)
    images[0, 0, 0, 0] = float("nan")
    bad = DataLoader([{"image": img} for img in images], batch_size=4)
    with pytest.raises(FloatingPointError, match="global step 0"):
        trainer(2).fit(module, bad)


def test_hydra_list_betas_become_plain_floats(tmp_path):
    from omegaconf import OmegaConf

    module = make_module("kl", betas=OmegaConf.create([0.5, 0.9]))
    assert module.hparams.betas == (0.5, 0.9) and isinstance(module.hparams.betas, tuple)
