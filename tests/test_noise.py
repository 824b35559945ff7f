"""The noise measures of the scheduler comparison (nbkit.sample.noise): what they score, on pictures made to order."""

import numpy as np
import pytest
from PIL import Image

from nbkit.sample.noise import high_frequency_energy, mean_high_frequency, reference_distance


def _ramp(size=64):
    x = np.linspace(0, 255, size)
    return np.stack([np.tile(x, (size, 1))] * 3, -1)


def _img(a):
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_a_noisy_picture_has_more_high_frequency_energy_than_a_smooth_one():
    rng = np.random.default_rng(0)
    smooth = _img(_ramp())
    noisy = _img(_ramp() + rng.normal(0, 10, (64, 64, 3)))
    assert high_frequency_energy(Image.new("RGB", (64, 64), (90, 40, 200))) == 0  # flat: no detail at all
    assert high_frequency_energy(smooth) < 0.002  # a ramp is smooth (and its borders do not count as edges)
    # white noise of sigma 10/255: 80 % of its power lies above half the Nyquist frequency
    assert high_frequency_energy(noisy) == pytest.approx(10 / 255 * np.sqrt(0.8), rel=0.15)
    assert high_frequency_energy(noisy) > 10 * high_frequency_energy(smooth)
    # more noise, more energy; a lower cutoff counts more of the spectrum
    louder = _img(_ramp() + rng.normal(0, 30, (64, 64, 3)))
    assert high_frequency_energy(louder) > 2 * high_frequency_energy(noisy)
    assert high_frequency_energy(noisy, cutoff=0.25) > high_frequency_energy(noisy, cutoff=0.75)
    assert mean_high_frequency([smooth, noisy]) == pytest.approx(
        (high_frequency_energy(smooth) + high_frequency_energy(noisy)) / 2)
    with pytest.raises(ValueError, match="Nyquist"):
        high_frequency_energy(smooth, cutoff=0)
    with pytest.raises(ValueError, match="at least one"):
        mean_high_frequency([])


def test_reference_distance_is_zero_for_identical_pictures_and_grows_with_the_difference():
    rng = np.random.default_rng(1)
    a = _img(rng.integers(0, 256, (32, 32, 3)))
    black, white = Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32), (255, 255, 255))
    assert reference_distance([a, black], [a.copy(), black]) == 0
    assert reference_distance([black], [white]) == pytest.approx(1.0)
    near = _img(np.asarray(a, dtype=float) + 5)
    assert 0 < reference_distance([near], [a]) < reference_distance([black], [a])
    with pytest.raises(ValueError, match="equally long"):
        reference_distance([a], [])
