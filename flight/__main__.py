"""python -m flight run SCENE... [--model M] [--config C] [--log FILE]
   python -m flight log summary FILE [--action A] [--reason R] [--limit N] [--png OUT.png]
   python -m flight log schema            (docs/decision-log.md, from flight.logschema)
   python -m flight model keygen KEYFILE
   python -m flight model pack CARD|default --out PKG [--key KEYFILE] [--model-version N] [--backend ...]
   python -m flight model verify PKG [--key KEYFILE] [--backend ...]
   python -m flight model install PKG --store DIR [--key KEYFILE] [--activate] [--allow-downgrade]
                                  [--shadow-frames N --min-agreement X]
   python -m flight model activate [a|b] --store DIR [--key KEYFILE] [--allow-downgrade]
                                  [--shadow-frames N --min-agreement X]
   python -m flight model rollback --store DIR [--key KEYFILE]
   python -m flight model status --store DIR [--key KEYFILE] [--verify]
   python -m flight model stamp CARD|default [--dry-run]

Exit status (run, log): 0 done; 1 some input could not be read; 2 nothing to do (missing/unreadable file,
a decision log without one intact record, empty or missing directory, bad config or model).
Exit status (model): 0 done; 1 refused: the package or slot does not verify (signature, truncation,
card <-> model mismatch, known-answer self-test, a model_version older than the store has activated),
nothing active changed (status: a slot or the pointer does not verify); 2 usage: a missing file, key or
store, a bad key; 3 the store is busy (another install or switch holds its lock); 4 no space on the
store's file system for the package plus the log margin (nothing written); 5 the store's file system
failed (I/O error, read-only), nothing changed. The mission key is --key FILE or $CLOUDGATE_MISSION_KEY
(a path): one line of hex digits (64 or more), as keygen writes."""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

from .policy import ACTIONS, RULES


def _run(a) -> int:
    from .config import config_from_dict, load_config
    from .errors import CloudGateError
    from .gate import CloudGate
    from .logsummary import safe_text
    from .scenefile import read_npz_scene

    # the inputs first: nothing (decision log, its lock file) is created for a run that has nothing to gate
    paths = []
    for s in a.scenes:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("**/*.npz"))
            if not found:
                print(f"error: directory {p} holds no .npz scene files", file=sys.stderr)
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            print(f"error: scene {p} not found", file=sys.stderr)
    if not paths:
        print("error: no scene files to gate", file=sys.stderr)
        return 2
    try:
        if a.config:
            cfg = load_config(a.config)
        else:
            cfg = config_from_dict({})
        from dataclasses import replace

        if a.model:
            cfg = replace(cfg, model=a.model)
        if a.backend:
            cfg = replace(cfg, backend=a.backend)
        if a.log:
            cfg = replace(cfg, log=replace(cfg.log, path=a.log))
        gate = CloudGate(cfg)
    except CloudGateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# model {gate.card.name} ({gate.backend.name}, sha256 {gate.card.sha256_of_loaded[:12]}) "
          f"policy {cfg.policy.version}", flush=True)
    unreadable = 0
    with gate:
        for p in paths:
            try:
                sc = read_npz_scene(p)
            except (OSError, ValueError, KeyError) as e:
                print(f"{p.stem:40s} unreadable: {e}", flush=True)
                unreadable += 1
                continue
            d = gate.process(sc["bands"], sc["band_names"], scene_id=sc["scene_id"], valid_mask=sc["valid_mask"],
                             radiometry=sc["radiometry"], priority=a.priority)
            extra = f" fault={d.fault}" if d.fault else ""
            extra += f" degraded={d.degraded_text}" if d.degraded else ""
            extra += f" rule={d.rule}"
            extra += f" partial={len(d.clear_tiles)} clear tiles" if d.partial else ""
            print(f"{safe_text(d.scene_id):40s} {d.action:9s} cloud={d.cloud_fraction:.3f} valid={d.valid_fraction:.3f} "
                  f"tiles={d.tiles_processed}/{d.tiles_total} bound=[{d.confidence_bound[0]:.2f},{d.confidence_bound[1]:.2f}] "
                  f"{d.latency_s * 1e3:.0f}ms{extra}", flush=True)
    if unreadable:
        print(f"error: {unreadable} of {len(paths)} scene file(s) unreadable", file=sys.stderr)
    return 1 if unreadable else 0


