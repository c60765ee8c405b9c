"""The one-step restoration of the golden pipeline cases, tensor by tensor (golden README §7, §8.3).

The tiny models are loaded from their safetensors files through our checkpoint loader, and every case
is replayed with its stored random draws; each intermediate is compared at the README's tolerances.
"""
import pytest
import torch

from conftest import golden_cases, golden_meta, golden_path, rel_err
from src.models.load import load_dit, load_vae
from src.pipeline.color_correction import color_correct
from src.pipeline.restoration import RandomDraws, decode_latent, dit_velocity, encode_condition, restore_latent

CASES = ["video5", "pad3", "image1", "steps3_cfg2", "video5_7b"]


@pytest.fixture(scope="module")
def golden():
    return golden_cases("pipeline_cases.safetensors"), golden_meta("pipeline_cases.safetensors")["cases"]


@pytest.fixture(scope="module")
def models():
    return {
        "3b": load_dit(golden_path("dit3b_weights.safetensors")),
        "7b": load_dit(golden_path("dit7b_weights.safetensors")),
        "vae": load_vae(golden_path("vae_weights.safetensors")),
    }


@pytest.mark.parametrize("name", CASES)
def test_pipeline_case(name, golden, models):
    cases, meta = golden
    case, settings = cases[name], meta[name]
    text = cases["text"]
    video = case.get("cut_video", case["input_video"])
    draws = RandomDraws(case["posterior_eps"], case["noise"], case["aug_noise"])

    cond_latent = encode_condition(models["vae"], video, draws.eps)
    assert rel_err(cond_latent, case["cond_latent"]) <= 2e-5

    model_fn = dit_velocity(models[settings["dit_variant"]], text["pos_emb"], text["neg_emb"])
    latent_x0 = restore_latent(
        model_fn, cond_latent, draws, latent_noise_scale=settings["cond_noise_scale"],
        steps=settings["sample_steps"], cfg_scale=settings["cfg_scale"], cfg_rescale=settings["cfg_rescale"],
    )
    assert rel_err(latent_x0, case["latent_x0"]) <= 2e-5

    decoded = decode_latent(models["vae"], latent_x0)
    assert rel_err(decoded, case["vae_decoded"]) <= 2e-5

    frames = case["input_video"].shape[1]
    colorfixed = color_correct(decoded[:frames], case["input_video"].transpose(0, 1), "wavelet")
    assert rel_err(colorfixed, case["colorfixed"]) <= 2e-5

    out = (colorfixed.clamp(-1, 1) * 0.5 + 0.5).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
    diff = (out.int() - case["output_uint8"].int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


def test_first_dit_call_matches(golden, models):
    """The packed DiT input the pipeline builds equals the original's (flattening order, channels)."""
    cases, _ = golden
    case = cases["video5"]
    vid = torch.cat([case["noise"], case["condition"]], dim=-1).reshape(-1, 33)
    assert torch.equal(vid, case["dit0_vid"])
    out = models["3b"](vid, cases["text"]["pos_emb"], case["dit0_vid_shape"], case["dit0_txt_shape"],
                       case["dit0_timestep"])
    assert rel_err(out, case["dit0_out"]) <= 1e-5
