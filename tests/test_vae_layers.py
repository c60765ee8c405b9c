"""Building blocks of the causal video VAE checked against their definitions (golden README §6):
pixel-shuffle channel order, causal padding and memory, per-frame GroupNorm, the attention call,
latent scaling, and input validation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from src.models.video_vae_v3 import (
    SCALING_FACTOR,
    SHIFTING_FACTOR,
    VAEConfig,
    VAEInputError,
    VideoAutoencoder,
    from_dit_latent,
    sample_posterior,
    to_dit_latent,
)
from src.models.video_vae_v3 import mid_block
from src.models.video_vae_v3.causal_conv import CausalConv3d
from src.models.video_vae_v3.frame_norm import FrameGroupNorm
from src.models.video_vae_v3.resampling import pixel_shuffle_3d
from src.models.video_vae_v3.temporal_slicing import CausalMemory, causal_chunks

TINY = VAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)


@pytest.mark.parametrize("time_factor", [1, 2])
def test_pixel_shuffle_follows_channel_formula(time_factor):
    channels, frames, height, width = 3, 2, 2, 3
    x = torch.randn(1, channels * 4 * time_factor, frames, height, width)
    out = pixel_shuffle_3d(x, time_factor)
    assert out.shape == (1, channels, frames * time_factor, 2 * height, 2 * width)
    expected = torch.empty_like(out)
    for dx in range(2):
        for dy in range(2):
            for dz in range(time_factor):
                for c in range(channels):
                    source = ((dx * 2 + dy) * time_factor + dz) * channels + c
                    for f in range(frames):
                        for i in range(height):
                            for k in range(width):
                                expected[0, c, time_factor * f + dz, 2 * i + dx, 2 * k + dy] = x[0, source, f, i, k]
    assert torch.equal(out, expected)


def test_causal_conv_repeats_first_frame():
    conv = CausalConv3d(2, 3)
    x = torch.randn(1, 2, 4, 5, 6)
    padded = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
    expected = F.conv3d(padded, conv.weight, conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "stride, spatial_padding, bounds",
    [
        (1, 1, [(0, 5), (5, 9), (9, 11)]),
        (1, 1, [(0, 1), (1, 2), (2, 11)]),
        (2, 0, [(0, 5), (5, 9), (9, 11)]),   # the released alignment for the temporal downsampler
        (2, 0, [(0, 4), (4, 9), (9, 11)]),   # misaligned chunks are exact too
    ],
)
def test_causal_memory_makes_chunks_exact(stride, spatial_padding, bounds):
    conv = CausalConv3d(2, 3, stride=stride, spatial_padding=spatial_padding)
    x = torch.randn(1, 2, 11, 6, 6)
    whole = conv(x)
    memory = CausalMemory()
    pieces = []
    for start, stop in bounds:
        pieces.append(conv(x[:, :, start:stop], memory))
        memory.end_chunk()
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=0, atol=1e-6)


def test_continuation_without_memory_is_an_error():
    memory = CausalMemory()
    memory.end_chunk()
    with pytest.raises(RuntimeError, match="causal memory"):
        CausalConv3d(2, 2)(torch.randn(1, 2, 2, 4, 4), memory)


def test_causal_chunks_follow_released_slicing():
    assert causal_chunks(1, 4) == [(0, 1)]
    assert causal_chunks(5, 4) == [(0, 5)]
    assert causal_chunks(13, 4) == [(0, 5), (5, 9), (9, 13)]
    assert causal_chunks(4, 1) == [(0, 2), (2, 3), (3, 4)]


def test_frame_group_norm_uses_per_frame_statistics():
    norm = FrameGroupNorm(2, 4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
    # Frames with very different scales: shared statistics would be visibly wrong.
    x = torch.randn(2, 4, 3, 5, 5) * torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1, 1)
    grouped = x.double().view(2, 2, 2, 3, 25)
    mean = grouped.mean(dim=(2, 4), keepdim=True)
    var = grouped.var(dim=(2, 4), keepdim=True, unbiased=False)
    normalised = ((grouped - mean) / torch.sqrt(var + 1e-6)).view_as(x)
    expected = normalised * norm.weight.double().view(1, 4, 1, 1, 1) + norm.bias.double().view(1, 4, 1, 1, 1)
    torch.testing.assert_close(norm(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_mid_block_attention_calls_shared_attention(monkeypatch):
    shapes = []

    def recording_attention(q, k, v, backend=None):
        shapes.append((tuple(q.shape), backend))
        return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(mid_block, "attention", recording_attention)
    attention = mid_block.MidBlockAttention(8, 4)
    x = torch.randn(2, 8, 3, 4, 5)
    out = attention(x)
    assert shapes == [((6, 1, 20, 8), "sdpa")]  # the plain block: the plain path
    # Independent check: softmax(q kᵀ/√C) v per frame over its H·W positions, plus the input.
    tokens = attention.group_norm(x).permute(0, 2, 3, 4, 1).reshape(6, 20, 8)
    q, k, v = attention.to_q(tokens), attention.to_k(tokens), attention.to_v(tokens)
    mixed = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1) @ v
    expected = x + attention.to_out[0](mixed).view(2, 3, 4, 5, 8).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_latent_scaling_constants_and_round_trip():
    assert (SCALING_FACTOR, SHIFTING_FACTOR) == (0.9152, 0.0)
    z = torch.randn(1, 16, 2, 3, 4)
    torch.testing.assert_close(to_dit_latent(z), z * 0.9152)
    torch.testing.assert_close(from_dit_latent(to_dit_latent(z)), z)


def test_sample_posterior_formula():
    mean, logvar, eps = torch.randn(3, 16)
    torch.testing.assert_close(sample_posterior(mean, logvar, eps), mean + torch.sqrt(torch.exp(logvar)) * eps)


def test_builds_on_meta_device():
    with torch.device("meta"):
        model = VideoAutoencoder(TINY)
    assert all(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_vae() -> VideoAutoencoder:
    return VideoAutoencoder(TINY).eval()


@pytest.mark.parametrize("frames, padded", [(2, 5), (4, 5), (6, 9), (8, 9)])
def test_frame_count_must_be_4n_plus_1(tiny_vae, frames, padded):
    with pytest.raises(VAEInputError, match=rf"4n\+1.*got T={frames}.*pads.*to {padded}"):
        tiny_vae.encode(torch.zeros(1, 3, frames, 16, 16))


@pytest.mark.parametrize("height, width", [(12, 16), (16, 20), (7, 8)])
def test_frame_size_must_be_multiple_of_8(tiny_vae, height, width):
    with pytest.raises(VAEInputError, match=rf"multiples of 8, got {height}x{width}"):
        tiny_vae.encode(torch.zeros(1, 3, 1, height, width))


def test_image_without_time_axis_is_explained(tiny_vae):
    with pytest.raises(VAEInputError, match=r"unsqueeze\(2\)"):
        tiny_vae.encode(torch.zeros(1, 3, 16, 16))


def test_wrong_channel_counts_are_rejected(tiny_vae):
    with pytest.raises(VAEInputError, match="3 channels"):
        tiny_vae.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(VAEInputError, match="16 latent channels"):
        tiny_vae.decode(torch.zeros(1, 17, 1, 2, 2))
    with pytest.raises(VAEInputError, match="channels-last"):
        tiny_vae.decode(torch.zeros(1, 2, 2, 16))
