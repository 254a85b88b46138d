"""Stage-1 loss terms against hand computations: NLL/KL/codebook, adaptive GAN weight, D losses, LPIPS."""

import logging
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.errors import UserError
from ldm.models import lpips as lpips_module
from ldm.models.discriminator import NLayerDiscriminator
from ldm.models.losses import AutoencoderLoss, adaptive_disc_weight, hinge_d_loss, vanilla_d_loss
from ldm.models.lpips import LPIPS
from ldm.modules.distributions import DiagonalGaussianDistribution


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread costs more in barriers than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


class LinearDisc(nn.Module):
    """D(x) = c * x, a fixed discriminator with a gradient we can write down."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * x


def posterior(mean: float, logvar: float, shape=(2, 4, 2, 2)) -> DiagonalGaussianDistribution:
    moments = torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], dim=1)
    return DiagonalGaussianDistribution(moments)


# -- generator loss terms -------------------------------------------------------------------------------
def test_kl_generator_loss_by_hand():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    rec = torch.rand(2, 3, 4, 4) * 2 - 1
    loss_fn = AutoencoderLoss(disc_start=100, perceptual_weight=0.0, kl_weight=0.01, logvar_init=0.5)
    loss, log = loss_fn(x, rec, 0, global_step=0, posterior=posterior(1.0, 0.0))
    # KL per latent element 0.5 * (1 + 1 - 1 - 0) = 0.5, 4*2*2 elements per sample, summed then batch-averaged
    kl = 0.5 * 16
    nll = ((x - rec).abs() / math.exp(0.5) + 0.5).sum() / 2  # summed over pixels, averaged over the batch
    torch.testing.assert_close(log["kl_loss"], torch.tensor(kl))
    torch.testing.assert_close(log["nll_loss"], nll)
    torch.testing.assert_close(loss, nll + 0.01 * kl)
    torch.testing.assert_close(log["rec_loss"], (x - rec).abs().mean())
    assert log["g_loss"] == 0 and log["disc_weight"] == 0 and log["disc_factor"] == 0  # before disc_start
    assert "p_loss" not in log and loss_fn.perceptual_loss is None


def test_vq_generator_loss_uses_means_and_l2():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4)
    rec = torch.rand(2, 3, 4, 4)
    loss_fn = AutoencoderLoss(disc_start=100, perceptual_weight=0.0, pixel_loss="l2", codebook_weight=2.0)
    loss, log = loss_fn(x, rec, 0, global_step=0, codebook_loss=torch.tensor(0.3))
    torch.testing.assert_close(loss, ((x - rec) ** 2).mean() + 2.0 * 0.3)
    torch.testing.assert_close(log["codebook_loss"], torch.tensor(0.3))
    with pytest.raises(ValueError, match="exactly one"):
        loss_fn(x, rec, 0, 0)


def test_logvar_gradient_moves_towards_the_optimum():
    # d/dlv [r e^{-lv} + lv] = 1 - r e^{-lv}: with mean rec r = 0.5 and lv = 0 the gradient is 0.5 (per pixel)
    x = torch.zeros(1, 3, 2, 2)
    rec = torch.full((1, 3, 2, 2), 0.5)
    loss_fn = AutoencoderLoss(disc_start=100, perceptual_weight=0.0, codebook_weight=0.0)
    loss, _ = loss_fn(x, rec, 0, 0, codebook_loss=torch.tensor(0.0))
    loss.backward()
    torch.testing.assert_close(loss_fn.logvar.grad, torch.tensor(0.5))


def test_generator_gan_term_and_adaptive_weight_by_hand():
    # reconstruction = w * a with w the "last layer"; D(x) = c * x
    a = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 1, 2, 2).expand(2, 3, 2, 2).contiguous()
    x = torch.zeros(2, 3, 2, 2)
    w = torch.tensor(0.7, requires_grad=True)
    c = 0.4
    loss_fn = AutoencoderLoss(
        disc_start=5, perceptual_weight=0.0, kl_weight=0.0, disc_weight=0.5, discriminator=LinearDisc(c)
    )
    loss, log = loss_fn(x, w * a, 0, global_step=5, posterior=posterior(0.0, 0.0), last_layer=w)
    # nll = sum|w a| / B  -> d/dw = sum|a| / B ;  g = -mean(c w a) -> d/dw = -c mean(a)
    grad_nll = a.abs().sum().item() / 2
    grad_g = -c * a.mean().item()
    expected_weight = grad_nll / (abs(grad_g) + 1e-4) * 0.5
    g_loss = -c * 0.7 * a.mean().item()
    torch.testing.assert_close(log["disc_weight"], torch.tensor(expected_weight))
    torch.testing.assert_close(log["g_loss"], torch.tensor(g_loss))
    nll = 0.7 * a.abs().sum().item() / 2
    torch.testing.assert_close(loss, torch.tensor(nll + expected_weight * 1.0 * g_loss))
    assert log["disc_factor"] == 1.0


def test_adaptive_weight_is_clamped():
    w = torch.tensor(1.0, requires_grad=True)
    nll = 1e6 * w  # gradient 1e6
    g_loss = 0.0 * w  # gradient 0 -> 1e6 / 1e-4 = 1e10 -> clamped
    torch.testing.assert_close(adaptive_disc_weight(nll, g_loss, w), torch.tensor(1e4))
    torch.testing.assert_close(adaptive_disc_weight(2.0 * w, -4.0 * w, w), torch.tensor(2.0 / (4.0 + 1e-4)))


def test_validation_without_gradients_skips_the_gan_term():
    x = torch.zeros(1, 3, 8, 8)
    rec = torch.full((1, 3, 8, 8), 0.1)
    loss_fn = AutoencoderLoss(disc_start=0, perceptual_weight=0.0, kl_weight=0.0)
    with torch.no_grad():
        loss, log = loss_fn(x, rec, 0, 10, posterior=posterior(0.0, 0.0, (1, 4, 1, 1)))
    torch.testing.assert_close(loss, log["nll_loss"])
    assert log["disc_weight"] == 0


# -- discriminator losses -------------------------------------------------------------------------------
def test_hinge_and_vanilla_values():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-3.0, 0.0])
    # hinge: 0.5 * (mean(relu(1 - [2, .5])) + mean(relu(1 + [-3, 0]))) = 0.5 * (0.25 + 0.5)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.375))
    vanilla = 0.5 * ((softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-3.0) + softplus(0.0)) / 2)
    torch.testing.assert_close(vanilla_d_loss(real, fake), torch.tensor(vanilla))


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_starts_at_disc_start(kind):
    x = torch.full((1, 1, 1, 1), 0.5)
    rec = torch.full((1, 1, 1, 1), -0.5, requires_grad=True)
    loss_fn = AutoencoderLoss(
        disc_start=3, perceptual_weight=0.0, disc_loss=kind, disc_factor=2.0, discriminator=LinearDisc(1.0)
    )
    before, _ = loss_fn(x, rec, 1, global_step=2)
    after, log = loss_fn(x, rec, 1, global_step=3)
    expected = (hinge_d_loss if kind == "hinge" else vanilla_d_loss)(torch.tensor(0.5), torch.tensor(-0.5))
    assert before.item() == 0.0
    torch.testing.assert_close(after, 2.0 * expected)
    assert expected.item() > 0.3
    torch.testing.assert_close(log["logits_real"], torch.tensor(0.5))
    after.backward()
    assert rec.grad is None  # the discriminator loss never reaches the generator


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="pixel_loss"):
        AutoencoderLoss(pixel_loss="l3", perceptual_weight=0.0)
    with pytest.raises(UserError, match="disc_loss"):
        AutoencoderLoss(disc_loss="wgan", perceptual_weight=0.0)


# -- PatchGAN -------------------------------------------------------------------------------------------
def test_patchgan_shapes_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(input_nc=3, ndf=4, n_layers=3)
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix's 70x70 PatchGAN
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    names = [n for n, _ in disc.named_parameters()]
    assert names[:3] == ["main.0.weight", "main.0.bias", "main.2.weight"]  # taming layout
    convs = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, nn.Conv2d)])
    assert abs(convs.std().item() - 0.02) < 0.002 and abs(convs.mean().item()) < 0.002
    bn = disc.main[3]
    assert isinstance(bn, nn.BatchNorm2d) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


# -- LPIPS ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPS()


def test_lpips_is_a_distance_and_frozen(random_lpips):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    d_xy = random_lpips(x, y)
    assert d_xy.shape == (2, 1, 1, 1)
    assert (d_xy > 0).all()
    torch.testing.assert_close(random_lpips(x, x), torch.zeros(2, 1, 1, 1))
    torch.testing.assert_close(d_xy, random_lpips(y, x))
    assert not any(p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training  # stays in eval mode


def test_lpips_warns_when_weights_are_random(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.models.lpips"):
        LPIPS()
    assert "random VGG16 weights" in caplog.text and "NOT a perceptual metric" in caplog.text


def test_lpips_loads_torchvision_vgg_and_lin_weights(tmp_path, random_lpips, caplog):
    torch.manual_seed(2)
    # a torchvision-format VGG16 state dict (features.N.*, plus classifier weights that are ignored)
    vgg = {}
    for name, value in random_lpips.net.state_dict().items():
        index = name.split(".", 1)[1]
        vgg[f"features.{index}"] = torch.randn_like(value) * 0.05
    vgg["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(vgg, tmp_path / "vgg16.pth")
    lins = {f"lin{k}.model.1.weight": torch.rand(1, ch, 1, 1) for k, ch in enumerate(lpips_module.CHANNELS)}
    save_file(lins, str(tmp_path / "lin.safetensors"))
    with caplog.at_level(logging.WARNING, logger="ldm.models.lpips"):
        loaded = LPIPS(vgg_weights=str(tmp_path / "vgg16.pth"), lin_weights=str(tmp_path / "lin.safetensors"))
    assert "random" not in caplog.text
    state = loaded.state_dict()
    torch.testing.assert_close(state["net.slice1.0.weight"], vgg["features.0.weight"])
    torch.testing.assert_close(state["net.slice3.14.bias"], vgg["features.14.bias"])
    torch.testing.assert_close(state["net.slice5.28.weight"], vgg["features.28.weight"])
    torch.testing.assert_close(state["lin4.model.1.weight"], lins["lin4.model.1.weight"])
    # a full LPIPS state dict in our layout can be given alone (as lin_weights) and reproduces the outputs
    save_file(loaded.state_dict(), str(tmp_path / "lpips_full.safetensors"))
    again = LPIPS(lin_weights=str(tmp_path / "lpips_full.safetensors"))
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(x, y), again(x, y))
    with pytest.raises(UserError, match="lin_weights"):
        LPIPS(lin_weights=str(tmp_path / "vgg16.pth"))


def test_lpips_downloads_only_explicit_urls(tmp_path, monkeypatch, random_lpips):
    calls = []
    lins = {f"lin{k}.model.1.weight": torch.ones(1, ch, 1, 1) for k, ch in enumerate(lpips_module.CHANNELS)}
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def fake_download(url, dst, progress=True):
        calls.append(url)
        torch.save(lins, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    LPIPS()  # nothing given: nothing fetched
    assert calls == []
    LPIPS(lin_weights="https://example.org/weights/v0.1/vgg.pth")
    assert calls == ["https://example.org/weights/v0.1/vgg.pth"]
    LPIPS(lin_weights="https://example.org/weights/v0.1/vgg.pth")  # cached by torch.hub's folder
    assert len(calls) == 1


def test_perceptual_term_enters_the_nll(random_lpips):
    torch.manual_seed(3)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    rec = torch.rand(1, 3, 32, 32) * 2 - 1
    loss_fn = AutoencoderLoss(disc_start=100, perceptual_weight=0.5, perceptual_loss=random_lpips)
    loss, log = loss_fn(x, rec, 0, 0, codebook_loss=torch.tensor(0.0))
    p = random_lpips(x, rec)
    torch.testing.assert_close(log["p_loss"], p.mean())
    torch.testing.assert_close(loss, ((x - rec).abs() + 0.5 * p).mean())
