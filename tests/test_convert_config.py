"""Conversion reads the release's own LDM config (config=) or infers the UNet from the tensors.

Expected outputs come from tests/ldm_reference_unet.py, an independent implementation of
MVDream's original MultiViewUNetModel in LDM naming (no diffusers): tiny checkpoints of both
released styles (sd-v1: 1x1-conv projections, num_heads; sd-v2: linear projections,
num_head_channels) and a fine-tune style, each with its YAML in the original format, are
converted with and without the YAML and must give the reference's outputs.
"""

import functools
import json

import pytest
import torch
import yaml

from engine.errors import ConfigError, UserError
from guidance.multiview import convert
from guidance.multiview.ldm_config import infer_unet_config, read_ldm_config
from guidance.multiview.openclip import tiny_openclip_config
from guidance.multiview.unet import MultiViewUNetConfig
from ldm_reference_unet import ReferenceUNet, randomise
from test_convert import TINY, clip_state, ldm_unet_shapes, ldm_vae_shapes, materialise

UNET_TARGET = "mvdream.ldm.modules.diffusionmodules.openaimodel.MultiViewUNetModel"
COND = "mvdream.ldm.modules.encoders.modules."
COMMON = dict(image_size=32, in_channels=4, out_channels=4, num_res_blocks=1,
              use_spatial_transformer=True, use_checkpoint=False, camera_dim=16)
