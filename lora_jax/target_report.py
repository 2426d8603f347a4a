"""What a pass over a model found for the config's targets, and the error when they miss.

    >>> report = TargetReport(hits={"qurey": 0}, adaptable={"encoder/query": "dense"})
    >>> try:
    ...     check_targets(type("C", (), {"targets": ("qurey",), "exclude": ()})(), report, "Dense")
    ... except ValueError as err:
    ...     print(str(err).splitlines()[0])
    LoRA target pattern(s) ['qurey'] matched no layer. Layers LoRA can adapt (Dense) in this model:
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class TargetReport:
    """Adaptable layers seen (path -> kind), hits per target pattern, and the layers targeted."""

    adaptable: dict[str, str] = dataclasses.field(default_factory=dict)
    hits: dict[str, int] = dataclasses.field(default_factory=dict)
    targeted: set[str] = dataclasses.field(default_factory=set)


def check_targets(config: Any, report: TargetReport, layer_names: str) -> None:
    """ValueError listing every adaptable layer path if a target pattern matched nothing or every
    matched layer is excluded (``layer_names``: the layer classes the front end adapts)."""
    missing = [t for t, n in report.hits.items() if n == 0]
    if not missing and report.targeted:
        return
    listing = "\n".join(f"  {p}  ({k})" for p, k in sorted(report.adaptable.items())) or "  (none)"
    if missing:
        problem = f"LoRA target pattern(s) {missing} matched no layer"
    else:
        problem = f"every layer matched by {list(config.targets)} is excluded by {list(config.exclude)}"
    raise ValueError(f"{problem}. Layers LoRA can adapt ({layer_names}) in this model:\n{listing}")
