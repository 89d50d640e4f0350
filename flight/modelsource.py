"""Where the gate's model comes from, and how it is (re)loaded verified.

A source is re-read from disk and verified on every load (start, reload after a failed self-test, swap):

  CardSource     an unsigned model card + artifact (sha256 from the card): the checkout / factory path
  PackageSource  a signed package file (flight.package), verified with the mission key
  SlotSource     slot "a" or "b" of an A/B model store (flight.slots), itself a package

open_loaded() reads the source, opens the runtime through the gate's backend factory, checks the card
against what the runtime loaded (flight.model.check_consistency) and runs the known-answer self-test
(flight.bist): against the package's golden results for a package, or, for an unsigned card (no golden
results exist), on golden tiles generated here, whose outputs become the reference later self-tests must
reproduce bit-exactly. Anything wrong -> ModelError (the previous model, if any, is untouched).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import quiet_factory  # noqa: F401  (moved to flight.backends: the old import path kept)
from .bist import BistResult, compare_golden, run_tiles
from .errors import ModelError, ModelIntegrityError
from .model import ModelCard, _runtime_available, check_consistency, resolve_model
from .modelmeta import MISSING_TEXT, check_description
from .package import BACKEND_ARTIFACT, DEFAULT_MAX_PACKAGE_BYTES, FLIGHT_ARTIFACTS, Package, open_package


def _litert_available() -> bool:
    return _runtime_available("ai_edge_litert") or _runtime_available("tflite_runtime")


@dataclass
class LoadedModel:
    """A model the gate may run: verified, consistent with its card, self-tested."""
    card: ModelCard
    kind: str                                 # litert | onnxruntime (the resolved backend kind)
    artifact_path: Path                       # the file, or PACKAGE/member for a packaged artifact
    sha256: str                               # of the artifact bytes the runtime was built from
    backend: object
    source: "Source"
    package: Package | None = None
    bist: BistResult | None = None
    reference: list[str] = field(default_factory=list)   # per golden tile output sha256 right after load
    load_s: float = 0.0
    metadata: str = ""                        # the model file's own card description: ok | missing (modelmeta)
    notes: list[tuple[str, str]] = field(default_factory=list)   # (event code, text) for the gate to log
    # an unsigned model's golden tiles: generated once, kept compressed as a package keeps them (~0.5 MB)
    golden_cache: list | None = field(default=None, repr=False)

    @property
    def package_sha256(self) -> str:
        return self.package.sha256 if self.package else ""

    @property
    def slot(self) -> str:
        return getattr(self.source, "slot", "") or ""

    def golden_tiles(self):
        """(kind, uint16 DN) golden tiles, one at a time: the package's, or for an unsigned model the ones
        flight.golden generates -- once per loaded model (regenerating them took ~3/4 of a HIL frame at
        bist_every 1), then decoded like a package's (~4x cheaper than generating)."""
        if self.package is not None:
            return self.package.golden_tiles()
        from .golden import decode_tile, encode_tile, iter_golden_tiles

        if self.golden_cache is None:
            self.golden_cache = [(kind, encode_tile(dn), dn.shape)
                                 for kind, dn in iter_golden_tiles(self.card.bands, self.card.optional_bands,
                                                                   self.backend.tile)]
        return ((kind, decode_tile(blob, shape)) for kind, blob, shape in self.golden_cache)


class Source:
    label = "model"
    signed = False

    def read(self, backend: str):
        """-> (card, kind, artifact path, verified bytes, package or None)."""
        raise NotImplementedError


class CardSource(Source):
    signed = False

    def __init__(self, model: str | None):
        self.model = model
        self.label = f"card {model}" if model else "the default model card"

    def read(self, backend: str):
        card, path, data = resolve_model(self.model, backend)
        kind = backend if backend != "auto" else ("litert" if path.suffix == ".tflite" else "onnxruntime")
        return card, kind, path, data, None


