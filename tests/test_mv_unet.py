"""The multi-view UNet: camera embedding and joint self-attention on stock diffusers parts."""

import pytest
import torch

from guidance.multiview.unet import MultiViewUNetConfig, build_unet, unet_forward


def tiny_cfg(**kw):
    base = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[16, 32],
                layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=12,
                norm_num_groups=8)
    base.update(kw)
    return MultiViewUNetConfig(**base)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = build_unet(tiny_cfg()).eval()
    # random weights everywhere (diffusers zero-initialises some output layers)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def inputs(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=g), torch.full((n,), 400),
            torch.randn(n, 1, 12, generator=g), torch.randn(n, 16, generator=g))


def test_one_view_is_exactly_stock_diffusers(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    x, t, ctx, cam = inputs()
    stock = build_unet(tiny_cfg()).eval()
    stock.load_state_dict(unet.state_dict())
    stock.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        ours = unet_forward(unet, x, t, ctx, cam, num_views=1)
        ref = stock(x, t, encoder_hidden_states=ctx, class_labels=cam).sample
    assert torch.equal(ours, ref)


def test_views_of_one_object_attend_to_each_other_only(unet):
    x, t, ctx, cam = inputs()
    x2 = x.clone()
    x2[1] += 1.0                                    # change view 1 of object 0
    with torch.no_grad():
        a = unet_forward(unet, x, t, ctx, cam, num_views=4)
        b = unet_forward(unet, x2, t, ctx, cam, num_views=4)
        single_a = unet_forward(unet, x, t, ctx, cam, num_views=1)
        single_b = unet_forward(unet, x2, t, ctx, cam, num_views=1)
    assert (a[0] - b[0]).abs().max() > 1e-4        # view 0 sees view 1 through attn1
    assert torch.equal(a[4:], b[4:])                # object 1 is untouched
    assert torch.equal(single_a[0], single_b[0])    # per view: no cross-talk


def test_objects_are_independent_and_order_equivariant(unet):
    x, t, ctx, cam = inputs()
    perm = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    with torch.no_grad():
        a = unet_forward(unet, x, t, ctx, cam, num_views=4)
        b = unet_forward(unet, x[perm], t, ctx[perm], cam[perm], num_views=4)
    torch.testing.assert_close(b, a[perm], rtol=1e-5, atol=1e-5)


def test_camera_changes_the_prediction_and_gets_gradients(unet):
    x, t, ctx, cam = inputs(4)
    cam = cam.clone().requires_grad_(True)
    out = unet_forward(unet, x, t, ctx, cam, num_views=4)
    out.square().mean().backward()
    assert cam.grad is not None and cam.grad.abs().sum() > 0
    assert "class_embedding.linear_1.weight" in unet.state_dict()
    assert unet.class_embedding.linear_1.in_features == 16


def test_batch_must_be_whole_groups(unet):
    x, t, ctx, cam = inputs(6)
    with pytest.raises(ValueError, match="whole number of 4-view groups"):
        unet_forward(unet, x, t, ctx, cam, num_views=4)


def test_sd21_base_configuration_matches_mvdream():
    kw = MultiViewUNetConfig.sd21_base().diffusers_kwargs()
    assert kw["block_out_channels"] == (320, 640, 1280, 1280)
    assert kw["attention_head_dim"] == (5, 10, 20, 20) and kw["cross_attention_dim"] == 1024
    assert kw["flip_sin_to_cos"] and kw["freq_shift"] == 0 and kw["use_linear_projection"]
    assert kw["class_embed_type"] == "projection"
    assert kw["projection_class_embeddings_input_dim"] == 16


def test_attention_levels_choose_where_views_attend():
    default = tiny_cfg(block_out_channels=[16, 32, 32], attention_head_dim=[2, 4, 4])
    assert default.diffusers_kwargs()["down_block_types"] == (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    coarse = tiny_cfg(block_out_channels=[16, 32, 32], attention_head_dim=[2, 4, 4],
                      attention_levels=[False, True, False])
    kw = coarse.diffusers_kwargs()
    assert kw["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert kw["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    # the coarse-only network still mixes the views: changing one view moves the others
    torch.manual_seed(0)
    net = build_unet(coarse).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    x, t, ctx, cam = inputs(4)
    with torch.no_grad():
        a = unet_forward(net, x, t, ctx, cam, num_views=4)
        x2 = x.clone()
        x2[3] += 1.0
        b = unet_forward(net, x2, t, ctx, cam, num_views=4)
    assert (a[0] - b[0]).abs().max() > 1e-4
    with pytest.raises(Exception, match="attention_levels"):
        tiny_cfg(attention_levels=[True])
    with pytest.raises(Exception, match="at least one level"):
        tiny_cfg(attention_levels=[False, False])
