"""How big each benchmark runs: ``full`` (sized to finish in about 35 minutes on 2 quiet CPU
cores with the real network, MobileNetV2 1.0 @ 192) and ``quick`` (tiny data and steps, for the
smoke test in ``make test``).

Both profiles use the same backbone: the one cached build of :data:`trainer.backbone.DEFAULT_RECIPE`
that the demo and the tests share, so the figures describe the network users deploy and the smoke
test pays only for the cached build. One dataclass holds every size so the report can print
exactly what was measured.

Costs the full profile is sized by (2 quiet cores, MobileNetV2 @ 192): one forward+backward pass
~15 ms per image in batches, a forward pass ~5 ms, a training step ~130 ms per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trainer.schema import DEFAULT_ADAPTIVE_START, XRAI_MIN_START


#: batch sizes of the forward+backward floor's curve (the floor is the cheapest per image)
FLOOR_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class Profile:
    """Every size a benchmark reads. ``name`` keys the cache of built data and models."""

    name: str
    # data and classifier built by bench.fixtures (the backbone is the shared cached build)
    num_train: int
    num_eval: int
    train_epochs: int
    # 1. IG at equal error
    ig_images: int
    ig_repeats: int = 1
    ig_targets: tuple[float, ...] = (0.05, 0.01)
    #: fixed step counts searched for the speed-up (a reference missing the target at the largest
    #: gives a lower bound); "every image within the target" uses those up to ``ig_max_steps``
    ig_ladder: tuple[int, ...] = (16, 32, 50, 64, 100, 128, 200, 256, 400)
    #: the default request's ``step_count`` (where our refinement starts; configs/local.yaml's) and
    #: its evaluation cap
    ig_start_steps: int = DEFAULT_ADAPTIVE_START
    ig_max_steps: int = 400
    #: batch sizes of the floor's curve (each size costs a trace of the gradient)
    floor_batches: tuple[int, ...] = FLOOR_BATCH_SIZES
    # 1b. IG maps against the converged integral
    map_images: int = 8
    #: the converged map: refined from this many points to this error, within this many evaluations
    map_reference_start: int = 33
    map_reference_target: float = 0.002
    map_reference_steps: int = 1500
    map_reference_map_target: float = 0.02
    #: the fixed rule's step counts: what section 1 found the references need for 5% and 1%, and
    #: between them, where the rule's maps match ours' default (equal map accuracy)
    map_fixed_steps: tuple[int, ...] = (100, 150, 200, 250, 300, 600)
    #: a ``map_target`` stricter than the default, for the contender refined to 1%
    map_high_target: float = 0.05
    # 2. XRAI
    xrai_images: int = 2
    #: our request's ``xrai_attribution.step_count`` (the config's; refinement does the rest)
    xrai_steps: int = XRAI_MIN_START
    #: None: saliency.XRAI's defaults (100 steps); the quick profile sets a few
    xrai_reference_steps: int | None = None
    #: step counts tried for the accurate saliency.XRAI (the first whose median IG error is <= 0.05)
    xrai_accurate_ladder: tuple[int, ...] = (100, 200, 400)
    # 3. training (the lab's scale: 15 epochs over the flowers dataset's 3,670 images)
    training_epochs: int = 15
    #: train on the first this many of the 4 training shards (None: all); the lab's pipeline re-runs
    #: the backbone on every image of every epoch, so its time is what sizes this
    training_shards: int | None = None
    training_repeats: int = 1
    # 4. serving
    explain_requests: int = 20
    predict_requests: int = 200
    predict_concurrency: int = 8
    predict_batch: int = 8
    # 5. scale
    scale_steps: tuple[int, ...] = (16, 32, 64, 128)
    scale_batches: tuple[int, ...] = (1, 2, 4)
    scale_sizes: tuple[int, ...] = (96, 192, 288)
    #: steps of the batch and image-size series
    scale_base_steps: int = 32
    scale_repeats: int = 1
    # 6. bulk explanations and predictions (bench/batch_throughput.py)
    batch_images: int = 16
    #: fixed IG steps per image of the bulk-explanation throughput (Vertex's usual 50): a fixed count
    #: makes the floor exact (evaluations x one forward+backward pass)
    batch_steps: int = 50
    #: images of the bulk-prediction throughput (a prediction costs ~1/100 of an explanation)
    batch_predict_images: int = 256
    batch_repeats: int = 3
    # explanation quality
    quality_images: int = 12
    #: fixed step counts of the completeness table (ig_speed has the full ladder)
    quality_steps: tuple[int, ...] = (50,)
    sanity_images: int = 6
    quality_ig_steps: int = 50
    smoothgrad_samples: int = 3
    smoothgrad_steps: int = 16
    smoothgrad_sigma: float = 0.1
    #: PIC re-interpolates the image (scipy griddata) at every threshold: seconds each, so few
    pic_images: int = 12
    pic_thresholds: tuple[float, ...] = (0.01, 0.03, 0.05, 0.10, 0.21, 0.5, 0.75)
    seed: int = 42

    def as_dict(self) -> dict:
        """The sizes, plus the product's request defaults (:func:`request_defaults`) that the
        comparisons of ours' default request measure: a later ``--only`` keeps a result only if
        they are unchanged too."""
        return dict(asdict(self), request_defaults=request_defaults())


def request_defaults() -> dict:
    """What a request that names nothing but ``step_count`` gets (:mod:`explain.parameters`)."""
    from explain import parameters

    return {name: getattr(parameters, name) for name in (
        "DEFAULT_TARGET_ERROR", "DEFAULT_MAP_TARGET", "DEFAULT_MAX_ADAPTIVE_STEPS", "DEFAULT_ADAPTIVE_START",
        "XRAI_MIN_START")}


FULL = Profile(name="full", num_train=3670, num_eval=367, train_epochs=15, ig_images=12, xrai_images=12,
               ig_ladder=(16, 32, 50, 64, 100, 128, 200, 400, 600), training_epochs=15, training_shards=1,
               quality_images=12, pic_images=4, sanity_images=4)

QUICK = Profile(name="quick", num_train=40, num_eval=12, train_epochs=2, ig_images=3, ig_ladder=(4, 8, 16),
                ig_start_steps=4, ig_max_steps=16, floor_batches=(1, 4), map_images=1, map_reference_start=5,
                map_reference_target=0.01, map_reference_steps=32, map_fixed_steps=(4, 16), xrai_images=1,
                xrai_steps=4, xrai_reference_steps=4,
                xrai_accurate_ladder=(4, 8), training_epochs=1, explain_requests=2, predict_requests=8,
                predict_concurrency=2, predict_batch=2, scale_steps=(4, 8), scale_batches=(1, 2),
                scale_sizes=(64, 96), scale_base_steps=4, batch_images=2, batch_steps=4, batch_predict_images=4,
                batch_repeats=1, quality_images=2,
                quality_steps=(4, 8),
                quality_ig_steps=4, sanity_images=2, pic_images=2, smoothgrad_samples=2, smoothgrad_steps=2,
                pic_thresholds=(0.05, 0.2, 0.5))

PROFILES = {p.name: p for p in (FULL, QUICK)}

#: Fields every comparison reads: the data and the classifier built by bench.fixtures.
ASSET_FIELDS = ("name", "num_train", "num_eval", "train_epochs", "seed")
#: The fields each comparison reads besides those: ``--only`` keeps another comparison's last
#: results exactly when none of its fields changed, and the report prints them as its sizes.
COMPARISON_FIELDS = {
    "ig_speed": ("request_defaults", "ig_images", "ig_ladder", "ig_targets", "ig_start_steps", "ig_max_steps", "ig_repeats",
                 "floor_batches"),
    "ig_maps": ("request_defaults", "map_images", "map_reference_start", "map_reference_target", "map_reference_steps",
                "map_reference_map_target",
                "map_fixed_steps", "map_high_target", "ig_targets", "ig_start_steps", "ig_max_steps"),
    "xrai_speed": ("request_defaults", "xrai_images", "xrai_steps", "xrai_reference_steps", "xrai_accurate_ladder", "ig_max_steps"),
    "training": ("num_train", "training_shards", "num_eval", "training_epochs", "training_repeats"),
    "serving": ("request_defaults", "explain_requests", "predict_requests", "predict_concurrency", "predict_batch", "ig_start_steps",
                "ig_max_steps"),
    "scale": ("scale_steps", "scale_batches", "scale_sizes", "scale_base_steps", "scale_repeats"),
    "batch_throughput": ("batch_images", "batch_steps", "batch_predict_images", "batch_repeats", "floor_batches"),
    "quality": ("quality_images", "quality_steps", "quality_ig_steps", "sanity_images", "pic_images",
                "smoothgrad_samples", "smoothgrad_steps", "smoothgrad_sigma", "pic_thresholds"),
}