class PackageSource(Source):
    signed = True

    def __init__(self, path: str | Path, key: bytes, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES):
        self.path, self.key, self.max_bytes = Path(path), key, max_bytes
        self.label = f"package {self.path}"

    def _open(self) -> Package:
        return open_package(self.path, self.key, self.max_bytes)

    def read(self, backend: str):
        pkg = self._open()
        if backend == "auto":
            backend = "litert" if "tflite_int8" in pkg.artifacts and _litert_available() else "onnxruntime"
        key = BACKEND_ARTIFACT[backend]
        if key not in pkg.artifacts:
            raise ModelIntegrityError(f"{self.label} carries no {key} artifact for backend {backend} "
                                      f"(it carries {sorted(pkg.artifacts)})")
        fname, data = pkg.artifacts[key]
        pkg.card.sha256_of_loaded = pkg.card.artifacts[key]["sha256"]
        return pkg.card, backend, self.path / fname, data, pkg


class SlotSource(PackageSource):
    """A store slot. Only an activated package runs (flight.slots.ModelStore.activated): a package installed
    but never activated (staged) is refused, whatever points at it."""

    def __init__(self, store, slot: str):
        self.store, self.slot = store, slot
        super().__init__(store.package_path(slot), store.key, store.max_bytes)
        self.label = f"slot {slot} ({self.path})"

    def _open(self) -> Package:
        pkg = super()._open()
        if not self.store.activated(self.slot, pkg.sha256):
            raise ModelIntegrityError(f"{self.label} holds package {pkg.sha256[:12]} ({pkg.name}), installed but never "
                                      f"activated: a gate runs only activated packages (python -m flight model "
                                      f"activate {self.slot} --store {self.store.root})")
        return pkg


def open_loaded(source: Source, backend: str, factory, threads: int, tile: int) -> LoadedModel:
    """Read, verify, open, check and self-test a model from source. ModelError on anything wrong."""
    t0 = time.perf_counter()
    card, kind, path, data, pkg = source.read(backend)
    if pkg is not None and pkg.expected(kind) is None:
        raise ModelIntegrityError(f"{source.label} has no golden results for backend {kind} (it has "
                                  f"{sorted(pkg.golden['expected'])}); it cannot be self-tested here")
    meta = check_description(card, data, kind, path.name)      # the card must be the model's own, signed or not
    b = factory(path, data, kind, threads, tile, card.input_channels)
    del data                                           # the runtime holds what it needs (LiteRT: this buffer)
    check_consistency(card, b, path.name)
    lm = LoadedModel(card=card, kind=kind, artifact_path=path, sha256=card.sha256_of_loaded, backend=b,
                     source=source, package=pkg, metadata=meta)
    if meta == "missing" and not source.signed:          # a signed package's card is bound by its signature
        lm.notes.append(("model_metadata_missing", f"{source.label}: {path.name} {MISSING_TEXT}"))
    t1 = time.perf_counter()
    results = run_tiles(b, lm.golden_tiles())
    bist_s = time.perf_counter() - t1
    if pkg is not None:
        ok, exact, detail = compare_golden(results, pkg.expected(kind)["tiles"], pkg.golden["tolerance"])
        lm.bist = BistResult(ok, f"against the package's golden results ({kind}): {detail}", results, bist_s, exact)
        if not ok:
            raise ModelIntegrityError(f"{source.label} failed its known-answer self-test on {kind}: {detail}")
    else:
        lm.bist = BistResult(True, f"{len(results)} golden tiles run; unsigned model: their outputs are the "
                                   "reference for later self-tests", results, bist_s, True)
    lm.reference = [r.output_sha256 for r in results]
    lm.load_s = time.perf_counter() - t0
    return lm


__all__ = ["CardSource", "LoadedModel", "ModelError", "PackageSource", "SlotSource", "Source", "open_loaded",
           "FLIGHT_ARTIFACTS"]
