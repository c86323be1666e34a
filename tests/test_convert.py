"""Checkpoint import: LDM key names (generated here, independently of diffusers) -> diffusers
modules with nothing missing, nothing unexpected, nothing dropped silently."""

import os

import pytest
import torch

from engine.errors import UserError
from guidance.multiview import convert
from guidance.multiview import pretrained
from guidance.multiview.openclip import build_openclip, clip_preprocess, tiny_openclip_config
from guidance.multiview.unet import MultiViewUNetConfig, build_unet


# -- an independent generator of LDM names and shapes -------------------------------------

def _linear(p, out, inp, bias=True):
    d = {f"{p}.weight": (out, inp)}
    if bias:
        d[f"{p}.bias"] = (out,)
    return d


def _conv(p, out, inp, k):
    return {f"{p}.weight": (out, inp, k, k), f"{p}.bias": (out,)}


def _norm(p, c):
    return {f"{p}.weight": (c,), f"{p}.bias": (c,)}


def _ldm_resblock(p, cin, cout, temb):
    d = {**_norm(f"{p}.in_layers.0", cin), **_conv(f"{p}.in_layers.2", cout, cin, 3),
         **_linear(f"{p}.emb_layers.1", cout, temb), **_norm(f"{p}.out_layers.0", cout),
         **_conv(f"{p}.out_layers.3", cout, cout, 3)}
    if cin != cout:
        d.update(_conv(f"{p}.skip_connection", cout, cin, 1))
    return d


def _ldm_transformer(p, c, ctx):
    """SpatialTransformer with linear proj_in/out, depth 1, inner dim = c."""
    b = f"{p}.transformer_blocks.0"
    d = {**_norm(f"{p}.norm", c), **_linear(f"{p}.proj_in", c, c),
         **_linear(f"{p}.proj_out", c, c)}
    for attn, kv in (("attn1", c), ("attn2", ctx)):
        d.update(_linear(f"{b}.{attn}.to_q", c, c, bias=False))
        d.update(_linear(f"{b}.{attn}.to_k", c, kv, bias=False))
        d.update(_linear(f"{b}.{attn}.to_v", c, kv, bias=False))
        d.update(_linear(f"{b}.{attn}.to_out.0", c, c))
    d.update(_linear(f"{b}.ff.net.0.proj", 8 * c, c))   # GEGLU: two halves of 4c
    d.update(_linear(f"{b}.ff.net.2", c, 4 * c))
    for i in (1, 2, 3):
        d.update(_norm(f"{b}.norm{i}", c))
    return d


def ldm_unet_shapes(mc, mults, nrb, ctx, cin=4, cout=4, cam=16):
    """MVDream's openaimodel UNet key -> shape (attention at every level but the coarsest)."""
    temb = 4 * mc
    d = {**_linear("time_embed.0", temb, mc), **_linear("time_embed.2", temb, temb),
         **_linear("camera_embed.0", temb, cam), **_linear("camera_embed.2", temb, temb),
         **_conv("input_blocks.0.0", mc, cin, 3)}
    attn_levels = set(range(len(mults) - 1))
    chans, ch, n = [mc], mc, 1
    for level, m in enumerate(mults):
        for _ in range(nrb):
            d.update(_ldm_resblock(f"input_blocks.{n}.0", ch, m * mc, temb))
            ch = m * mc
            if level in attn_levels:
                d.update(_ldm_transformer(f"input_blocks.{n}.1", ch, ctx))
            chans.append(ch)
            n += 1
        if level != len(mults) - 1:
            d.update(_conv(f"input_blocks.{n}.0.op", ch, ch, 3))
            chans.append(ch)
            n += 1
    d.update(_ldm_resblock("middle_block.0", ch, ch, temb))
    d.update(_ldm_transformer("middle_block.1", ch, ctx))
    d.update(_ldm_resblock("middle_block.2", ch, ch, temb))
    n = 0
    for level in reversed(range(len(mults))):
        for i in range(nrb + 1):
            skip = chans.pop()
            d.update(_ldm_resblock(f"output_blocks.{n}.0", ch + skip, mults[level] * mc, temb))
            ch = mults[level] * mc
            j = 1
            if level in attn_levels:
                d.update(_ldm_transformer(f"output_blocks.{n}.1", ch, ctx))
                j = 2
            if level and i == nrb:
                d.update(_conv(f"output_blocks.{n}.{j}.conv", ch, ch, 3))
            n += 1
    d.update(_norm("out.0", mc))
    d.update(_conv("out.2", cout, mc, 3))
    return d