STYLES = {
    # MVDream sd-v1.yaml, shrunk: 8 heads a level, 1x1-conv projections, CLIP-L text encoder
    "sd-v1": dict(unet=dict(COMMON, model_channels=32, channel_mult=[1, 2, 2],
                            attention_resolutions=[2, 1], num_heads=8, transformer_depth=1,
                            context_dim=24, legacy=False),
                  cond={"target": COND + "FrozenCLIPEmbedder"}),
    # MVDream sd-v2-base.yaml, shrunk: 64-channel heads, linear projections, OpenCLIP text
    "sd-v2": dict(unet=dict(COMMON, model_channels=64, channel_mult=[1, 2, 2],
                            attention_resolutions=[2, 1], num_head_channels=64,
                            use_linear_in_transformer=True, transformer_depth=1,
                            context_dim=32, legacy=False),
                  cond={"target": COND + "FrozenOpenCLIPEmbedder",
                        "params": {"freeze": True, "layer": "penultimate"}}),
    # a fine-tune: 16-channel heads (not inferable), depth 2, attention at one level only,
    # v prediction, another schedule and latent scale
    "finetune": dict(unet=dict(COMMON, model_channels=32, channel_mult=[1, 2, 2],
                               attention_resolutions=[2], num_head_channels=16,
                               use_linear_in_transformer=True, transformer_depth=2,
                               context_dim=24, legacy=True),
                     model=dict(parameterization="v", linear_end=0.02, scale_factor=0.13025)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one thread beats contending for the shared cores (the
    reference's forward: 0.1 s on one thread, 0.6-1.6 s on two of a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ldm_yaml(style: str, **changes) -> dict:
    """The style's LDM model config as the YAML holds it (model.params...)."""
    spec = STYLES[style]
    params = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, scale_factor=0.18215,
                  parameterization="eps", unet_config={"target": UNET_TARGET,
                                                       "params": dict(spec["unet"])})
    params.update(spec.get("model", {}))
    params["first_stage_config"] = {
        "target": "mvdream.ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
            "out_ch": 3, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1,
            "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}}
    if "cond" in spec:
        params["cond_stage_config"] = json.loads(json.dumps(spec["cond"]))
    data = {"model": {"target": "mvdream.ldm.interface.LatentDiffusionInterface",
                      "params": params}}
    for dotted, value in changes.items():           # "unet.num_heads": 3, "model.x": ...
        where, key = dotted.split(".", 1)
        node = {"unet": params["unet_config"]["params"], "model": params,
                "vae": params["first_stage_config"]["params"]["ddconfig"],
                "cond": params.get("cond_stage_config", {}).setdefault("params", {})}[where]
        if value is None:
            node.pop(key, None)
        else:
            node[key] = value
    return data


def write_yaml(folder, data, name="model.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def hf_clip_text_state():
    """A few tensors named like MVDream sd-v1.5's FrozenCLIPEmbedder (CLIPTextModel)."""
    base = "cond_stage_model.transformer.text_model."
    return {base + "embeddings.token_embedding.weight": torch.randn(10, 24),
            base + "embeddings.position_embedding.weight": torch.randn(77, 24),
            base + "encoder.layers.0.self_attn.q_proj.weight": torch.randn(24, 24),
            base + "final_layer_norm.weight": torch.ones(24)}


def checkpoint(style: str):
    """(reference UNet, LDM state dict of the whole model) for a style (a fresh dict over
    tensors made once per style)."""
    ref, sd = _original(style)
    return ref, dict(sd)


@functools.lru_cache(maxsize=None)
def _original(style: str, seed: int = 0):
    spec = STYLES[style]
    ref = randomise(ReferenceUNet(**spec["unet"]), seed).eval()
    sd = {"model.diffusion_model." + k: v.detach().clone() for k, v in ref.state_dict().items()}
    sd.update(materialise(ldm_vae_shapes(32, (1, 1), 1), "first_stage_model.", seed + 1))
    end = spec.get("model", {}).get("linear_end", 0.012)
    for name, value in convert.expected_schedule(end=end).items():
        sd[name] = value.float()
    if style == "sd-v1":
        sd.update(hf_clip_text_state())
    if style == "sd-v2":
        sd.update(clip_state("text")[1])
    return ref, sd


def inputs(context_dim: int, seed: int = 1, objects: int = 2, views: int = 4):
    g = torch.Generator().manual_seed(seed)
    n = objects * views
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 3, context_dim, generator=g), torch.randn(n, 16, generator=g))


def relative_error(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@functools.lru_cache(maxsize=None)
def expected(style: str) -> torch.Tensor:
    """The original UNet's output on the style's test inputs."""
    with torch.no_grad():
        return _original(style)[0](*inputs(STYLES[style]["unet"]["context_dim"]), 4)


def output(model, style: str) -> torch.Tensor:
    """A converted model's raw UNet output (eps or v) on the same inputs."""
    with torch.no_grad():
        return model.predict_output(*inputs(STYLES[style]["unet"]["context_dim"]), 4)


# -- the reference itself ------------------------------------------------------------------

def test_reference_names_and_shapes_agree_with_the_key_generator():
    """Two independent descriptions of MVDream's UNet (the shape generator of test_convert
    and the reference module) give the same keys and shapes."""
    ref = ReferenceUNet(image_size=32, in_channels=4, out_channels=4, model_channels=TINY["mc"],
                        num_res_blocks=TINY["nrb"], attention_resolutions=[1],
                        channel_mult=list(TINY["mults"]), context_dim=TINY["ctx"], camera_dim=16,
                        num_head_channels=16, use_linear_in_transformer=True)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == ldm_unet_shapes(**TINY)


def test_reference_is_sensitive_to_what_the_conversion_must_get_right():
    ref, _ = checkpoint("sd-v1")
    x, t, ctx, cam = inputs(24)
    out = expected("sd-v1")
    with torch.no_grad():
        assert relative_error(ref(x, t, ctx, cam, 1), out) > 1e-2        # joint attention
        assert relative_error(ref(x, t, ctx, cam.flip(0), 4), out) > 1e-2  # camera
        assert relative_error(ref(x, t, ctx.flip(0), cam, 4), out) > 1e-2  # context


# -- converted outputs equal the original's ------------------------------------------------

@pytest.mark.parametrize("style", list(STYLES))
def test_converted_unet_matches_the_original(tmp_path, style):
    _, sd = checkpoint(style)
    cfg_path = write_yaml(tmp_path, ldm_yaml(style))
    clip = tiny_openclip_config() if style == "sd-v2" else None

    model, report = convert.convert_state_dict(sd, clip=clip, config=cfg_path)
    assert model is not None and report.unknown == [] and report.schedule == []
    assert not any(report.missing.values()) and not any(report.unexpected.values())
    assert report.architecture[0].startswith(f"unet sizes: from {cfg_path}")
    want = expected(style)
    assert relative_error(output(model, style), want) < 1e-5

    inferred, report = convert.convert_state_dict(sd, clip=clip)
    assert inferred is not None and not any(report.unexpected.values())
    from_config = read_ldm_config(cfg_path).unet
    got = output(inferred, style)
    if style == "finetune":
        # everything but the heads is read off the tensors; 16-channel heads are not the
        # assumed 64, and the outputs show it
        cfg = MultiViewUNetConfig(**inferred.info.unet)
        assert cfg.attention_head_dim == [1, 1, 1] and from_config.attention_head_dim == [2, 4, 4]
        assert cfg.__dict__ | {"attention_head_dim": None} == \
            from_config.__dict__ | {"attention_head_dim": None}
        assert relative_error(got, want) > 1e-3
    else:
        assert MultiViewUNetConfig(**inferred.info.unet) == from_config
        assert relative_error(got, want) < 1e-5


def test_inference_reads_sd_v1_exactly_and_says_what_it_assumed():
    v1 = MultiViewUNetConfig(sample_size=32, in_channels=4, out_channels=4,
                             block_out_channels=[32, 64, 64], layers_per_block=1,
                             attention_head_dim=[8, 8, 8], cross_attention_dim=24, camera_dim=16,
                             norm_num_groups=32, attention_levels=None,
                             use_linear_projection=False, transformer_layers_per_block=1)
    sd = {k[len("model.diffusion_model."):]: v for k, v in checkpoint("sd-v1")[1].items()
          if k.startswith("model.diffusion_model.")}
    cfg, note = infer_unet_config(sd)
    assert cfg == v1
    assert note.startswith("unet sizes: inferred from the tensors: model_channels 32, channel_mult "
                           "[1, 2, 2], 1 res blocks a level, attention at levels [0, 1] of 3")
    assert "1x1-convolution projections, context 24" in note
    assert "NOT in the tensors, assumed: 8 heads per level (SD 1.x convention" in note
    assert "config=MODEL.yaml" in note and "\n" not in note


def test_config_schedule_prediction_and_latent_scale(tmp_path):
    _, sd = checkpoint("finetune")
    cfg_path = write_yaml(tmp_path, ldm_yaml("finetune"))
    model, report = convert.convert_state_dict(sd, config=cfg_path)
    assert report.schedule == []                  # the buffers match the config's betas
    assert any("betas 0.00085..0.02" in line for line in report.architecture)
    assert model.scheduler_config["beta_end"] == pytest.approx(0.02)
    assert model.info.prediction_type == "v_prediction"
    assert model.info.latent_scale == pytest.approx(0.13025)
    assert model.vae.config.scaling_factor == pytest.approx(0.13025)
    expected = convert.expected_schedule(end=0.02)["alphas_cumprod"].float()
    assert torch.allclose(model.alphas_cumprod, expected, rtol=1e-5)
    _, report = convert.convert_state_dict(sd)    # without it: MVDream's schedule assumed
    assert report.schedule and report.schedule[0].startswith("alphas_cumprod differs")


RELEASED = {  # unet_config.params of MVDream's sd-v1.yaml and sd-v2-base.yaml
    "sd-v1.5-4view": (dict(COMMON, num_res_blocks=2, model_channels=320,
                           attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                           num_heads=8, transformer_depth=1, context_dim=768, legacy=False),
                      859_520_964),
    "sd-v2.1-base-4view": (dict(COMMON, num_res_blocks=2, model_channels=320,
                                attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                                num_head_channels=64, use_linear_in_transformer=True,
                                transformer_depth=1, context_dim=1024, legacy=False),
                           865_910_724),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_sizes_convert_strictly_without_allocating(tmp_path, name):
    """Full-size original UNets (meta tensors): the config reads to the right diffusers UNet,
    every key maps, shapes fit, and the parameter count is Stable Diffusion's UNet (1.5 or
    2.1-base) plus the camera embedding; inference from the shapes gives the same config."""
    from guidance.multiview.unet import build_unet

    params, sd_unet_parameters = RELEASED[name]
    with torch.device("meta"):
        ref = ReferenceUNet(**params)
    data = ldm_yaml("sd-v1")
    data["model"]["params"]["unet_config"]["params"] = params
    cfg = read_ldm_config(write_yaml(tmp_path, data)).unet
    converted, unconsumed = convert.ldm_unet_to_diffusers(ref.state_dict(), cfg)
    assert unconsumed == []
    with torch.device("meta"):
        unet = build_unet(cfg)
    unet.load_state_dict(converted, strict=True, assign=True)
    camera = 16 * 1280 + 1280 + 1280 * 1280 + 1280
    assert sum(p.numel() for p in unet.parameters()) == sd_unet_parameters + camera
    assert infer_unet_config(ref.state_dict())[0] == cfg
    if name.startswith("sd-v2"):
        assert cfg == MultiViewUNetConfig.sd21_base()
    else:
        assert cfg.attention_head_dim == [8, 8, 8, 8] and not cfg.use_linear_projection
        assert cfg.cross_attention_dim == 768


# -- the command ---------------------------------------------------------------------------

def test_command_sd_v1_with_config_and_inferred(tmp_path, capsys):
    """sd-v1.5 style: the UNet and VAE convert, the CLIP-L text encoder is listed as not
    converted (with its reason) and the model has no conditioner."""
    from guidance.multiview.model import MultiViewDiffusionModel, read_index

    _, sd = checkpoint("sd-v1")
    src = tmp_path / "sd-v1.5-4view.pt"
    torch.save(sd, src)
    cfg_path = write_yaml(tmp_path, ldm_yaml("sd-v1"), "sd-v1.yaml")
    outputs = []
    for extra, out in (([f"config={cfg_path}"], tmp_path / "a"), ([], tmp_path / "b")):
        assert convert.main([str(src), str(out)] + extra) == 0
        printed = capsys.readouterr()
        assert "NOT CONVERTED text encoder (FrozenCLIPEmbedder" in printed.out
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in printed.out
        assert "warning: not converted: text encoder" in printed.err
        assert "unknown" not in printed.out and "MISSING" not in printed.out
        index = read_index(out)
        assert list(index["not_converted"].values()) == [4]
        model = MultiViewDiffusionModel.from_pretrained(out)
        assert model.conditioner is None and model.info.conditioning == "text"
        with pytest.raises(UserError, match="no conditioner loaded, cannot embed text"):
            model.embed_text(["a chair"])
        outputs.append((printed.out, output(model, "sd-v1")))
    (with_cfg, got_a), (inferred, got_b) = outputs
    want = expected("sd-v1")
    assert f"unet sizes: from {cfg_path}" in with_cfg and "vae sizes: from" in with_cfg
    line = [x for x in inferred.splitlines() if "unet sizes: inferred" in x]
    assert len(line) == 1 and "8 heads per level" in line[0] and "config=" in line[0]
    assert "vae sizes: read from the tensors" in inferred
    assert relative_error(got_a, want) < 1e-5 and relative_error(got_b, want) < 1e-5


def test_command_sd_v2_inferred_says_what_it_assumed(tmp_path, capsys):
    _, sd = checkpoint("sd-v2")
    src = tmp_path / "sd-v2.1-base-4view.pt"
    torch.save(sd, src)
    clip = tmp_path / "clip.json"
    clip.write_text(json.dumps({"model_cfg": tiny_openclip_config()}))
    assert convert.main([str(src), str(tmp_path / "out"), f"clip={clip}"]) == 0
    out = capsys.readouterr().out
    assert "linear projections, context 32" in out
    assert "assumed: 64-channel heads (SD 2.x convention with linear projections: heads " \
           "[1, 2, 2])" in out
    assert "conditioning text" in out and "NOT CONVERTED" not in out


def test_explicit_unet_wins_over_config(tmp_path):
    _, sd = checkpoint("sd-v1")
    data = ldm_yaml("sd-v1")
    cfg_path = write_yaml(tmp_path, data)
    given = read_ldm_config(cfg_path).unet
    unet_json = tmp_path / "unet.json"
    unet_json.write_text(json.dumps(dict(given.to_dict(), attention_head_dim=[4, 4, 4])))
    model, report = convert.convert_state_dict(sd, unet=str(unet_json), config=cfg_path)
    assert model.info.unet["attention_head_dim"] == [4, 4, 4]
    assert report.architecture[0] == (f"unet sizes: from {unet_json} (unet=); the unet_config of "
                                      f"{cfg_path} is not used")
    with pytest.raises(UserError, match=r"UNet tensors do not fit the configured architecture "
                                        r"\(size mismatch for conv_in.weight"):
        convert.convert_state_dict(sd, unet="sd21-base", config=cfg_path)


BAD = [  # (change to the sd-v1 YAML, words the one-line error must hold)
    ({"unet.use_scale_shift_norm": True}, "unet_config.params.use_scale_shift_norm: True is not "
                                          "supported"),
    ({"unet.resblock_updown": True}, "resblock_updown: True is not supported"),
    ({"unet.use_spatial_transformer": False}, "use_spatial_transformer: False is not supported"),
    ({"unet.num_heads": 3}, "num_heads: 3 does not divide the width 32"),
    ({"unet.num_heads": None}, "num_heads: (absent) and num_head_channels are both unset"),
    ({"unet.camera_dim": None}, "camera_dim: (absent) is not supported"),
    ({"unet.transformer_depth": [1, 2]}, "transformer_depth: [1, 2] is not a whole number"),
    ({"unet.context_dim": [24, 32]}, "context_dim: [24, 32] differs between levels"),
    ({"unet.attention_resolutions": [16]}, "attention_resolutions: [16] matches none"),
    ({"unet.disable_self_attentions": [True, False, False]}, "disable_self_attentions"),
    ({"unet.use_flash": True}, "use_flash: True is not an argument of MVDream's"),
    ({"unet.model_channels": "wide"}, "model_channels: 'wide' is not a whole number"),
    ({"vae.attn_resolutions": [16]}, "ddconfig.attn_resolutions: [16] is not supported"),
    ({"model.timesteps": 500}, "model.params.timesteps: 500 is not supported"),
    ({"model.parameterization": "x0"}, "model.params.parameterization: 'x0' is not supported"),
]


def test_unsupported_config_values_are_one_line_errors(tmp_path, capsys):
    _, sd = checkpoint("sd-v1")
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    cases = list(BAD) + [
        ({"cond.layer": "last"}, None),      # OpenCLIP text, last layer: built separately
    ]
    for i, (changes, words) in enumerate(cases):
        data = ldm_yaml("sd-v1", **changes)
        if words is None:
            data["model"]["params"]["cond_stage_config"] = {
                "target": COND + "FrozenOpenCLIPEmbedder", "params": {"layer": "last"}}
            words = "cond_stage_config.params.layer: 'last' is not supported"
        path = write_yaml(tmp_path, data, f"bad{i}.yaml")
        assert convert.main([str(src), str(tmp_path / f"o{i}"), f"config={path}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: config bad") and err.count("\n") == 1, err
        assert words in err and "Traceback" not in err, (changes, err)
        assert not (tmp_path / f"o{i}").exists()
    # a config that names another conditioner than the checkpoint holds
    data = ldm_yaml("sd-v1")
    data["model"]["params"]["cond_stage_config"] = {"target": COND + "FrozenOpenCLIPImageEmbedder"}
    path = write_yaml(tmp_path, data, "mismatch.yaml")
    assert convert.main([str(src), str(tmp_path / "om"), f"config={path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the checkpoint's cond_stage_model" in err


def test_unreadable_configs_are_one_line_errors(tmp_path, capsys):
    src = tmp_path / "m.pt"
    torch.save(checkpoint("sd-v1")[1], src)
    files = {"corrupt.yaml": "model: [unclosed\n  params: {", "list.yaml": "- 1\n- 2\n",
             "other.yaml": "model:\n  params:\n    linear_start: 0.1\n",
             "binary.yaml": b"\xff\xfe\x00garbage"}
    expected = {"corrupt.yaml": "is not readable YAML", "list.yaml": "not an LDM model config",
                "other.yaml": "has no model.params.unet_config.params",
                "binary.yaml": "is not readable YAML", "absent.yaml": "not found"}
    for name, text in files.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    for name, words in expected.items():
        assert convert.main([str(src), str(tmp_path / "o"), f"config={tmp_path / name}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: config ") and err.count("\n") == 1 and words in err, err
        assert "Traceback" not in err


def test_what_cannot_be_inferred_is_named(tmp_path, capsys):
    _, sd = checkpoint("sd-v1")
    del sd["model.diffusion_model.input_blocks.0.0.weight"]
    with pytest.raises(UserError, match="input_blocks.0.0.weight is missing; give config="):
        convert.convert_state_dict(sd)
    _, sd = checkpoint("sd-v2")
    del sd["model.diffusion_model.input_blocks.2.0.op.weight"]     # the level layout breaks
    src = tmp_path / "m.pt"
    torch.save(sd, src)
    assert convert.main([str(src), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot infer the UNet architecture" in err
    assert "res blocks per level" in err and "config=MODEL.yaml" in err


# -- MultiViewUNetConfig's new fields -------------------------------------------------------

def test_old_configs_load_with_the_old_behaviour():
    old = {"sample_size": 8, "in_channels": 4, "out_channels": 4,
           "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": [2, 4],
           "cross_attention_dim": 32, "camera_dim": 16, "norm_num_groups": 8,
           "attention_levels": None}
    cfg = MultiViewUNetConfig(**old)
    kw = cfg.diffusers_kwargs()
    assert kw["use_linear_projection"] is True and kw["transformer_layers_per_block"] == 1
    per_level = MultiViewUNetConfig(**dict(old, transformer_layers_per_block=[1, 2],
                                           use_linear_projection=False))
    assert per_level.diffusers_kwargs()["transformer_layers_per_block"] == (1, 2)
    assert MultiViewUNetConfig(**json.loads(json.dumps(per_level.to_dict()))) == per_level
    for bad in (0, [1], [1, 0], True):
        with pytest.raises(ConfigError, match="transformer_layers_per_block"):
            MultiViewUNetConfig(**dict(old, transformer_layers_per_block=bad))