def _summary(a) -> int:
    from .logsummary import NoReadableRecordError, summarize

    p = Path(a.file)
    if not p.is_file():
        print(f"error: decision log {p} not found (or not a file)", file=sys.stderr)
        return 2
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        print(f"error: decision log {p} is unreadable: {e}", file=sys.stderr)
        return 2
    try:
        text = summarize(p, a.png, a.action, a.reason, a.limit)
    except NoReadableRecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_safely(text)
    return 0


def _print_safely(text: str) -> None:
    """print text on any terminal encoding (what the terminal cannot show comes out as an escape)."""
    try:
        sys.stdout.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError):           # a replaced stdout (tests, pipes wrapped by a caller)
        pass
    print(text, flush=True)


def _schema(a) -> int:
    from .logschema import render_markdown

    print(render_markdown(), end="")
    return 0


EXIT_REFUSED, EXIT_USAGE, EXIT_BUSY, EXIT_NO_SPACE, EXIT_STORE_IO = 1, 2, 3, 4, 5


def _model(a) -> int:
    from .errors import ModelError, ModelMissingError
    from .package import PackageKeyError, load_key, pack, write_key
    from .slots import ModelStore, ShadowHeldError, StoreBusyError, StoreFullError, StoreIOError, StoreUnusableError

    def err(code: int, msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return code

    if a.modelcmd == "keygen":
        try:
            kid = write_key(a.keyfile)
        except FileExistsError:
            return err(EXIT_USAGE, f"{a.keyfile} exists; a key file is never overwritten")
        except OSError as e:
            return err(EXIT_USAGE, f"cannot write {a.keyfile}: {e}")
        print(f"mission key written to {a.keyfile} (mode 0600, one line of 64 hex digits), key id {kid}")
        return 0
    if a.modelcmd == "stamp":
        return _stamp(a, err)
    store_dir = getattr(a, "store", None)
    if store_dir is not None:
        sp = Path(store_dir)
        if a.modelcmd == "status" and not sp.exists():
            return err(EXIT_USAGE, f"model store {sp} not found (give the directory the gate's update.store names)")
        if sp.exists() and not sp.is_dir():
            return err(EXIT_USAGE, f"model store {sp} is not a directory")
    try:
        key = load_key(a.key) if (a.key or a.modelcmd != "status") else None
        if a.modelcmd == "status" and key is None:
            try:
                key = load_key(None)
            except PackageKeyError:
                key = None
    except PackageKeyError as e:
        return err(EXIT_USAGE, str(e))
    backends = tuple(a.backend) if getattr(a, "backend", None) else None
    try:
        if a.modelcmd == "pack":
            card = _card_arg(a.card)
            pkg = pack(card, key, a.out, backends=backends, threads=a.threads, model_version=a.model_version)
            print(f"packed {pkg.name} (model_version {pkg.card.raw.get('model_version')}) -> {a.out}: {pkg.size} "
                  f"bytes, package sha256 {pkg.sha256}, key id {pkg.header['key_id']}, artifacts "
                  f"{', '.join(sorted(pkg.artifacts))}, golden results for {', '.join(sorted(pkg.golden['expected']))} "
                  f"on {len(pkg.golden['tiles'])} tiles")
            return 0
        if a.modelcmd == "verify":
            if not Path(a.package).exists():
                return err(EXIT_USAGE, f"package {a.package} not found")
            store = ModelStore(Path(a.package).parent, key, int(a.max_mib * 2**20), backends=backends, threads=a.threads)
            pkg, results = store.verify_file(Path(a.package))
            print(f"{a.package}: signature ok (key id {pkg.header['key_id']}), {pkg.name} model_version "
                  f"{pkg.card.raw.get('model_version', 0)}, {pkg.size} bytes, sha256 {pkg.sha256}")
            for kind, r in results.items():
                print(f"  {kind}: card <-> model consistent; self-test {r.detail} ({r.seconds * 1e3:.0f} ms)")
            return 0
        if getattr(a, "min_agreement", 0.0) and not getattr(a, "shadow_frames", 0):
            return err(EXIT_USAGE, "--min-agreement needs --shadow-frames N (N > 0): without a shadow run there is "
                                   "no agreement to check")
        store = ModelStore(a.store, key, int(a.max_mib * 2**20), backends=backends, threads=a.threads,
                           lock_timeout_s=a.lock_timeout, shadow_frames=getattr(a, "shadow_frames", 0),
                           shadow_min_agreement=getattr(a, "min_agreement", 0.0))
        if a.modelcmd == "install":
            if not Path(a.package).exists():
                return err(EXIT_USAGE, f"package {a.package} not found")
            try:
                out = store.install(a.package, activate=a.activate, allow_downgrade=a.allow_downgrade)
            except ShadowHeldError as e:                 # installed and self-tested, but not switched to
                return err(EXIT_REFUSED, f"installed, not activated: {e}. The package stays staged in its slot; run "
                                         "it in shadow mode (flight.shadow), then `activate` with the same bar")
            print(f"installed {out['name']} (model_version {out['model_version']}) in slot {out['slot']} "
                  f"({out['size']} bytes, {out['seconds']:.2f} s); self-test: {out['bist']}")
            if a.activate:
                res = out["activated"]
                print(f"active slot -> {res['slot']} (generation {res.get('generation')})")
            return 0
        if a.modelcmd == "activate":
            res = store.activate(a.slot, allow_downgrade=a.allow_downgrade)
            print(f"active slot -> {res['slot']} ({res['name']}, package {res['package_sha256'][:16]}"
                  f"{', generation ' + str(res['generation']) if res.get('changed') else ', unchanged'})")
            return 0
        if a.modelcmd == "rollback":
            res = store.rollback()
            print(f"rolled back: active slot -> {res['slot']} ({res['name']}, generation {res.get('generation')})")
            return 0
        if a.modelcmd == "status":
            return _status(store, key, a, err)
    except StoreBusyError as e:
        return err(EXIT_BUSY, str(e))
    except StoreFullError as e:
        return err(EXIT_NO_SPACE, f"no space: {e}")
    except (StoreIOError, StoreUnusableError) as e:
        return err(EXIT_STORE_IO, f"store: {e}")
    except ModelMissingError as e:
        return err(EXIT_USAGE, str(e))
    except ModelError as e:
        return err(EXIT_REFUSED, f"refused: {e}")
    except OSError as e:
        return err(EXIT_STORE_IO, f"{e}")
    return err(EXIT_USAGE, f"unknown model command {a.modelcmd}")


def _frame_count(text: str) -> int:
    """--shadow-frames: a whole number of frames, 0..1000000 (argparse turns the ValueError into exit 2)."""
    n = int(text)
    if not 0 <= n <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number of frames in 0..1000000")
    return n


def _agreement(text: str) -> float:
    """--min-agreement: a share of frames, 0..1 (NaN refused)."""
    x = float(text)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be a share of frames in 0..1")
    return x


def _card_arg(card: str) -> Path:
    """A model card path, or "default": the shipped default model's card (inside an installed wheel too)."""
    from .errors import ModelMissingError
    from .model import default_card

    if card == "default":
        return default_card()
    if not Path(card).is_file():
        raise ModelMissingError(f"model card {card} not found (\"default\" names the shipped default model)")
    return Path(card)


def _stamp(a, err) -> int:
    from .errors import ModelError
    from .modelmeta import stamp_card

    try:
        out = stamp_card(_card_arg(a.card), dry_run=a.dry_run)
    except FileNotFoundError as e:
        return err(EXIT_USAGE, str(e))
    except ModelError as e:
        return err(EXIT_REFUSED, f"refused: {e}")
    except OSError as e:
        return err(EXIT_STORE_IO, str(e))
    for k, (old, new) in out.items():
        print(f"{k}: sha256 {old[:16]} -> {new[:16]}" + (" (dry run)" if a.dry_run else ""))
    return 0


def _status(store, key, a, err) -> int:
    """Exit 0: the store is consistent (an active verified pointer, an empty store, or a package installed
    but not activated yet: a message says so). 1: a slot's package does not verify or the pointer is
    damaged (message on stderr)."""
    import json

    if key is None:
        store.key = b"\0" * 32                           # signatures cannot be checked without the key
    st = store.status(verify=a.verify and key is not None)
    if key is None:
        for info in st["slots"].values():
            info.pop("error", None)
            if info.get("present"):
                info["signature"] = "not checked (no key)"
    print(json.dumps(st, indent=1) if a.json else _status_text(st))
    present = [s for s, i in st["slots"].items() if i["present"]]
    bad = [s for s in present if st["slots"][s].get("signature") == "FAILED"]
    if bad:
        return err(EXIT_REFUSED, f"slot(s) {', '.join(bad)} of {store.root} do not verify: "
                                 + "; ".join(st["slots"][s].get("error", "") for s in bad))
    if st["pointer"] == "damaged":
        return err(EXIT_REFUSED, f"the active pointer of {store.root} is damaged; a gate runs slot "
                                 f"{st['runs'] or '(none)'}; activate a slot to rewrite it")
    if present and st["active"] is None:
        print(f"note: no active model yet: slot(s) {', '.join(present)} hold a package installed but not activated; "
              f"activate with python -m flight model activate SLOT --store {store.root}", file=sys.stderr)
    return 0


def _status_text(st: dict) -> str:
    lines = [f"store {st['store']}: active slot {st['active'] or '-'} (pointer {st['pointer']}, generation "
             f"{st['generation']}, previous {st['previous'] or '-'}), version high-water mark {st['version_hwm']}"]
    for s, info in st["slots"].items():
        if not info["present"]:
            lines.append(f"  slot {s}: empty")
            continue
        state = "" if "activated" not in info else (" activated" if info["activated"] else " staged (never activated)")
        lines.append(f"  slot {s}{' *' if s == st['active'] else ''}: {info.get('name', '?')} model_version "
                     f"{info.get('model_version', '?')}{state}, {info.get('bytes')} bytes, signature "
                     f"{info.get('signature')}, package {str(info.get('package_sha256', ''))[:16]}"
                     f"{' error: ' + info['error'] if info.get('error') else ''}")
        for k, v in (info.get("bist") or {}).items():
            lines.append(f"    self-test {k}: {v}")
    return "\n".join(lines)


_RUNTIME_BANNERS = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",)


class _CliStderrFilter:
    """CLI only (never the library, which runs on board): LiteRT prints a one-line INFO banner from C++ on every
    interpreter it builds, i.e. on every CLI call. For the command's duration fd 2 is a pipe; a thread forwards
    each line at once to the real stderr, except that banner. Python's own stderr goes the same way, in order."""

    def __enter__(self):
        self.saved = None
        try:
            sys.stderr.flush()
            saved = os.dup(2)
            r, w = os.pipe()
            os.dup2(w, 2)
            os.close(w)
        except (OSError, ValueError, AttributeError):    # no usable fd 2: leave stderr alone
            return self
        self.saved, self.r = saved, r
        self.thread = threading.Thread(target=self._pump, name="cloudgate-cli-stderr", daemon=True)
        self.thread.start()
        return self

    def _pump(self) -> None:
        pending = b""
        while True:                                       # ends at EOF: fd 2 restored in __exit__
            chunk = os.read(self.r, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(ln + b"\n" for ln in lines if ln.rstrip() not in _RUNTIME_BANNERS)
            if out:
                os.write(self.saved, out)
        if pending and pending.rstrip() not in _RUNTIME_BANNERS:
            os.write(self.saved, pending)
        os.close(self.r)

    def __exit__(self, *exc):
        if self.saved is None:
            return False
        try:
            sys.stderr.flush()
        finally:
            os.dup2(self.saved, 2)                        # the pipe's last write end closes: the pump sees EOF
            self.thread.join(timeout=5.0)
            os.close(self.saved)
        return False


def main(argv=None) -> int:
    with _CliStderrFilter():
        return _main(argv)


def _main(argv=None) -> int:
    if hasattr(sys.stdout, "reconfigure"):             # a scene id the gate accepted may hold lone surrogates
        sys.stdout.reconfigure(errors="backslashreplace")
    ap = argparse.ArgumentParser(prog="python -m flight")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="gate scene files (.npz) and print one line per decision")
    r.add_argument("scenes", nargs="+", help=".npz scene files or directories")
    r.add_argument("--model", help=".tflite / .onnx / model card (default: shipped default)")
    r.add_argument("--backend", choices=["auto", "litert", "onnxruntime"])
    r.add_argument("--config", help="gate YAML")
    r.add_argument("--log", help="decision log (JSON Lines)")
    r.add_argument("--priority", type=int, default=0)
    lg = sub.add_parser("log", help="decision log tools")
    lsub = lg.add_subparsers(dest="logcmd", required=True)
    s = lsub.add_parser("summary", help="counts per action and rule, data volume, latency, then one line per "
                                         "frame with the rule and reason that decided it")
    s.add_argument("file")
    s.add_argument("--action", choices=ACTIONS, help="list only frames with this action")
    s.add_argument("--reason", help="list only frames decided by this rule (" + ", ".join(RULES) + "), with this "
                                    "fault code, or whose reason contains this text")
    s.add_argument("--limit", type=int, default=50, help="frames listed (0 = all; default 50)")
    s.add_argument("--png", help="write a timeline PNG here (UTC axis, threshold lines, legend)")
    lsub.add_parser("schema", help="print the decision-log schema (docs/decision-log.md)")
    m = sub.add_parser("model", help="signed model packages and the A/B model store (in-orbit update)")
    msub = m.add_subparsers(dest="modelcmd", required=True)

    def common(p, store=True):
        p.add_argument("--key", help="mission key file (default: $CLOUDGATE_MISSION_KEY)")
        if store:
            p.add_argument("--store", required=True, help="A/B model store directory (the gate's update.store)")
            p.add_argument("--lock-timeout", type=float, default=10.0,
                           help="seconds to wait for the store's lock (default 10; exit 3 when it stays locked)")
        p.add_argument("--backend", action="append", choices=["litert", "onnxruntime"],
                       help="self-test on this backend (repeatable; default: every one the package has results for)")
        p.add_argument("--threads", type=int, default=1, help="runtime threads for the self-test (default 1)")
        p.add_argument("--max-mib", type=float, default=8.0, help="refuse packages larger than this (MiB, default 8)")
        return p

    kg = msub.add_parser("keygen", help="write a new random mission key (one line of 64 hex digits, mode 0600)")
    kg.add_argument("keyfile", help="key file to create (never overwritten)")
    pk = common(msub.add_parser("pack", help="card + artifacts + golden self-test tiles -> signed package"), store=False)
    pk.add_argument("card", help="model card (.yaml) beside its artifacts, or \"default\" for the shipped default model")
    pk.add_argument("--out", required=True, help="package file to write (.cgpkg)")
    pk.add_argument("--model-version", type=int, help="monotonic model version written into the signed card "
                                                      "(default: the card's model_version, else now in UTC seconds)")
    vf = common(msub.add_parser("verify", help="verify a package here: signature, card <-> model, self-test"),
                store=False)
    vf.add_argument("package", help="package file (.cgpkg)")
    ins = common(msub.add_parser("install", help="verify a package into the standby slot (self-tested there)"))
    ins.add_argument("package", help="package file (.cgpkg)")
    ins.add_argument("--activate", action="store_true", help="switch to it once installed (one critical section)")
    ins.add_argument("--allow-downgrade", action="store_true",
                     help="accept a model_version older than the store has activated (journalled)")
    ac = common(msub.add_parser("activate", help="verify a slot and switch the active pointer to it"))
    ac.add_argument("slot", nargs="?", choices=["a", "b"], help="slot to activate (default: the one not active)")
    ac.add_argument("--allow-downgrade", action="store_true",
                    help="activate a model_version older than the store has activated (journalled)")
    for p in (ins, ac):
        p.add_argument("--shadow-frames", type=_frame_count, default=0,
                       help="hold the activation until the package ran this many frames in shadow mode beside the "
                            "active model (flight.shadow; default 0: not needed)")
        p.add_argument("--min-agreement", type=_agreement, default=0.0,
                       help="with --shadow-frames: the shadow run's action agreement needed (0..1)")
    common(msub.add_parser("rollback", help="switch back to the other slot (verified first)"))
    stp = common(msub.add_parser("status", help="active slot, generation, version high-water mark, what each slot "
                                               "holds (exit 0 consistent, 1 a slot or the pointer does not verify, "
                                               "2 no such store)"))
    stp.add_argument("--verify", action="store_true", help="also self-test both slots")
    stp.add_argument("--json", action="store_true", help="print the status as JSON")
    sm = msub.add_parser("stamp", help="write the card's input/output description into its model files' own "
                                       "metadata (weights unchanged) and update the card's sha256 entries")
    sm.add_argument("card", help="model card (.yaml) beside its artifacts, or \"default\"")
    sm.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        return _run(a)
    if a.cmd == "model":
        return _model(a)
    return _summary(a) if a.logcmd == "summary" else _schema(a)


if __name__ == "__main__":
    sys.exit(main())
