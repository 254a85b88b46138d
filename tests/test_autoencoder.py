"""Stage-1 models: CompVis parity and layout, latent shapes, posterior and vector-quantiser maths."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.errors import UserError
from ldm.models.autoencoder import AutoencoderKL, VQModel
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.quantize import VectorQuantizer

PREFIX = "first_stage_model."


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on 2 shared cores: a second intra-op thread costs more in barriers than it saves."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_ddconfig(levels: int = 2, double_z: bool = True, **overrides) -> dict:
    cfg = dict(
        double_z=double_z,
        z_channels=3,
        resolution=32,
        in_channels=3,
        out_ch=3,
        ch=16,
        ch_mult=[1, 2, 2, 2, 2][:levels],
        num_res_blocks=1,
        attn_resolutions=[16],
        dropout=0.0,
    )
    cfg.update(overrides)
    return cfg


# -- CompVis parity ----------------------------------------------------------------------------------------
def test_matches_compvis_reference_outputs(reference_dir):
    with safe_open(str(reference_dir / "sd_v1_tiny.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["autoencoder"])
        state = {k[len(PREFIX) :]: f.get_tensor(k).float() for k in f.keys() if k.startswith(PREFIX)}
        io = {
            k: f.get_tensor(k) for k in ("io.image", "io.posterior_mean", "io.posterior_logvar", "io.decoded")
        }
    model = AutoencoderKL(**config).eval()
    model.load_state_dict(state, strict=True)  # CompVis names load without renaming
    with torch.no_grad():
        posterior = model.encode(io["io.image"])
        decoded = model.decode(posterior.mean)

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        # ~1e-5 relative to the tensor's scale (float32 conv summation order differs between CPUs)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    close(posterior.mean, io["io.posterior_mean"])
    close(posterior.logvar, io["io.posterior_logvar"])
    close(decoded, io["io.decoded"])
    close(model.encode_latent(io["io.image"]).detach(), io["io.posterior_mean"])


def test_sd_v1_autoencoder_names_and_shapes(reference_dir):
    keys = json.loads((reference_dir / "sd_v1_keys.json").read_text())["keys"]
    expected = {k[len(PREFIX) :]: list(v) for k, v in keys.items() if k.startswith(PREFIX)}
    ddconfig = dict(
        double_z=True,
        z_channels=4,
        resolution=256,
        in_channels=3,
        out_ch=3,
        ch=128,
        ch_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_resolutions=[],
        dropout=0.0,
    )
    with torch.device("meta"):
        model = AutoencoderKL(ddconfig, embed_dim=4)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert model.downsample_factor == 8 and model.latent_channels == 4
    assert model.get_last_layer() is model.decoder.conv_out.weight


# -- shapes and the shared interface --------------------------------------------------------------------
@pytest.mark.parametrize("levels,factor", [(3, 4), (4, 8), (5, 16)])
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_latent_shapes(kind, levels, factor):
    torch.manual_seed(0)
    if kind == "kl":
        model = AutoencoderKL(tiny_ddconfig(levels), embed_dim=4)
    else:
        model = VQModel(tiny_ddconfig(levels, double_z=False), n_embed=32, embed_dim=4)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    assert model.downsample_factor == factor
    with torch.no_grad():
        z = model.encode_latent(x)
        assert z.shape == (1, 4, 32 // factor, 48 // factor)
        assert model.latent_channels == 4
        out = model.decode_latent(z)
        assert out.shape == x.shape
        forward = model(x)
    assert forward[0].shape == x.shape
    if kind == "kl":
        assert isinstance(forward[1], DiagonalGaussianDistribution) and len(forward) == 2
    else:
        dec, qloss, info = forward
        assert qloss.ndim == 0 and info["indices"].shape == (1, 32 // factor, 48 // factor)


def test_kl_encode_latent_sample_and_mode():
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_ddconfig(), embed_dim=4).eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        mode = model.encode_latent(x)
        a = model.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = model.encode_latent(x, sample=True, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(mode.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mode, posterior.mean)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, posterior.mean + posterior.std * noise)


def test_vq_latent_interface_is_prequant_and_decode_quantizes():
    torch.manual_seed(0)
    model = VQModel(tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        h = model.encode_latent(x)
        torch.testing.assert_close(h, model.quant_conv(model.encoder(x)))
        quant, _, info = model.quantize(h)
        torch.testing.assert_close(model.decode_latent(h), model.decode(quant))
        torch.testing.assert_close(model.decode_code(info["indices"]), model.decode(quant))
    names = set(model.state_dict())
    assert {"quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight"} <= names


def test_ddconfig_mistakes_are_user_errors():
    with pytest.raises(UserError, match="num_res_block"):
        bad = tiny_ddconfig()
        bad["num_res_block"] = bad.pop("num_res_blocks")
        AutoencoderKL(bad, embed_dim=4)
    with pytest.raises(UserError, match="double_z=false"):
        VQModel(tiny_ddconfig(double_z=True), n_embed=8, embed_dim=3)
    with pytest.raises(UserError, match="double_z=true"):
        AutoencoderKL(tiny_ddconfig(double_z=False), embed_dim=3)


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_safetensors_round_trip_is_bit_identical(kind, tmp_path):
    torch.manual_seed(0)
    make = {
        "kl": lambda: AutoencoderKL(tiny_ddconfig(), embed_dim=4),
        "vq": lambda: VQModel(tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3, ema_decay=0.9),
    }[kind]
    model = make().eval()
    save_file(model.state_dict(), str(tmp_path / "ae.safetensors"))
    torch.manual_seed(1)  # a differently initialised fresh model
    fresh = make().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "ae.safetensors")), strict=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode_latent(x)
        assert torch.equal(z, fresh.encode_latent(x))
        assert torch.equal(model.decode_latent(z), fresh.decode_latent(z))


# -- DiagonalGaussianDistribution -----------------------------------------------------------------------
def test_posterior_kl_and_nll_closed_form():
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    logvar = torch.tensor([0.0, math.log(4.0), -2.0, 1.0]).view(1, 4, 1, 1)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    # KL(N(m, s^2) || N(0, 1)) = 0.5 * (m^2 + s^2 - 1 - log s^2), summed over dimensions
    expected = sum(
        0.5 * (m * m + math.exp(lv) - 1.0 - lv)
        for m, lv in zip([0.5, -1.0, 2.0, 0.0], [0.0, math.log(4.0), -2.0, 1.0])
    )
    torch.testing.assert_close(dist.kl(), torch.tensor([expected]))
    reference = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(
        dist.kl(), torch.distributions.kl_divergence(reference, prior).sum(dim=(1, 2, 3))
    )
    other = DiagonalGaussianDistribution(torch.cat([mean + 1, logvar - 0.5], dim=1))
    q = torch.distributions.Normal(mean + 1, torch.exp(0.5 * (logvar - 0.5)))
    torch.testing.assert_close(
        dist.kl(other), torch.distributions.kl_divergence(reference, q).sum(dim=(1, 2, 3))
    )
    sample = torch.tensor([1.0, 0.0, -1.0, 3.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(dist.nll(sample), -reference.log_prob(sample).sum(dim=(1, 2, 3)))


def test_posterior_logvar_is_clamped_and_round_trips_from_cache():
    mean = torch.zeros(1, 2, 1, 1)
    logvar = torch.tensor([100.0, -100.0]).view(1, 2, 1, 1)
    dist = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert dist.logvar.flatten().tolist() == [20.0, -30.0]
    assert torch.isfinite(dist.std).all() and torch.isfinite(dist.kl()).all()
    cached = DiagonalGaussianDistribution.from_mean_logvar(dist.mean, dist.logvar)
    torch.testing.assert_close(cached.kl(), dist.kl())


# -- VectorQuantizer ------------------------------------------------------------------------------------
def hand_quantizer(beta: float = 0.25, **kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(n_embed=3, embed_dim=2, beta=beta, **kwargs)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]]))
    if kwargs.get("ema_decay") is not None:
        vq.ema_embed_sum.copy_(vq.embedding.weight)
    return vq


def test_quantizer_commitment_loss_and_straight_through():
    vq = hand_quantizer(beta=0.25)
    # four latent vectors (B=1, C=2, h=2, w=2): nearest codes 0, 1, 2, 1
    vectors = torch.tensor([[0.1, -0.2], [0.8, 1.3], [-1.5, 0.1], [2.0, 2.0]])
    z = vectors.t().reshape(1, 2, 2, 2).clone().requires_grad_(True)
    z_q, loss, info = vq(z)
    assert info["indices"].flatten().tolist() == [0, 1, 2, 1]
    codes = vq.embedding.weight.detach()[[0, 1, 2, 1]]
    torch.testing.assert_close(z_q.detach(), codes.t().reshape(1, 2, 2, 2))
    mse = ((vectors - codes) ** 2).mean()  # 8 elements
    torch.testing.assert_close(loss, (1 + 0.25) * mse)  # codebook term + beta * commitment term
    # straight-through: d(sum z_q * g)/dz = g
    grad = torch.randn_like(z_q)
    (z_q * grad).sum().backward()
    torch.testing.assert_close(z.grad, grad)


def test_quantizer_codebook_gradient_and_commitment_gradient():
    vq = hand_quantizer(beta=0.5)
    z = torch.tensor([[0.75], [0.75]]).reshape(1, 2, 1, 1).requires_grad_(True)  # nearest code 1 (1, 1)
    _, loss, _ = vq(z)
    loss.backward()
    # codebook term mean((e - sg z)^2) over 2 elements: d/de = (e - z); commitment: d/dz = beta * (z - e)
    torch.testing.assert_close(vq.embedding.weight.grad[1], torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(vq.embedding.weight.grad[[0, 2]], torch.zeros(2, 2))
    torch.testing.assert_close(z.grad.flatten(), torch.tensor([-0.125, -0.125]))


def test_perplexity_of_uniform_assignment_equals_codes_used():
    vq = VectorQuantizer(n_embed=8, embed_dim=2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.arange(16, dtype=torch.float32).view(8, 2) * 10)
    for used in (1, 3, 8):
        vectors = vq.embedding.weight.detach()[torch.arange(used).repeat(4)]  # each used code 4 times
        z = vectors.t().reshape(1, 2, 1, -1)
        _, _, info = vq.eval()(z)
        torch.testing.assert_close(info["perplexity"], torch.tensor(float(used)))
        torch.testing.assert_close(info["codebook_usage"], torch.tensor(used / 8))


def test_ema_codebook_update_by_hand():
    vq = hand_quantizer(beta=0.25, ema_decay=0.5, ema_eps=0.0)
    assert not vq.embedding.weight.requires_grad
    vectors = torch.tensor([[0.2, 0.0], [0.0, 0.4], [1.2, 1.0]])  # codes 0, 0, 1; code 2 unused
    z = vectors.t().reshape(1, 2, 1, 3).requires_grad_(True)
    z_q, loss, _ = vq.train()(z)
    old = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    size = 0.5 * torch.ones(3) + 0.5 * torch.tensor([2.0, 1.0, 0.0])
    sums = 0.5 * old + 0.5 * torch.stack([vectors[0] + vectors[1], vectors[2], torch.zeros(2)])
    torch.testing.assert_close(vq.ema_cluster_size, size)
    torch.testing.assert_close(vq.embedding.weight, sums / size[:, None])  # code 2 stays at -2, 0
    # only the commitment term, against the codes used for this step (before the update)
    torch.testing.assert_close(loss, 0.25 * ((vectors - old[[0, 0, 1]]) ** 2).mean())
    before = vq.embedding.weight.clone()
    with torch.no_grad():
        vq(z)  # no gradients: the codebook does not move
    vq.eval()(z.detach())
    assert torch.equal(vq.embedding.weight, before)


def test_dead_codes_restart_on_encoder_outputs():
    torch.manual_seed(0)
    vq = hand_quantizer(restart_dead_codes=True, dead_code_threshold=0.5)  # decay 0.99 by default
    vectors = torch.tensor([[0.1, 0.1], [0.9, 1.1], [0.0, -0.1], [1.1, 0.9]])  # code 2 is never used
    z = vectors.t().reshape(1, 2, 2, 2).requires_grad_(True)
    vq.train()
    for _ in range(68):  # usage of code 2 = 0.99**n: still alive after 68 steps (0.505)
        vq(z)
    assert torch.equal(vq.embedding.weight[2], torch.tensor([-2.0, 0.0]))
    _, loss, _ = vq(z)  # 0.99**69 < 0.5: dead, restarted onto one of this batch's vectors
    new_code = vq.embedding.weight[2].detach()
    assert any(torch.equal(new_code, v) for v in vectors)
    assert vq.code_usage[2] == 1.0
    loss.backward()  # the in-place restart does not break the backward pass
    assert torch.isfinite(z.grad).all()


def test_released_vq_weights_load_into_ema_and_restart_quantizers():
    torch.manual_seed(0)
    plain = VQModel(tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3)
    released = plain.state_dict()  # CompVis names only: no EMA or usage buffers
    ema = VQModel(
        tiny_ddconfig(double_z=False), n_embed=16, embed_dim=3, ema_decay=0.99, restart_dead_codes=True
    )
    ema.load_state_dict(released, strict=True)
    codebook = released["quantize.embedding.weight"]
    assert torch.equal(ema.quantize.embedding.weight, codebook)
    assert torch.equal(ema.quantize.ema_embed_sum, codebook)
    assert torch.equal(ema.quantize.ema_cluster_size, torch.ones(16))
    assert torch.equal(ema.quantize.code_usage, torch.ones(16))