def _vae_resblock(p, cin, cout):
    d = {**_norm(f"{p}.norm1", cin), **_conv(f"{p}.conv1", cout, cin, 3),
         **_norm(f"{p}.norm2", cout), **_conv(f"{p}.conv2", cout, cout, 3)}
    if cin != cout:
        d.update(_conv(f"{p}.nin_shortcut", cout, cin, 1))
    return d


def _vae_attn(p, c):
    d = _norm(f"{p}.norm", c)
    for name in ("q", "k", "v", "proj_out"):
        d.update(_conv(f"{p}.{name}", c, c, 1))
    return d


def ldm_vae_shapes(ch, mults, nrb, z=4):
    """LDM AutoencoderKL (double_z, no attention but in the middle) key -> shape."""
    d = {**_conv("encoder.conv_in", ch, 3, 3)}
    cin = ch
    for i, m in enumerate(mults):
        for j in range(nrb):
            d.update(_vae_resblock(f"encoder.down.{i}.block.{j}", cin, ch * m))
            cin = ch * m
        if i != len(mults) - 1:
            d.update(_conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3))
    for mid in ("encoder", "decoder"):
        c = ch * mults[-1]
        d.update(_vae_resblock(f"{mid}.mid.block_1", c, c))
        d.update(_vae_attn(f"{mid}.mid.attn_1", c))
        d.update(_vae_resblock(f"{mid}.mid.block_2", c, c))
    d.update(_norm("encoder.norm_out", cin))
    d.update(_conv("encoder.conv_out", 2 * z, cin, 3))
    cin = ch * mults[-1]
    d.update(_conv("decoder.conv_in", cin, z, 3))
    for i in reversed(range(len(mults))):
        for j in range(nrb + 1):
            d.update(_vae_resblock(f"decoder.up.{i}.block.{j}", cin, ch * mults[i]))
            cin = ch * mults[i]
        if i != 0:
            d.update(_conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3))
    d.update(_norm("decoder.norm_out", cin))
    d.update(_conv("decoder.conv_out", 3, cin, 3))
    d.update(_conv("quant_conv", 2 * z, 2 * z, 1))
    d.update(_conv("post_quant_conv", z, z, 1))
    return d


