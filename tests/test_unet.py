"""UNetModel: parity with the CompVis code, SD v1 names/shapes, conditioning, checkpointing, shapes."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm.errors import UserError
from ldm.modules.attention import AttentionBlock, SpatialTransformer
from ldm.modules.embeddings import timestep_embedding
from ldm.modules.unet import UNetModel

PREFIX = "model.diffusion_model."
# The reference tiny model's structure (sd_v1_tiny.safetensors metadata), random weights.
TINY = dict(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=[2, 1],
    channel_mult=[1, 2],
    num_heads=4,
    context_dim=16,
)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with noise: zero-initialised output convs would hide any dependence."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def test_parity_with_compvis_reference(reference_dir):
    path = reference_dir / "sd_v1_tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["unet"])
    tensors = load_file(str(path))
    model = UNetModel.from_compvis_config(config).eval()
    weights = {k[len(PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(PREFIX)}
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        eps = model(tensors["io.x"], tensors["io.t"], tensors["io.context"])
    assert eps.abs().max() > 0.1  # a real prediction, not the zero-initialised output
    torch.testing.assert_close(eps, tensors["io.eps"], rtol=1e-5, atol=1e-5)
    # Fractional timesteps (DPM-Solver) are accepted and move the output continuously.
    with torch.no_grad():
        eps_frac = model(tensors["io.x"], tensors["io.t"].double() + 1e-3, tensors["io.context"])
    assert 0 < (eps_frac - eps).abs().max() < 1e-2


def test_sd_v1_names_and_shapes_match_compvis(reference_dir):
    keys = json.loads((reference_dir / "sd_v1_keys.json").read_text())
    expected = {k[len(PREFIX) :]: tuple(s) for k, s in keys["keys"].items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        model = UNetModel(
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=[4, 2, 1],
            num_res_blocks=2,
            channel_mult=[1, 2, 4, 4],
            num_heads=8,
            transformer_depth=1,
            context_dim=768,
            legacy=False,
        )
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert sum(p.numel() for p in model.parameters()) == keys["params"]["unet"] == 859_520_964


def test_class_label_changes_output_and_is_required():
    model = randomized(UNetModel(**TINY, num_classes=10))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 5, 16)
    with torch.no_grad():
        out_a = model(x, t, ctx, y=torch.tensor([1, 2]))
        out_b = model(x, t, ctx, y=torch.tensor([1, 7]))
    torch.testing.assert_close(out_a[0], out_b[0])  # same label, same sample
    assert (out_a[1] - out_b[1]).abs().mean() > 1e-3 * out_a[1].abs().mean()
    assert model.label_emb.weight.shape == (10, 4 * 32)
    with pytest.raises(ValueError, match="num_classes"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="context"):
        model(x, t, y=torch.tensor([1, 2]))


def test_pooled_context_reaches_the_time_embedding():
    # Imagen-style pooled text: the MLP of the context's mean is added to the timestep embedding.
    model = randomized(UNetModel(**TINY, pooled_context=True))
    plain = UNetModel(**TINY)
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra == {
        "context_emb.0.weight",
        "context_emb.0.bias",
        "context_emb.2.weight",
        "context_emb.2.bias",
    }
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 16)
    t_emb = timestep_embedding(t, 32)
    expected = model.time_embed(t_emb) + model.context_emb(ctx.mean(1))
    seen = {}
    hook = model.input_blocks[1][0].register_forward_hook(lambda m, args, out: seen.update(emb=args[1]))
    with torch.no_grad():
        out = model(x, t, ctx)
        model.context_emb[2].bias.add_(1.0)  # only the pooled path changes
        out_shifted = model(x, t, ctx)
    hook.remove()
    torch.testing.assert_close(seen["emb"], expected + 1.0)
    assert (out - out_shifted).abs().mean() > 1e-3 * out.abs().mean()
    with pytest.raises(UserError, match="pooled_context"):
        UNetModel(**{**TINY, "context_dim": None}, pooled_context=True)


def test_concatenated_conditioning_channels():
    # Inpainting layout: noisy latent (4) + mask (1) + masked-image latent (4) -> 4 output channels.
    model = randomized(UNetModel(**{**TINY, "in_channels": 9}))
    latent, mask, masked = torch.randn(1, 4, 8, 8), torch.ones(1, 1, 8, 8), torch.randn(1, 4, 8, 8)
    t, ctx = torch.tensor([250]), torch.randn(1, 3, 16)
    with torch.no_grad():
        out = model(torch.cat([latent, mask, masked], 1), t, ctx)
        out_other = model(torch.cat([latent, mask, masked + 1], 1), t, ctx)
    assert out.shape == (1, 4, 8, 8)
    assert model.input_blocks[0][0].weight.shape == (32, 9, 3, 3)
    assert (out - out_other).abs().mean() > 1e-3 * out.abs().mean()


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    plain = randomized(UNetModel(**TINY)).train()
    ckpt = UNetModel(**TINY, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.5, 999.0]), torch.randn(2, 5, 16)
    target = torch.randn(2, 4, 8, 8)
    grads = []
    for model in (plain, ckpt):
        loss = torch.nn.functional.mse_loss(model(x, t, ctx), target)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in grads[0].values()) > 0


@pytest.mark.parametrize("shape", [(1, 4, 16, 24), (1, 4, 10, 14)])
def test_output_shape_non_square_batch_one(shape):
    model = randomized(UNetModel(**{**TINY, "channel_mult": [1, 2, 2]}))  # two downsamplings
    with torch.no_grad():
        out = model(torch.randn(shape), torch.tensor(500), torch.randn(1, 4, 16))  # scalar timestep too
    assert out.shape == shape
    assert torch.isfinite(out).all()


def test_linear_projection_equals_conv_projection():
    # SD v2 (linear proj_in/proj_out) is the same map as SD v1's 1x1 convs with reshaped weights.
    conv = SpatialTransformer(64, heads=2, dim_head=32, context_dim=16).eval()
    linear = SpatialTransformer(64, heads=2, dim_head=32, context_dim=16, use_linear=True).eval()
    randomized(conv)
    state = {
        k: v.flatten(1) if k.startswith("proj_") and v.ndim == 4 else v for k, v in conv.state_dict().items()
    }
    linear.load_state_dict(state)
    assert linear.proj_in.weight.shape == (64, 64)
    x, ctx = torch.randn(2, 64, 4, 6), torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, ctx), conv(x, ctx), rtol=1e-5, atol=1e-5)


def test_attention_block_matches_compvis_legacy_attention():
    # No context: CompVis AttentionBlock with QKVAttentionLegacy (heads outermost in the qkv channels).
    block = randomized(AttentionBlock(64, heads=4))
    x = torch.randn(2, 64, 3, 5)
    qkv = block.qkv(block.norm(x.flatten(2)))  # (N, 3C, T)
    q, k, v = qkv.reshape(2 * 4, 3 * 16, 15).split(16, dim=1)  # (N*H, C/H, T) each
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(16), dim=-1)
    expected = x + block.proj_out(torch.einsum("bts,bcs->bct", weight, v).reshape(2, 64, 15)).view_as(x)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected.detach(), rtol=1e-5, atol=1e-5)
    model = UNetModel(**{**TINY, "context_dim": None})
    assert "input_blocks.1.1.qkv.weight" in model.state_dict()
    assert model(torch.randn(1, 4, 8, 8), torch.tensor([1])).shape == (1, 4, 8, 8)


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 2.5]), 6)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)])
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(2.5 * freqs), torch.sin(2.5 * freqs)]))
    assert timestep_embedding(torch.tensor([1.0]), 7).shape == (1, 7)


def test_config_mistakes_raise_user_error():
    with pytest.raises(UserError, match="num_heads or num_head_channels"):
        UNetModel(4, 4, 32, 1, [1], channel_mult=[1])
    with pytest.raises(UserError, match="multiple of 32"):
        UNetModel(4, 4, 48, 1, [1], channel_mult=[1], num_heads=4)
    with pytest.raises(UserError, match="dims"):
        UNetModel.from_compvis_config({**TINY, "use_spatial_transformer": True, "dims": 3})
    with pytest.raises(UserError, match="context_dim"):
        UNetModel.from_compvis_config({**TINY, "use_spatial_transformer": False})
