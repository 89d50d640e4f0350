"""A shadow run's record in the model store: where it lies, how it is read, and whether it clears the bar.

Its own module because the store (flight.slots) judges an activation by it while the monitor that writes it
(flight.shadow) runs a whole CloudGate: the store importing the monitor closed an import circle
(gate -> custody -> slots -> shadow -> gate)."""
from __future__ import annotations

import json

SHADOW_FILE = "shadow.json"


def read_shadow(store, slot: str) -> dict | None:
    """The shadow record of slot (None when there is none or it is unreadable)."""
    try:
        obj = json.loads((store.root / "slots" / slot / SHADOW_FILE).read_text())
        return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None


def shadow_verdict(record: dict | None, package_sha256: str, frames: int, min_agreement: float) -> str | None:
    """None when the record shows package_sha256 ran >= frames shadow frames with action agreement >=
    min_agreement; else why not (a sentence)."""
    if record is None or record.get("package_sha256") != package_sha256:
        return f"no shadow run of this package yet (needs {frames} frames beside the active model)"
    if record.get("frames", 0) < frames:
        return f"{record.get('frames', 0)} of {frames} shadow frames so far"
    if record.get("action_agreement", 0.0) < min_agreement:
        return (f"action agreement {record['action_agreement']:.3f} over {record['frames']} shadow frames is under "
                f"{min_agreement:.3f} (mean |cloud fraction difference| {record.get('mean_abs_cf_diff', 0):.3f})")
    return None
