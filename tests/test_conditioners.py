"""OpenCLIP conditioners: preprocessing, embeddings, the folder format, offline errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import UserError
from guidance.conditioners import OpenCLIPImageConditioner, OpenCLIPTextConditioner
from guidance.multiview.openclip import (CLIP_MEAN, CLIP_STD, build_openclip, clip_preprocess,
                                         save_openclip_folder, tiny_openclip_config)


@pytest.fixture(scope="module")
def clip():
    return build_openclip(tiny_openclip_config(), seed=0).eval()


@pytest.fixture(scope="module")
def full_folder(clip, tmp_path_factory):
    """A complete tiny OpenCLIP model saved in OpenCLIP's folder format."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_openclip_folder(clip, tiny_openclip_config(), folder)
    return folder


def pictures(n=3, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


# -- preprocessing ------------------------------------------------------------------------

def test_constant_picture_is_normalised_exactly():
    rgb = torch.tensor([1.0, 0.5, 0.25]).view(1, 3, 1, 1).expand(2, 3, 50, 50)
    out = clip_preprocess(rgb, 32)
    assert out.shape == (2, 3, 32, 32)
    for c, v in enumerate((1.0, 0.5, 0.25)):
        expected = (v - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(out[:, c], torch.full_like(out[:, c], expected), atol=1e-6)


def test_resize_is_antialiased_bicubic_like_pil():
    a = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC)).astype(np.float32)
    rgb = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    ours = clip_preprocess(rgb, 32)[0].permute(1, 2, 0)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    back = (ours * std + mean).numpy() * 255
    assert np.abs(back - pil).max() < 2.0       # PIL rounds to uint8 between its passes
    plain = F.interpolate(rgb, size=(32, 32), mode="bicubic", align_corners=False)
    plain = plain[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(plain - pil).max() > 10.0     # without antialiasing it would not match


def test_visual_tower_sees_exactly_the_preprocessed_picture(clip):
    cond = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                              tiny_openclip_config())
    seen = []
    handle = cond.clip.visual.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    rgb = pictures(2, 64)
    with torch.no_grad():
        cond(rgb)
    handle.remove()
    assert torch.equal(seen[0], clip_preprocess(rgb, 32))


# -- image embedding ----------------------------------------------------------------------

def test_image_embedding_is_pooled_projection_not_normalised(clip):
    cond = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                              tiny_openclip_config())
    rgb = pictures()
    with torch.no_grad():
        a, b = cond(rgb), cond(rgb)
        ref = clip.visual(clip_preprocess(rgb, 32))
    assert a.shape == (3, 1, 32)
    assert torch.equal(a, b)                                   # deterministic
    assert torch.allclose(a[:, 0], ref, atol=1e-6)
    assert not torch.allclose(a.norm(dim=-1), torch.ones(3, 1), atol=1e-2)
    assert (a[0] - a[1]).abs().max() > 1e-3                    # depends on the picture
    assert torch.equal(cond.unconditional(2), torch.zeros(2, 1, 32))


def test_image_embedding_is_differentiable_wrt_picture(clip):
    cond = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                              tiny_openclip_config())
    rgb = pictures(1).requires_grad_(True)
    cond(rgb).sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in cond.parameters())


def _hand_visual_tokens(visual, x):
    """The tiny ViT written out: patchify, class token + positions, ln_pre, blocks, ln_post;
    every output token through the projection."""
    n = x.shape[0]
    patches = visual.conv1(x).flatten(2).transpose(1, 2)            # [N, P, W]
    cls = visual.class_embedding.view(1, 1, -1).expand(n, 1, -1)
    h = visual.ln_pre(torch.cat([cls, patches], 1) + visual.positional_embedding)
    for block in visual.transformer.resblocks:
        h = block(h)
    return visual.ln_post(h) @ visual.proj                          # [N, 1 + P, D]


def test_patch_tokens_are_the_pooled_token_then_every_projected_patch(clip):
    cond = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                              tiny_openclip_config(), tokens="patches")
    pooled = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                                tiny_openclip_config())
    rgb = pictures()
    with torch.no_grad():
        a = cond(rgb)
        hand = _hand_visual_tokens(clip.visual, clip_preprocess(rgb, 32))
        one = pooled(rgb)
    assert cond.num_tokens == 17 and a.shape == (3, 17, 32)    # 32 px / patch 8: 16 patches
    assert torch.allclose(a, hand, atol=1e-5)
    assert torch.allclose(a[:, :1], one, atol=1e-6)             # token 0 is the pooled context
    assert (a[:, 1] - a[:, 2]).abs().max() > 1e-3               # patches differ from each other
    assert cond.clip.visual.output_tokens is False              # the switch is put back
    assert torch.equal(cond.unconditional(2), torch.zeros(2, 17, 32))
    # a patch token answers mostly to its own patch: repaint the top-left 8 px only
    moved = rgb.clone()
    moved[:, :, :10, :10] = 1.0 - moved[:, :, :10, :10]
    with torch.no_grad():
        change = (cond(moved) - a).norm(dim=-1).mean(0)         # [17]
    assert change[1] > 2 * change[2:].median()
    bad = pictures(1).requires_grad_(True)
    cond(bad)[:, 1:].sum().backward()
    assert bad.grad.abs().sum() > 0


