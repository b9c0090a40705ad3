"""What an explanation request may cost, computed from its parameters before any work.

An explanation's work is its number of gradient evaluations (forward+backward passes of the
network): one IG path per (instance, explained output, baseline, SmoothGrad sample), each path
spending at most :func:`explain.parameters.max_path_evaluations`. Both factors are known from the
validated parameters and the model's metadata alone, so a server can refuse a request that would
exceed its budget with a clear answer instead of discovering it minutes (and gigabytes) later.
The figures come from the same places the explainer reads (``_METHOD_DEFAULT_BASELINES``, the
metadata's ``input_baselines``, the output names), so the estimate and the work never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from explain.explainer import _METHOD_DEFAULT_BASELINES, _io
from explain.parameters import (XRAI_METHOD, ExplanationConfig, ExplanationParametersError,
                                max_path_evaluations, parse_explanation_parameters)
from explain.visualization import parse_visualization

#: The default budget in gradient evaluations per request. Two default explanations must fit,
#: so a request of two images is not refused (1000, one image's worth, refused it: a new user's
#: first try at a batch): XRAI integrates from two baselines (black and white), each path up to the
#: adaptive cap of 400 evaluations, plus its region steps (about 20): 2 x 819 = 1638; default IG
#: fits five images. On MobileNetV2 @ 192 (about 10-13 ms per evaluation on 2 cores, through the
#: folded graph of :mod:`explain.folding`) the worst case is 20-26 s running alone, within the 60 s
#: deadline (explanations running at once share the cores: :mod:`serving.admission`),
#: and a path at the cap keeps 400 gradients of 442 KB (177 MB; 0.7 GB for the four paths), while
#: adaptive IG usually stops far below its cap; the request deadline bounds the rest.
DEFAULT_EXPLAIN_BUDGET = 2000


#: XRAI's region steps make no model call but are not free: multi-scale segmentation once per
#: image (0.5-0.6 s on one core, measured on 192 x 192 validation images) and region ranking once
#: per explained output (0.06-0.09 s with :func:`explain.xrai.rank_regions`), each about as long
#: as this many gradient evaluations of MobileNetV2 @ 192 on the 2-core host they were measured on
#: (34-45 ms each). Counted so the budget bounds them; on the current host an evaluation costs about
#: 10 ms, so they count for less than their time there, and the request deadline bounds the rest.
XRAI_SEGMENTATION_COST = 16
XRAI_RANKING_COST = 3


class ExplanationCostError(ValueError):
    """A request whose worst-case cost is over the budget; the message names both and the limit."""


@dataclass(frozen=True)
class RequestCost:
    """The factors of a request's worst-case cost in gradient evaluations."""

    instances: int
    outputs: int
    baselines: int
    samples: int
    path_evaluations: int
    #: evaluation-equivalents of XRAI's region steps (0 for IG)
    region_work: int = 0

    @property
    def paths(self) -> int:
        return self.instances * self.outputs * self.baselines * self.samples

    @property
    def total(self) -> int:
        return self.paths * self.path_evaluations + self.region_work

    def describe(self) -> str:
        def n(count: int, word: str) -> str:
            return f"{count} {word}{'' if count == 1 else 's'}"

        return (f"{n(self.instances, 'instance')} x {n(self.outputs, 'output')} x {n(self.baselines, 'baseline')} x "
                f"{n(self.samples, 'SmoothGrad sample')} x up to {self.path_evaluations} evaluations per path"
                + (f" + {self.region_work} for XRAI's regions" if self.region_work else "")
                + f" = {self.total} gradient evaluations")


def _outputs(config: ExplanationConfig, num_classes: int) -> int:
    if config.output_indices is not None:
        return len(set(config.output_indices))
    return num_classes if config.top_k == -1 else min(config.top_k, num_classes)


def _baselines(config: ExplanationConfig, input_metadata: Mapping[str, Any]) -> int:
    """How many baselines each path end is integrated from, by the explainer's precedence:
    blur config, named baselines, the metadata's ``input_baselines``, the method's default."""
    attribution = config.attribution
    if attribution.blur_baseline is not None:
        return 1
    if attribution.baselines is not None:
        return len(attribution.baselines)
    raw = input_metadata.get("input_baselines", input_metadata.get("inputBaselines")) or []
    if not isinstance(raw, list):
        raise ExplanationParametersError(f"explanation metadata input_baselines must be a list of baselines, "
                                         f"got {raw!r:.80}")
    if raw:
        return len(raw)
    return len(_METHOD_DEFAULT_BASELINES[attribution.method])


def request_cost(parameters: Mapping[str, Any] | ExplanationConfig, num_instances: int,
                 metadata: Mapping[str, Any], labels: list[str]) -> RequestCost:
    """The worst-case cost of explaining ``num_instances`` images with ``parameters`` (validated
    here, with the metadata's visualization and baseline list) against a model with explanation
    ``metadata`` and class ``labels``."""
    config = parse_explanation_parameters(parameters)
    io = _io(metadata, labels)
    parse_visualization(io.input_metadata.get("visualization"), config.method)  # refused now, not after work
    smooth = config.attribution.smooth_grad
    outputs = _outputs(config, len(io.display_names))
    regions = num_instances * (XRAI_SEGMENTATION_COST + outputs * XRAI_RANKING_COST) \
        if config.method == XRAI_METHOD else 0
    return RequestCost(instances=num_instances, outputs=outputs, baselines=_baselines(config, io.input_metadata),
                       samples=smooth.noisy_sample_count if smooth else 1,
                       path_evaluations=max_path_evaluations(config.attribution), region_work=regions)


def check_cost(cost: RequestCost, budget: int, budget_name: str = "budget") -> None:
    """Refuse ``cost`` over ``budget`` with a message a user can act on."""
    if cost.total > budget:
        raise ExplanationCostError(
            f"this explanation may cost {cost.describe()}, over the server's limit of {budget} gradient "
            f"evaluations per request ({budget_name}); send fewer instances, explain fewer outputs or "
            f"baselines, or lower max_step_count (step_count with target_error: null, fixed steps)")
