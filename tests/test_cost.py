"""stepdrop.cost: FLOPs per model call from torch's flop counter, peak memory."""

import pytest
import torch

from stepdrop.cost import PeakMemory, gflops_per_call


class ConvEps(torch.nn.Module):
    """ε = conv(x), ignoring t: 2·C_out·C_in·k²·H·W FLOPs per sample, exactly."""

    sample_shape = (3, 8, 10)

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def test_gflops_counts_a_convolution_exactly():
    assert gflops_per_call(ConvEps()) * 1e9 == pytest.approx(2 * 3 * 3 * 9 * 8 * 10)


class UpEps(torch.nn.Module):
    """A transposed convolution (stride 2) and back down."""

    sample_shape = (2, 4, 4)

    def __init__(self):
        super().__init__()
        self.up = torch.nn.ConvTranspose2d(2, 2, 2, stride=2)
        self.down = torch.nn.Conv2d(2, 2, 2, stride=2)

    def forward(self, x, t):
        return self.down(self.up(x))


def test_gflops_counts_attention_and_transposed_convolutions():
    from stepdrop.models import TinyUNet

    # ConvTranspose2d(2→2, k=2, s=2) on 4×4: 2·2·2·4 MACs per input pixel; the conv back: same
    assert gflops_per_call(UpEps()) * 1e9 == pytest.approx(2 * (2 * 2 * 4 * 16) * 2)

    plain = TinyUNet(in_channels=1, image_size=16, base_channels=8, channel_mults=(1, 2), attention_resolutions=())
    attn = TinyUNet(in_channels=1, image_size=16, base_channels=8, channel_mults=(1, 2), attention_resolutions=(8,))
    assert gflops_per_call(attn) > gflops_per_call(plain) > 0


def test_gflops_needs_a_shape():
    with pytest.raises(ValueError, match="sample_shape"):
        gflops_per_call(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="sample_shape"):
        gflops_per_call(ConvEps(), sample_shape=(3, 0, 4))


def test_peak_memory_is_none_on_the_cpu():
    with PeakMemory("cpu") as peak:
        torch.ones(1000)
    assert peak.megabytes is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_peak_memory_on_cuda_sees_a_temporary():
    with PeakMemory("cuda") as peak:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    assert peak.megabytes >= 64
