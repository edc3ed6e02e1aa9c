"""The numpy Kaldi fbank matches the reference's torchaudio output (fixtures/reference/fbank.pt)."""


import numpy as np
import pytest
import torch

from preprocessing.fbank import fbank_to_model_input, log_mel_fbank


@pytest.fixture(scope="module")
def reference(reference_file):
    return torch.load(reference_file("reference/fbank.pt"), weights_only=True)


def test_fbank_matches_reference(reference):
    fbank = log_mel_fbank(reference["waveform"].numpy(), reference["sample_rate"])
    expected = reference["fbank_raw"].numpy()
    assert fbank.shape == expected.shape == (198, 128)
    assert fbank.dtype == np.float32
    np.testing.assert_allclose(fbank, expected, atol=5e-3, rtol=0)
    loud = expected > -8
    np.testing.assert_allclose(fbank[loud], expected[loud], atol=2e-4, rtol=0)  # float32 rounding only


def test_model_input_matches_reference(reference):
    fbank = log_mel_fbank(reference["waveform"].numpy())
    model_input = fbank_to_model_input(fbank, reference["target_length"])
    assert model_input.shape == (1, 256, 128)
    np.testing.assert_allclose(model_input, reference["model_input"].numpy(), atol=5e-4, rtol=0)


def test_mean_is_removed_first(reference):
    """The reference subtracts the waveform mean before the fbank; a DC offset changes nothing."""
    centered = reference["waveform_centered"].numpy()
    np.testing.assert_allclose(log_mel_fbank(centered + 0.2), log_mel_fbank(centered), atol=1e-3)


def test_cut_and_frame_count():
    wave = np.random.default_rng(0).normal(0, 0.1, 16000 * 3 + 123).astype(np.float32)
    fbank = log_mel_fbank(wave)
    assert len(fbank) == 1 + (len(wave) - 400) // 160  # Kaldi's snip_edges framing: 25 ms windows, 10 ms hop
    model_input = fbank_to_model_input(fbank)
    assert model_input.shape == (1, 256, 128)
    np.testing.assert_allclose(model_input[0], (fbank[:256] + 4.2677393) / (2 * 4.5689974), atol=1e-6)


def test_padding_is_zero_in_log_domain():
    fbank = log_mel_fbank(np.random.default_rng(1).normal(0, 0.1, 8000).astype(np.float32))
    padded = fbank_to_model_input(fbank)[0]
    np.testing.assert_allclose(padded[len(fbank):], 4.2677393 / (2 * 4.5689974), atol=1e-6)


def test_rejects_wrong_rate_and_too_short():
    with pytest.raises(ValueError, match="16000"):
        log_mel_fbank(np.zeros(16000, np.float32), sample_rate=8000)
    with pytest.raises(ValueError, match="fewer than one"):
        log_mel_fbank(np.zeros(100, np.float32))
