"""Sampling math against the golden diffusion and pipeline cases (README §7, §8.3, §8.4)."""
from __future__ import annotations

import pytest
import torch

from conftest import golden_cases, rel_err
from src.pipeline import diffusion as D

TOL = 1e-6            # README §9: timesteps, timestep shift (and the plain float32 math here)
PIPELINE_TOL = 2e-5   # README §9: pipeline intermediates


@pytest.fixture(scope="module")
def cases():
    return golden_cases("diffusion_cases.safetensors")


@pytest.fixture(scope="module")
def pipeline():
    return golden_cases("pipeline_cases.safetensors")


def test_timesteps_cases(cases):
    keys = sorted(cases["timesteps"])
    assert len(keys) == 10
    for key in keys:
        steps, shift = key.removeprefix("steps").split("_shift")
        grid = D.shift_timesteps(D.sampling_timesteps(int(steps)), float(shift))
        assert grid.dtype == torch.float32
        assert rel_err(grid, cases["timesteps"][key]) <= TOL, key


def test_sampling_timesteps_one_step_and_arange_quirk():
    assert D.sampling_timesteps(1).tolist() == [1000.0]
    # README §7.3: the float arange of the original yields S + 1 values for these S below 200.
    quirky = [s for s in range(1, 200) if len(D.sampling_timesteps(s)) != s]
    assert quirky == [49, 98, 103, 107, 196, 197]
    assert D.sampling_timesteps(49)[-1].abs() < 1e-9
    with pytest.raises(ValueError, match="steps"):
        D.sampling_timesteps(0)


def test_timestep_transform_cases(cases):
    case = cases["timestep_transform"]
    shapes, t_in, t_out = case["latent_shapes"], case["t_in"], case["t_out"]
    got = torch.stack([D.resolution_timestep(t_in, shape.tolist()) for shape in shapes], dim=1)
    assert rel_err(got, t_out) <= TOL
    # Scalars take the same path as tensors.
    shape = shapes[3].tolist()
    assert D.resolution_timestep(float(t_in[2]), shape) == pytest.approx(float(t_out[2, 3]), rel=1e-6)


def test_resolution_shift_anchor_points():
    # The two lines of §7.1 pass through their anchors: 1280x720x145 video -> 5, 1024^2 image -> 3.2.
    assert D.resolution_shift((37, 90, 160)) == pytest.approx(5.0)
    assert D.resolution_shift((1, 128, 128)) == pytest.approx(3.2)
    assert D.resolution_shift((1, 32, 32)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="latent_shape"):
        D.resolution_shift((2, 0, 4))


def test_schedule_cases(cases):
    c = cases["schedule"]
    assert rel_err(D.forward_noise(c["x0"], c["xT"], c["t"]), c["forward"]) <= TOL
    assert rel_err(D.x0_from_v(c["xT"], c["pred"], c["t"]), c["pred_x0_from_v"]) <= TOL
    assert rel_err(D.xT_from_v(c["xT"], c["pred"], c["t"]), c["pred_xT_from_v"]) <= TOL
    assert rel_err(D.euler_step(c["xT"], c["pred"], c["t"], c["s"]), c["euler_step_to"]) <= TOL


def test_schedule_identities():
    x0, xT = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    v = xT - x0
    for t in (1000.0, 700.0, 0.0):
        x = D.forward_noise(x0, xT, t)
        assert torch.allclose(D.x0_from_v(x, v, t), x0, atol=1e-5)
        assert torch.allclose(D.xT_from_v(x, v, t), xT, atol=1e-5)
    x = D.forward_noise(x0, xT, 1000.0)
    assert torch.equal(D.euler_step(x, v, 1000.0, -1.0), x - v)  # one step from pure noise: x0 = noise - v
    with pytest.raises(ValueError, match="batch"):
        D.forward_noise(x0, xT, torch.tensor([1.0, 2.0, 3.0]))


def test_cfg_cases(cases):
    c = cases["cfg"]
    assert rel_err(D.classifier_free_guidance(c["pos"], c["neg"], 7.5), c["scale7.5_rescale0"]) <= TOL
    assert rel_err(D.classifier_free_guidance(c["pos"], c["neg"], 7.5, 0.7), c["scale7.5_rescale0.7"]) <= TOL


