"""How big each benchmark runs: ``full`` (sized to finish under 30 minutes on 2 CPU cores) and
``quick`` (seconds per comparison, for the smoke test in ``make test``).

One dataclass holds every size so the report can print exactly what was measured.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    """Every size a benchmark reads. ``name`` keys the cache of built data and models."""

    name: str
    # data and model built by bench.fixtures
    num_train: int
    num_eval: int
    backbone_images: int
    backbone_epochs: int
    train_epochs: int
    # 1. IG at equal error
    ig_images: int
    ig_repeats: int
    ig_targets: tuple[float, ...] = (0.01, 0.05)
    riemann_ladder: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    gauss_ladder: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
    # 2. XRAI
    xrai_images: int = 2
    xrai_steps: int = 50
    #: None: saliency.XRAI's defaults (100 steps); the quick profile sets a few
    xrai_reference_steps: int | None = None
    # 3. training
    training_epochs: int = 3
    training_repeats: int = 1
    # 4. serving
    predict_requests: int = 30
    explain_requests: int = 6
    concurrency: tuple[int, ...] = (1, 4)
    serving_explain_steps: int = 50
    # 5. scale
    scale_steps: tuple[int, ...] = (8, 16, 32, 64)
    scale_batches: tuple[int, ...] = (1, 2, 4)
    scale_sizes: tuple[int, ...] = (96, 192, 288)
    #: steps of the batch and image-size series
    scale_base_steps: int = 16
    scale_repeats: int = 1
    # explanation quality
    quality_images: int = 12
    quality_steps: tuple[int, ...] = (8, 16, 32)
    sanity_images: int = 8
    quality_ig_steps: int = 32
    smoothgrad_samples: int = 3
    smoothgrad_steps: int = 16
    smoothgrad_sigma: float = 0.1
    #: PIC re-interpolates the image (scipy griddata) at every threshold: seconds each, so few
    pic_images: int = 12
    pic_thresholds: tuple[float, ...] = (0.01, 0.03, 0.05, 0.10, 0.21, 0.5, 0.75)
    seed: int = 42

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Profile(name="full", num_train=600, num_eval=150, backbone_images=800, backbone_epochs=5, train_epochs=15,
               ig_images=3, ig_repeats=1, xrai_images=3, training_epochs=8, training_repeats=1,
               predict_requests=40, explain_requests=6, quality_images=12)

QUICK = Profile(name="quick", num_train=40, num_eval=10, backbone_images=40, backbone_epochs=1, train_epochs=2,
                ig_images=1, ig_repeats=1, riemann_ladder=(4, 8), gauss_ladder=(2, 4), xrai_images=1, xrai_steps=4,
                xrai_reference_steps=4, training_epochs=1, predict_requests=3, explain_requests=1,
                serving_explain_steps=4, scale_steps=(4, 8), scale_batches=(1, 2), scale_sizes=(64, 96),
                scale_base_steps=4, quality_images=2, quality_steps=(4, 8), quality_ig_steps=4, sanity_images=2, pic_images=2,
                smoothgrad_samples=2, smoothgrad_steps=2, pic_thresholds=(0.05, 0.2, 0.5))

PROFILES = {p.name: p for p in (FULL, QUICK)}
