"""Shared by the export tests: the same-seed picture of a model, and how far two such pictures are apart."""

from nbkit import generate
from nbkit.export.takehome import pixel_difference

PROMPT = "a photo of zwx star on a green background"


def draw(pipe, prompt: str = PROMPT, seed: int = 0, steps: int = 2, size: int = 64, scheduler: str = "ddim"):
    """One picture: few steps and one seed are enough to compare two models pixel by pixel."""
    return generate(pipe, prompt, seeds=[seed], steps=steps, size=size, scheduler=scheduler)[0]


def assert_same_picture(trained, reloaded, mean: float = 1e-3, largest: int = 255, **kw) -> tuple[float, int]:
    """The reloaded model draws what the trained one draws (same prompt, seed, steps), within `mean` and `largest`
    pixel levels; returns (mean, largest)."""
    diff = pixel_difference(draw(trained, **kw), draw(reloaded, **kw))
    assert diff[0] <= mean and diff[1] <= largest, diff
    return diff