def test_cfg_full_rescale_restores_positive_std():
    pos, neg = torch.randn(5, 16), torch.randn(5, 16)
    out = D.classifier_free_guidance(pos, neg, 4.0, rescale=1.0)
    assert torch.allclose(out.std(dim=1), pos.std(dim=1), rtol=1e-5)
    assert torch.allclose(D.classifier_free_guidance(pos, neg, 1.0), pos, atol=1e-6)


def test_condition_cases(cases):
    c = cases["condition"]
    for scale in (0.0, 0.25):
        expected = c[f"noise_scale{scale}.cond"]
        t = D.resolution_timestep(1000.0 * scale, (3, 4, 5))
        assert t == pytest.approx(float(c[f"noise_scale{scale}.t"]), rel=1e-6, abs=1e-9)
        cond = D.build_condition(c["latent"], c["aug_noise"], scale, shift_shape=(3, 4, 5))
        assert rel_err(cond, expected) <= TOL, scale


def test_condition_default_uses_original_hw16_shape(cases):
    c = cases["condition"]
    latent, noise = c["latent"], c["aug_noise"]
    cond = D.build_condition(latent, noise, 0.25)
    # The original shifts with the last three axes (h, w, 16) = (4, 5, 16): frames 13, 40x128 pixels.
    shift = 1 + 4.0 * (40 * 128 * 13 - 256**2 * 37) / (1280 * 720 * 145 - 256**2 * 37)
    s = shift * 0.25 / (1 + (shift - 1) * 0.25)
    assert torch.allclose(cond[..., :16], (1 - s) * latent + s * noise, atol=1e-6)
    assert torch.equal(cond[..., 16], torch.ones(3, 4, 5))
    assert not torch.allclose(cond, c["noise_scale0.25.cond"], atol=1e-5)  # the quirk matters
    with pytest.raises(ValueError, match="aug_noise"):
        D.build_condition(latent, None, 0.25)


@pytest.mark.parametrize("name", ["video5", "pad3", "image1"])
def test_pipeline_condition_and_one_step(pipeline, name):
    c = pipeline[name]
    cond = D.build_condition(c["cond_latent"], c["aug_noise"], 0.0)
    assert rel_err(cond, c["condition"]) <= PIPELINE_TOL
    assert rel_err(D.euler_step(c["noise"], c["dit0_out"].reshape(c["noise"].shape), 1000.0, -1.0), c["latent_x0"]) <= PIPELINE_TOL


def _replay(case: dict, calls: list):
    """A stand-in DiT that checks each call's input against the recorded one and returns its output."""
    def model_fn(vid, timestep, negative):
        i = len(calls)
        calls.append(negative)
        assert rel_err(vid.reshape(-1, vid.shape[-1]), case[f"dit{i}_vid"]) <= PIPELINE_TOL, f"call {i}"
        assert timestep.shape == (1,) and timestep.dtype == torch.float32
        assert rel_err(timestep, case[f"dit{i}_timestep"]) <= 1e-6, f"call {i}"
        return case[f"dit{i}_out"].reshape(vid.shape[:-1] + (16,))
    return model_fn


def test_sample_three_steps_with_cfg(pipeline):
    c = pipeline["steps3_cfg2"]
    assert rel_err(D.sampling_timesteps(3), c["sampling_timesteps"]) <= TOL
    calls: list = []
    x0 = D.sample(_replay(c, calls), c["noise"], c["condition"], steps=3, cfg_scale=2.0)
    assert calls == [False, True] * 3   # positive text first, then negative, every step
    assert rel_err(x0, c["latent_x0"]) <= PIPELINE_TOL


def test_sample_one_step(pipeline):
    c = pipeline["video5"]
    calls: list = []
    x0 = D.sample(_replay(c, calls), c["noise"], c["condition"])
    assert calls == [False]
    assert rel_err(x0, c["latent_x0"]) <= PIPELINE_TOL
