"""Memory accounting (engine/memory.py), the run estimate (engine/estimate.py, --estimate) and
the frozen models' precision per device."""

import pytest
import torch

from engine.memory import bytes_of, fake_tensors, measure


def test_measure_counts_live_storages_exactly():
    def work():
        a = torch.zeros(1000)                 # 4000 B
        b = torch.zeros(2000)                 # 8000 B: 12000 live
        view = b.view(2, 1000)                # a view: no new storage
        del a                                 # 8000 live
        c = torch.zeros(500)                  # 10000 live
        return view, c

    assert measure(work).peak == 12000


def test_measure_on_fake_tensors_equals_real_tensors():
    def layers():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(),
                                   torch.nn.Conv2d(16, 8, 3, padding=1),
                                   torch.nn.GroupNorm(4, 8))

    def step(net, x):
        return lambda: net(x).square().mean().backward()

    net, x = layers(), torch.rand(2, 3, 32, 32, requires_grad=True)
    real = measure(step(net, x)).peak
    with fake_tensors():
        net_f, x_f = layers(), torch.rand(2, 3, 32, 32, requires_grad=True)
        fake = measure(step(net_f, x_f)).peak
    assert real == fake > 2 * 16 * 32 * 32 * 4        # at least the saved conv output


def test_bytes_of_counts_parameters_and_buffers_in_a_dtype():
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.BatchNorm1d(20))
    floats = 10 * 20 + 20 + 20 + 20 + 20 + 20     # linear, bn weight/bias, running mean/var
    assert bytes_of(net) == floats * 4 + 8        # + num_batches_tracked (int64)
    assert bytes_of(net, torch.float16) == floats * 2 + 8


def test_precision_auto_is_fp32_on_cpu_and_half_on_cuda(monkeypatch):
    from guidance.multiview.prior import resolve_precision

    assert resolve_precision("auto", "cpu") == torch.float32
    assert resolve_precision("fp16", "cpu") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda:0") == torch.float16


def test_precision_fast_is_bf16_only_on_a_cpu_that_computes_it(monkeypatch):
    from guidance.multiview import prior
    from guidance.multiview.memory import estimate_dtype

    monkeypatch.setattr(prior, "cpu_computes_bf16", lambda: True)
    assert prior.resolve_precision("fast", "cpu") == torch.bfloat16
    assert prior.resolve_precision("auto", "cpu") == torch.float32     # auto is unchanged
    monkeypatch.setattr(prior, "cpu_computes_bf16", lambda: False)
    assert prior.resolve_precision("fast", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert prior.resolve_precision("fast", "cuda") == torch.float16     # as auto on CUDA
    # the memory estimate takes the larger where it cannot know the CPU
    assert estimate_dtype("fast", "cpu") == torch.float32
    assert estimate_dtype("fast", "cuda") == torch.float16


def test_stage_phases_follow_the_resolution_and_group_schedules():
    from engine import config
    from engine.estimate import stage_phases

    cfg, _ = config.load("isotropic3d", [])
    got = {s: [(p.first_step, p.last_step, p.batch, p.size) for p in stage_phases(cfg, s)]
           for s in cfg.stages}
    assert got == {"nerf": [(0, 4999, 8, 64), (5000, 9999, 4, 256)],
                   "dmtet": [(0, 1999, 4, 256), (2000, 4999, 4, 512)]}


@pytest.mark.slow
def test_released_sds_step_weights_and_activations_scale_as_they_should():
    from guidance.multiview.memory import estimate_sds_step, prior_architecture
    from guidance.multiview.unet import build_unet

    arch = prior_architecture("pkunliu/Isotropic3D")
    assert arch.conditioning == "image" and arch.context_tokens == 1
    half = estimate_sds_step(arch, 4, 64, torch.float16)
    full = estimate_sds_step(arch, 4, 64, torch.float32)
    with torch.device("meta"):
        unet_params = sum(p.numel() for p in build_unet(arch.unet).parameters())
    # SD 2.1-base (865,910,724) + the camera MLP 16 -> 1280 -> 1280 (1,661,440)
    assert unet_params == 865_910_724 + 1_661_440
    assert full["weights"] == 2 * half["weights"] > 2 * unet_params
    assert 1.8 < full["activations"] / half["activations"] < 2.2
    assert 630e6 < arch.conditioner_params < 634e6        # ViT-H-14 image tower
    twice = estimate_sds_step(arch, 8, 64, torch.float16)
    assert 1.6 < twice["activations"] / half["activations"] < 2.2


@pytest.mark.slow
def test_estimate_of_a_toy_recipe_prints_every_stage(capsys):
    from engine.run import main

    assert main(["recipe=isotropic3d-toy", "--estimate", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "on cpu" in out and "peak:" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("nerf", "dmtet"))]
    assert {r[0] for r in rows} == {"nerf", "dmtet"}
    assert all(float(r[-1]) > 0 for r in rows)
    assert "converted folder" in out and "float32" in out


def _measured_step(cfg, sname: str, size: int) -> int:
    """What one training step of the stage's representation holds at its peak, measured at the
    full size: parameters + Adam state + the largest transient (the way a run lives)."""
    from engine.config import build
    from engine.plugin import StepInfo

    comps = cfg.components[sname]
    torch.manual_seed(0)
    rep = build("representation", comps["representation"], device="cpu").train()
    bg = build("background", comps["background"], device="cpu")
    cams = build("cameras", comps["cameras"], device="cpu").sample(
        0, torch.Generator().manual_seed(0))
    info = StepInfo(sname, 0, 0, 10, 0)
    params = [p for p in rep.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        out = rep.render(cams, size, size, background=bg, step=info)
        loss = out["rgb"].mean() + sum(rep.regularizers(out, info).values())
        loss.backward()
        opt.step()

    rep.before_step(info)
    step()                                     # the optimiser's state exists from here on
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t))
    return bytes_of(rep) + state + measure(step).peak


@pytest.mark.slow
def test_representation_estimate_extrapolates_chunked_nerf_renders():
    """The chunk-aware extrapolation from 16 and 32 px lands near a step measured at 64 px, and
    it sees what chunking saves: with 4 x 64 px = 16384 rays in chunks of 1024 it is well below
    the one-piece estimate."""
    from engine import config
    from engine.estimate import Phase, representation_bytes

    over = ["stages.nerf.representation.hash_grid.compile=false",
            "stages.nerf.representation.samples_per_ray=64"]
    chunked, _ = config.load("isotropic3d-toy", over + ["stages.nerf.representation.train_chunk=1024"])
    whole, _ = config.load("isotropic3d-toy", over + ["stages.nerf.representation.train_chunk=0"])
    phase = Phase("nerf", 0, 10, 64, 4)
    est_chunked = representation_bytes(chunked, "nerf", phase)
    est_whole = representation_bytes(whole, "nerf", phase)
    real_chunked = _measured_step(chunked, "nerf", 64)
    real_whole = _measured_step(whole, "nerf", 64)
    print(f"MiB: chunked est {est_chunked / 2**20:.0f} real {real_chunked / 2**20:.0f}; "
          f"whole est {est_whole / 2**20:.0f} real {real_whole / 2**20:.0f}")
    assert real_chunked < 0.6 * real_whole
    assert 0.75 * real_chunked < est_chunked < 1.5 * real_chunked
    assert 0.75 * real_whole < est_whole < 1.5 * real_whole