def test_patch_tokens_survive_the_folder_round_trip(tmp_path):
    import json

    from engine.errors import ConfigError

    cond = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=1),
                                              tiny_openclip_config(), tokens="patches")
    cond.save_pretrained(tmp_path / "img")
    back = OpenCLIPImageConditioner.from_pretrained(tmp_path / "img")
    assert back.cfg.tokens == "patches" and back.num_tokens == 17
    rgb = pictures(2)
    with torch.no_grad():
        assert torch.equal(back(rgb), cond(rgb))
    # a folder without the key (OpenCLIP's own, or saved before) is the pooled layout
    config = tmp_path / "img" / "open_clip_config.json"
    data = json.loads(config.read_text())
    del data["engine_image_tokens"]
    config.write_text(json.dumps(data))
    assert OpenCLIPImageConditioner.from_pretrained(tmp_path / "img").num_tokens == 1
    config.write_text(json.dumps(dict(data, engine_image_tokens="grid")))
    with pytest.raises(UserError, match="engine_image_tokens must be one of pooled, patches"):
        OpenCLIPImageConditioner.from_pretrained(tmp_path / "img")
    with pytest.raises(ConfigError, match="tokens: must be one of pooled, patches, got 'all'"):
        OpenCLIPImageConditioner.Config(tokens="all")


# -- text embedding -----------------------------------------------------------------------

def _hand_block(x, blk, heads):
    """One pre-norm residual block written out: causal multi-head attention, GELU MLP."""
    n, length, width = x.shape
    h = F.layer_norm(x, (width,), blk.ln_1.weight, blk.ln_1.bias, blk.ln_1.eps)
    q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.view(n, length, heads, width // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    x = x + att @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    h = F.layer_norm(x, (width,), blk.ln_2.weight, blk.ln_2.bias, blk.ln_2.eps)
    h = F.gelu(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
    return x + h @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias


def test_text_embedding_is_the_penultimate_layer(clip):
    import open_clip

    cond = OpenCLIPTextConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                             tiny_openclip_config())
    texts = ["a red block", ""]
    tokens = open_clip.tokenize(texts)
    with torch.no_grad():
        ours = cond(texts)
        emb = clip.token_embedding(tokens) + clip.positional_embedding
        x = _hand_block(emb, clip.transformer.resblocks[0], heads=2)  # all but the last (of 2)
        ref = F.layer_norm(x, (32,), clip.ln_final.weight, clip.ln_final.bias)
        full = clip.ln_final(clip.transformer(emb, attn_mask=clip.attn_mask))
    assert ours.shape == (2, 77, 32)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert (ours - full).abs().max() > 1e-3       # the last block is really skipped
    assert torch.equal(cond.unconditional(1), cond([""]))


# -- folders and plugins ------------------------------------------------------------------

def test_openclip_loads_our_folder_and_plugin_matches(clip, full_folder):
    import open_clip

    loaded = open_clip.create_model("local-dir:" + str(full_folder)).eval()
    rgb = pictures()
    with torch.no_grad():
        ref = clip.visual(clip_preprocess(rgb, 32))
        assert torch.equal(loaded.visual(clip_preprocess(rgb, 32)), ref)
        for model in (str(full_folder), "local-dir:" + str(full_folder)):
            cond = OpenCLIPImageConditioner(OpenCLIPImageConditioner.Config(model=model))
            assert torch.equal(cond(rgb)[:, 0], ref)
            assert not any(k.startswith("transformer.") for k in cond.clip.state_dict())
        text = OpenCLIPTextConditioner(OpenCLIPTextConditioner.Config(model=str(full_folder)))
        direct = OpenCLIPTextConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                                   tiny_openclip_config())
        assert torch.equal(text(["a cat"]), direct(["a cat"]))


def test_conditioner_folder_round_trip_keeps_one_tower(tmp_path):
    cond = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=1),
                                              tiny_openclip_config())
    cond.save_pretrained(tmp_path / "img")
    back = OpenCLIPImageConditioner.from_pretrained(tmp_path / "img")
    rgb = pictures(2)
    with torch.no_grad():
        assert torch.equal(back(rgb), cond(rgb))
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "img" / "open_clip_model.safetensors")).keys()
    assert keys and all(k.startswith("visual.") for k in keys)
    # the image-only folder cannot feed a text conditioner: one clear line
    with pytest.raises(UserError, match="lack .* text-tower tensors"):
        OpenCLIPTextConditioner.from_pretrained(tmp_path / "img")


def test_registry_names():
    from engine.registry import get

    assert get("conditioner", "openclip-image") is OpenCLIPImageConditioner
    assert get("conditioner", "openclip-text") is OpenCLIPTextConditioner


# -- missing weights ----------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_offline_tag_gives_one_line_instruction(offline):
    with pytest.raises(UserError) as err:
        OpenCLIPImageConditioner(OpenCLIPImageConditioner.Config())
    msg = str(err.value)
    assert "\n" not in msg
    assert "ViT-H-14/laion2b_s32b_b79k are not available offline" in msg
    assert "stages.<stage>.guidance.model" in msg and "download" in msg


def test_offline_hub_id_and_bad_names(offline, tmp_path):
    with pytest.raises(UserError, match="hf-hub:laion/nothing-here is not available"):
        OpenCLIPTextConditioner(OpenCLIPTextConditioner.Config(model="hf-hub:laion/nothing-here"))
    with pytest.raises(UserError, match="did you mean 'laion2b_s32b_b79k'"):
        OpenCLIPImageConditioner(OpenCLIPImageConditioner.Config(pretrained="laion2b_s32b_b7"))
    with pytest.raises(UserError, match="unknown OpenCLIP architecture"):
        OpenCLIPImageConditioner(OpenCLIPImageConditioner.Config(model="ViT-Q-99"))
    with pytest.raises(UserError, match="does not exist"):
        OpenCLIPImageConditioner(OpenCLIPImageConditioner.Config(
            model="local-dir:" + str(tmp_path / "none")))