def materialise(shapes, prefix="", seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in sorted(shapes.items()):
        if device == "meta":
            out[prefix + k] = torch.empty(s, device="meta", dtype=dtype)
        else:
            out[prefix + k] = (torch.randn(s, generator=g) * 0.05).to(dtype)
    return out


TINY = dict(mc=32, mults=(1, 2), nrb=1, ctx=32)


def tiny_unet_cfg():
    return MultiViewUNetConfig(sample_size=8, in_channels=4, out_channels=4,
                               block_out_channels=[32, 64], layers_per_block=1,
                               attention_head_dim=[2, 4], cross_attention_dim=32,
                               norm_num_groups=8)


def clip_state(kind, seed=3):
    """The released checkpoints' conditioner: the OpenCLIP model minus one tower."""
    clip = build_openclip(tiny_openclip_config(), seed=seed)
    if kind == "image":
        del clip.transformer        # what Isotropic3D's FrozenOpenCLIPImageEmbedder keeps
    else:
        del clip.visual             # what MVDream's FrozenOpenCLIPEmbedder keeps
    return clip, {"cond_stage_model.model." + k: v for k, v in clip.state_dict().items()}


def ldm_checkpoint(kind="image", seed=0, vae=True):
    sd = materialise(ldm_unet_shapes(**TINY), "model.diffusion_model.", seed)
    if vae:
        sd.update(materialise(ldm_vae_shapes(32, (1, 1), 1), "first_stage_model.", seed + 1))
    if kind:
        sd.update(clip_state(kind)[1])
    for name, value in convert.expected_schedule().items():
        sd[name] = value.float()
    return sd


# -- UNet key mapping ---------------------------------------------------------------------

def test_tiny_unet_keys_map_one_to_one_and_load_strictly():
    ldm = materialise(ldm_unet_shapes(**TINY))
    converted, unconsumed = convert.ldm_unet_to_diffusers(ldm, tiny_unet_cfg())
    assert unconsumed == []
    assert len(converted) == len(ldm)
    unet = build_unet(tiny_unet_cfg())
    unet.load_state_dict(converted, strict=True)           # no missing, no unexpected
    sd = unet.state_dict()
    for ldm_key, ours in [
        ("camera_embed.0.weight", "class_embedding.linear_1.weight"),
        ("camera_embed.2.bias", "class_embedding.linear_2.bias"),
        ("time_embed.0.weight", "time_embedding.linear_1.weight"),
        ("time_embed.2.weight", "time_embedding.linear_2.weight"),
        ("input_blocks.0.0.weight", "conv_in.weight"),
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
        ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
         "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        ("input_blocks.2.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
        ("input_blocks.3.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
        ("middle_block.1.proj_in.weight", "mid_block.attentions.0.proj_in.weight"),
        ("middle_block.2.emb_layers.1.weight", "mid_block.resnets.1.time_emb_proj.weight"),
        ("output_blocks.1.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
        ("output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight",
         "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj.weight"),
        ("out.2.weight", "conv_out.weight"),
    ]:
        assert torch.equal(sd[ours], ldm[ldm_key]), (ldm_key, ours)


def test_sd21_base_size_keys_and_shapes_match_without_allocating():
    """Full-size LDM names and shapes (meta tensors: no memory) load strictly into the
    SD 2.1-base multi-view UNet."""
    ldm = materialise(ldm_unet_shapes(mc=320, mults=(1, 2, 4, 4), nrb=2, ctx=1024),
                      device="meta")
    converted, unconsumed = convert.ldm_unet_to_diffusers(ldm, MultiViewUNetConfig.sd21_base())
    assert unconsumed == []
    with torch.device("meta"):
        unet = build_unet(MultiViewUNetConfig.sd21_base())
    unet.load_state_dict(converted, strict=True, assign=True)   # shapes are checked too
    assert len(converted) == len(unet.state_dict()) == len(ldm)
    assert sum(p.numel() for p in unet.parameters()) == 867_572_164
    # with no unet= and no config= (the default), these shapes infer to exactly the preset
    from guidance.multiview.ldm_config import infer_unet_config

    inferred, note = infer_unet_config(ldm)
    assert inferred == MultiViewUNetConfig.sd21_base()
    assert "64-channel heads (SD 2.x convention with linear projections: heads " \
        "[5, 10, 20, 20])" in note


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RUN_SLOW"), reason="6.5 GB peak, ~70 s; set RUN_SLOW=1")
def test_sd21_base_size_real_tensors_fp16():
    ldm = materialise(ldm_unet_shapes(mc=320, mults=(1, 2, 4, 4), nrb=2, ctx=1024),
                      "model.diffusion_model.", dtype=torch.float16)
    model, report = convert.convert_state_dict(ldm, unet="sd21-base", allow_missing=True)
    assert report.missing == {"unet": [], "vae": ["first_stage_model.* (the whole autoencoder)"]}
    assert not any(report.unexpected.values())
    assert report.unknown == []
    x = torch.randn(4, 4, 32, 32)
    with torch.no_grad():
        eps = model.to(torch.float32).predict_noise(
            x, torch.full((4,), 500), torch.zeros(4, 1, 1024), torch.zeros(4, 16), 4)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_unknown_and_unconsumed_keys_are_reported_not_dropped():
    sd = ldm_checkpoint()
    sd["model.diffusion_model.extra_head.weight"] = torch.zeros(2)
    sd["first_stage_model.encoder.extra.weight"] = torch.zeros(2)
    sd["some_other_thing"] = torch.zeros(3)
    sd["model_ema.decay"] = torch.tensor(0.999)
    model, report = convert.convert_state_dict(sd, unet=tiny_unet_cfg(),
                                               clip=tiny_openclip_config())
    assert model is not None
    assert {"some_other_thing", "model.diffusion_model.extra_head.weight",
            "first_stage_model.encoder.extra.weight"} <= set(report.unknown)
    assert report.ignored["EMA copies (model_ema.*)"] == ["model_ema.decay"]
    summary = report.summary()
    assert "some_other_thing" in summary and "extra_head" in summary


def test_missing_unet_key_fails_unless_allowed(tmp_path, capsys):
    sd = ldm_checkpoint()
    del sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    src = tmp_path / "broken.ckpt"
    torch.save(sd, src)
    out = tmp_path / "out"
    args = [str(src), str(out), f"unet={_unet_json(tmp_path)}", f"clip={_clip_json(tmp_path)}"]
    assert convert.main(args) == 2
    err = capsys.readouterr()
    assert "MISSING unet: 1: down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" \
        in err.out
    assert err.err.startswith("error: ") and err.err.count("\n") == 1
    assert "allow_missing=true" in err.err
    assert not (out / "engine_model.json").exists()
    assert convert.main(args + ["allow_missing=true"]) == 0
    assert (out / "engine_model.json").exists()


def test_convert_command_line_mistakes_are_one_line(tmp_path, capsys):
    assert convert.main(["--help"]) == 0
    assert "unet=sd21-base" in capsys.readouterr().out
    for argv, words in (([str(tmp_path / "a.ckpt")], "missing OUT"),
                        ([str(tmp_path / "a.ckpt"), str(tmp_path / "o"), "--unet", "x"],
                         "unknown option --unet"),
                        ([str(tmp_path / "a.ckpt"), str(tmp_path / "o"), "dtype=fp64"],
                         "dtype: 'fp64' is not one of"),
                        ([str(tmp_path / "a.ckpt"), str(tmp_path / "o")], "not found")):
        assert convert.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err


def _unet_json(tmp_path):
    import json

    p = tmp_path / "unet.json"
    p.write_text(json.dumps(tiny_unet_cfg().to_dict()))
    return p


def _clip_json(tmp_path):
    import json

    p = tmp_path / "clip.json"
    p.write_text(json.dumps({"model_cfg": tiny_openclip_config()}))
    return p


# -- VAE, conditioner, schedule ------------------------------------------------------------

def test_tiny_vae_keys_map_and_load_strictly():
    from diffusers import AutoencoderKL

    ldm = materialise(ldm_vae_shapes(32, (1, 2), 1))
    config = convert.infer_vae_config(ldm)
    assert config["block_out_channels"] == [32, 64] and config["layers_per_block"] == 1
    converted, unconsumed = convert.ldm_vae_to_diffusers(ldm, config)
    assert unconsumed == []
    vae = AutoencoderKL(**config)
    vae.load_state_dict(converted, strict=True)
    sd = vae.state_dict()
    assert torch.equal(sd["encoder.mid_block.attentions.0.to_q.weight"],
                       ldm["encoder.mid.attn_1.q.weight"][:, :, 0, 0])
    # LDM numbers decoder levels finest-first, diffusers coarsest-first
    assert torch.equal(sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"],
                       ldm["decoder.up.0.block.0.nin_shortcut.weight"])
    assert torch.equal(sd["decoder.up_blocks.0.upsamplers.0.conv.weight"],
                       ldm["decoder.up.1.upsample.conv.weight"])
    assert torch.equal(sd["quant_conv.weight"], ldm["quant_conv.weight"])


def test_schedule_buffers_checked():
    good = {k: v.float() for k, v in convert.expected_schedule().items()}
    assert convert.check_schedule(good) == []
    bad = dict(good, betas=torch.linspace(1e-4, 2e-2, 1000))
    msgs = convert.check_schedule(bad)
    assert len(msgs) == 1 and msgs[0].startswith("betas differs")


@pytest.mark.parametrize("kind", ["image", "text"])
def test_checkpoint_file_converts_end_to_end(tmp_path, kind):
    sd = ldm_checkpoint(kind)
    src = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, src)    # Lightning-style wrapper
    out = tmp_path / "converted"
    report = convert.convert_file(src, out, unet=tiny_unet_cfg(), clip=tiny_openclip_config(),
                                  echo=False)
    assert report.unknown == [] and not report.has_missing() and report.schedule == []
    assert not any(report.unexpected.values())
    from guidance.multiview.model import MultiViewDiffusionModel

    model = MultiViewDiffusionModel.from_pretrained(out)
    assert model.info.conditioning == kind
    assert model.info.camera_convention == ("isotropic3d-release" if kind == "image"
                                            else "mvdream")
    assert model.info.space == "latent" and model.info.image_size == 16
    assert torch.equal(model.unet.state_dict()["class_embedding.linear_1.weight"],
                       sd["model.diffusion_model.camera_embed.0.weight"])
    clip, _ = clip_state(kind)
    with torch.no_grad():
        if kind == "image":
            rgb = torch.rand(2, 3, 32, 32)
            assert torch.allclose(model.embed_image(rgb)[:, 0],
                                  clip.eval().visual(clip_preprocess(rgb, 32)), atol=1e-6)
        else:
            assert model.embed_text(["a cat"]).shape == (1, 77, 32)
        x = torch.randn(4, 4, 8, 8)
        eps = model.predict_noise(x, torch.full((4,), 10), model.unconditional_context(4),
                                  torch.zeros(4, 16), 4)
    assert torch.isfinite(eps).all()
    files = [p.name for p in out.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pth"))]


# -- safe loading ----------------------------------------------------------------------------

class Payload:
    """Anything that is not a tensor: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_is_read_with_weights_only(tmp_path, monkeypatch):
    src = tmp_path / "plain.pt"
    torch.save({"model.diffusion_model.out.2.bias": torch.ones(3)}, src)
    seen = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    sd = convert.load_checkpoint(src)
    assert torch.equal(sd["model.diffusion_model.out.2.bias"], torch.ones(3))
    assert seen and all(k.get("weights_only") is True for k in seen)


def test_pickle_with_objects_is_refused(tmp_path, capsys):
    src = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "obj": Payload()}, src)
    with pytest.raises(UserError, match="refusing to unpickle") as err:
        convert.load_checkpoint(src)
    assert "\n" not in str(err.value)
    assert "this must never run" not in capsys.readouterr().out
    with pytest.raises(UserError, match="not found"):
        convert.load_checkpoint(tmp_path / "absent.ckpt")


# -- the single loading entry ---------------------------------------------------------------

def test_raw_checkpoint_is_converted_once_next_to_it(tmp_path, monkeypatch):
    src = tmp_path / "tiny.ckpt"
    torch.save(ldm_checkpoint("image"), src)
    calls = []
    real = convert.convert_file

    def counting(*a, **k):
        calls.append(a[0])
        return real(*a, **dict(k, unet=tiny_unet_cfg(), clip=tiny_openclip_config(), echo=False))

    monkeypatch.setattr(convert, "convert_file", counting)
    pretrained.check_available(str(src))
    a = pretrained.load_multiview_model(str(src))
    b = pretrained.load_multiview_model(str(src), convention="mvdream")
    assert len(calls) == 1 and (tmp_path / "tiny.engine" / "engine_model.json").is_file()
    assert a.info.camera_convention == "isotropic3d-release"
    assert b.info.camera_convention == "mvdream"
    os.utime(src, (1, 1))                                  # the source changed: convert again
    pretrained.load_multiview_model(str(src))
    assert len(calls) == 2
    folder_model = pretrained.load_multiview_model(str(tmp_path / "tiny.engine"))
    x = torch.randn(4, 4, 8, 8)
    ctx, cam = torch.zeros(4, 1, 32), torch.zeros(4, 16)
    with torch.no_grad():
        assert torch.equal(a.predict_noise(x, torch.full((4,), 9), ctx, cam, 4),
                           folder_model.predict_noise(x, torch.full((4,), 9), ctx, cam, 4))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_unavailable_models_give_one_line_instructions(offline, tmp_path):
    for call in (pretrained.check_available, pretrained.load_multiview_model):
        with pytest.raises(UserError) as err:
            call("pkunliu/Isotropic3D")
        msg = str(err.value)
        assert "\n" not in msg
        assert "pkunliu/Isotropic3D isotropic3d.ckpt" in msg and "offline" in msg
        assert "stages.<stage>.guidance.model=PATH" in msg
    with pytest.raises(UserError, match="stages.fit.guidance.model=PATH"):
        pretrained.check_available("someone/some-model", key="stages.fit.guidance.model")
    with pytest.raises(UserError, match="not found"):
        pretrained.check_available(str(tmp_path / "nothing.ckpt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="engine_model.json missing"):
        pretrained.check_available(str(empty))


def test_shipped_toy_model_paths_load_from_anywhere(tmp_path, monkeypatch):
    """Recipes name the shipped toy models as models/toy/NAME; they load from any working
    directory (from the installed package data, or the checkout), and a same-named folder
    under the working directory wins."""
    from dataclasses import replace

    import engine.resources
    from guidance.multiview.model import MultiViewDiffusionModel

    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    cfg = replace(tiny_unet_cfg(), in_channels=3, out_channels=3)
    MultiViewDiffusionModel.build_random(cfg, "pixel", seed=0).save_pretrained(
        project / "models" / "toy" / "m")
    elsewhere.mkdir()
    monkeypatch.setattr(engine.resources, "CHECKOUT_ROOT", project)
    monkeypatch.chdir(elsewhere)
    pretrained.check_available("models/toy/m")
    assert pretrained.load_multiview_model("models/toy/m").info.camera_convention == "mvdream"
    with pytest.raises(UserError, match="not found"):
        pretrained.check_available("models/toy/absent")
    MultiViewDiffusionModel.build_random(cfg, "pixel", seed=0,
                                         camera_convention="isotropic3d-release"
                                         ).save_pretrained(elsewhere / "models" / "toy" / "m")
    assert pretrained.load_multiview_model("models/toy/m").info.camera_convention == \
        "isotropic3d-release"
