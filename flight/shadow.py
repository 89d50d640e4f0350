"""Shadow mode: a newly installed (staged) model runs beside the active one on the next N real frames.

ShadowMonitor is a component of its own with one input port, observe(): the payload loop calls it after
each CloudGate.process() with the same frame, the active gate's Decision and (optionally) the active mask
it wrote. The monitor runs the candidate (the store slot holding a package installed but not activated,
loaded verified and self-tested in a gate of its own, without a decision log) on the frame and compares:

    action agreement      same action (downlink / discard / fault ...)
    cloud fraction        |candidate - active| (fraction of valid pixels)
    pixel agreement       share of pixels with the same class (when the active mask is given)

Each compared frame is a `model_shadow` model event in STORE/journal.jsonl; after N frames the summary
goes to STORE/slots/S/shadow.json (for the package it measured) and a `model_shadow` event says whether
it meets the bar. A ModelStore(..., shadow_frames=N, shadow_min_agreement=x) (CLI --shadow-frames /
--min-agreement; the gate config update.shadow_frames / update.shadow_min_agreement) then refuses to
activate (event `model_shadow_held`, exit 1, ShadowHeldError) a slot whose shadow record for that package
has fewer than N frames or an action agreement under x. The monitor never changes what the active gate decided, and a candidate that
fails to load or faults is recorded, not raised: the payload loop never dies of it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import ModelError
from .shadowrecord import SHADOW_FILE, read_shadow, shadow_verdict

class ShadowMonitor:
    """Runs the store's staged package beside the active gate. store: flight.slots.ModelStore; key_path:
    the mission key file (the gate's update.key) the candidate's package is verified with; frames: N;
    gate_options: CloudGate.from_model keyword arguments for the candidate's gate (backend, threads, tile,
    policy...; the active gate's, without log/update); time_budget_s: skip the candidate on a frame when
    the active decision already took longer than this (0: never skip)."""

    def __init__(self, store, key_path: str | Path, frames: int = 20, gate_options: dict | None = None,
                 time_budget_s: float = 0.0):
        if frames < 1:
            raise ValueError("shadow frames must be >= 1")
        self.key_path = str(key_path)
        self.store, self.frames, self.time_budget_s = store, int(frames), float(time_budget_s)
        self.gate_options = dict(gate_options or {})
        self._gate = None
        self._slot = self._sha = None
        self._stats: dict = {}
        self._mask = None
        self._refused: set[str] = set()

    # ------------------------------------------------------------ the candidate
    def _candidate(self) -> tuple[str, str] | None:
        """(slot, package sha256) of a package installed but not activated that verifies, or None."""
        from .package import open_package

        active = set(self.store.runnable())
        for s in ("a", "b"):
            if s in active:
                continue
            try:
                pkg = open_package(self.store.package_path(s), self.store.key, self.store.max_bytes)
            except ModelError:
                continue
            if not self.store.activated(s, pkg.sha256) and pkg.sha256 not in self._refused:
                return s, pkg.sha256
        return None

    def _ensure(self) -> bool:
        cand = self._candidate()
        if cand is None:
            self._close()
            return False
        if cand == (self._slot, self._sha) and self._gate is not None:
            return True
        self._close()
        rec = read_shadow(self.store, cand[0])
        if rec and rec.get("package_sha256") == cand[1] and rec.get("frames", 0) >= self.frames:
            return False                                  # already measured
        try:
            self._gate = self._open(cand[0])
        except Exception as e:                            # a candidate that does not load: recorded, not raised
            self._refused.add(cand[1])
            self.store.journal("model_shadow", f"slot {cand[0]}: the candidate does not load for shadow mode: "
                               f"{e}"[:1000], model_slot=cand[0], package_sha256=cand[1])
            return False
        self._slot, self._sha = cand
        self._stats = {"frames": 0, "agree": 0, "cf_diff": 0.0, "pix_agree": 0.0, "pix_frames": 0, "seconds": 0.0}
        self.store.journal("model_shadow", f"slot {cand[0]}: shadow mode started for {self.frames} frames",
                           model_slot=cand[0], package_sha256=cand[1])
        return True

    def _open(self, slot: str):
        """The candidate's gate: the slot's package, verified with the mission key and self-tested, no log."""
        from .gate import CloudGate

        opts = dict(self.gate_options)
        opts.pop("log", None)
        opts.pop("update", None)
        return CloudGate.from_model(str(self.store.package_path(slot)), update={"key": self.key_path, "bist_every": 0},
                                    **opts)

    def _close(self) -> None:
        if self._gate is not None:
            try:
                self._gate.close()
            except Exception:
                pass
        self._gate, self._slot, self._sha = None, None, None

    def close(self) -> None:
        self._close()

    # ------------------------------------------------------------ the port
    def observe(self, scene, band_names, decision, active_mask: np.ndarray | None = None, **process_kw) -> dict | None:
        """Run the candidate on the frame the active gate just decided (same arguments as its process()
        call, without mask_out) and log the comparison. Returns the per-frame comparison, or None when there
        is no candidate or the frame was skipped. Never raises."""
        try:
            if not self._ensure():
                return None
            if self.time_budget_s and decision.latency_s > self.time_budget_s:
                return None
            mask = None
            if active_mask is not None:
                if self._mask is None or self._mask.shape != active_mask.shape:
                    self._mask = np.empty(active_mask.shape, np.uint8)
                mask = self._mask
            t0 = time.perf_counter()
            d = self._gate.process(scene, band_names, mask_out=mask, **process_kw)
            st = self._stats
            st["seconds"] += time.perf_counter() - t0
            same = d.action == decision.action
            cf = abs(float(d.cloud_fraction) - float(decision.cloud_fraction))
            out = {"frame": st["frames"] + 1, "active": decision.action, "candidate": d.action, "agree": same,
                   "cf_diff": round(cf, 4)}
            if mask is not None:
                ok = (active_mask != 255) & (mask != 255)
                if ok.any():
                    out["pixel_agreement"] = round(float(np.mean(active_mask[ok] == mask[ok])), 4)
                    st["pix_agree"] += out["pixel_agreement"]
                    st["pix_frames"] += 1
            st["frames"] += 1
            st["agree"] += int(same)
            st["cf_diff"] += cf
            self.store.journal("model_shadow", f"slot {self._slot} shadow frame {out['frame']}/{self.frames}: active "
                               f"{decision.action}, candidate {d.action}, |cloud fraction diff| {cf:.3f}"
                               + (f", pixel agreement {out['pixel_agreement']:.3f}" if "pixel_agreement" in out else ""),
                               model_slot=self._slot, package_sha256=self._sha)
            if st["frames"] >= self.frames:
                self._finish()
            return out
        except Exception as e:                            # the payload loop never dies of the shadow
            try:
                self.store.journal("model_shadow", f"shadow frame failed: {type(e).__name__}: {e}"[:1000])
            except Exception:
                pass
            return None

    def _finish(self) -> None:
        from .atomicwrite import write_atomic

        st, n = self._stats, self._stats["frames"]
        rec = {"package_sha256": self._sha, "slot": self._slot, "frames": n,
               "action_agreement": round(st["agree"] / n, 4), "mean_abs_cf_diff": round(st["cf_diff"] / n, 4),
               "pixel_agreement": round(st["pix_agree"] / st["pix_frames"], 4) if st["pix_frames"] else None,
               "candidate_s_per_frame": round(st["seconds"] / n, 4),
               "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(self.store.root / "slots" / self._slot / SHADOW_FILE, (json.dumps(rec) + "\n").encode())
        self.store.journal("model_shadow", f"slot {self._slot}: shadow run done: {n} frames, action agreement "
                           f"{rec['action_agreement']:.3f}, mean |cloud fraction diff| {rec['mean_abs_cf_diff']:.3f}"
                           + (f", pixel agreement {rec['pixel_agreement']:.3f}" if rec["pixel_agreement"] is not None
                              else ""), model_slot=self._slot, package_sha256=self._sha)
        self._close()


__all__ = ["ShadowMonitor", "read_shadow", "shadow_verdict"]
