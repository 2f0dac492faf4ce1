"""Range checks of the query parameters of rendered resources (PS3.18 §8.3.5), the one
place their rules live (`wado.parse_render_parameters` calls them before parsing): a value
that is not a number, or out of its range, is a 400 with the JSON error body, never a 500
further on, and a render's work stays bounded.

| parameter | accepted |
|---|---|
| `quality` | an integer 1–100 |
| `viewport` | `vw,vh[,sx,sy,sw,sh]`: vw, vh integers 1–4096; sx, sy, sw, sh empty or finite numbers within ±65535 |
| `window` | `center,width[,function]`: finite numbers within ±1e16 (a DS value has 16 characters), width above 0; function `linear`, `linear-exact` or `sigmoid` |

(`limit` and `offset` are checked by the QIDO-RS parser, `qido.MAX_LIMIT` and `qido.MAX_OFFSET`.)
"""

from __future__ import annotations

import math

from web_viewer_api.errors import BadRequest

#: The largest side of a rendered image: a render's work is bounded by it.
MAX_VIEWPORT = 4096
#: Rows and Columns are US: no crop region lies further.
MAX_REGION = 65535
#: A Window Center or Width is a DS value, at most 16 characters: never beyond this.
MAX_WINDOW_VALUE = 1e16
WINDOW_FUNCTIONS = frozenset({"linear", "linear-exact", "linear_exact", "sigmoid"})


def _number(raw: str, what: str, limit: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{what} must be a number") from None
    if not math.isfinite(value) or abs(value) > limit:
        raise BadRequest(f"{what} must be a finite number within ±{limit:g}")
    return value


def check_quality(raw: str) -> None:
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest("quality must be an integer from 1 to 100") from None
    if not 1 <= value <= 100:
        raise BadRequest("quality must be an integer from 1 to 100")


def check_viewport(raw: str) -> None:
    values = raw.split(",")
    if len(values) not in (2, 6):
        raise BadRequest("viewport is vw,vh or vw,vh,sx,sy,sw,sh")
    for name, value in zip(("vw", "vh"), values[:2], strict=True):
        try:
            size = int(value)
        except ValueError:
            raise BadRequest(
                f"viewport {name} must be an integer from 1 to {MAX_VIEWPORT}"
            ) from None
        if not 1 <= size <= MAX_VIEWPORT:
            raise BadRequest(f"viewport {name} must be an integer from 1 to {MAX_VIEWPORT}")
    for name, value in zip(("sx", "sy", "sw", "sh"), values[2:], strict=False):
        if value.strip():
            _number(value, f"viewport {name}", MAX_REGION)


def check_window(raw: str) -> None:
    values = raw.split(",")
    if len(values) not in (2, 3):
        raise BadRequest("window is center,width[,function]")
    _number(values[0], "window center", MAX_WINDOW_VALUE)
    if _number(values[1], "window width", MAX_WINDOW_VALUE) <= 0:
        raise BadRequest("window width must be above 0")
    if len(values) == 3 and values[2].strip().lower() not in WINDOW_FUNCTIONS:
        raise BadRequest("window function is linear, linear-exact or sigmoid")
