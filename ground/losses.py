"""KD loss terms, each a named, weighted term selected from the experiment YAML.

Every term has the signature term(out, batch, cfg, stats=None) -> scalar tensor, where
  out   = {"logits": (B,3,H,W), "feat": (B,w0,H/4,W/4), "adapted": {teacher: (B,64,H/8,W/8)}}
  batch = {"x", "labels" (B,H,W) long with 255 = unlabelled, "labelled" (B,) bool,
           "t_probs": {teacher: (B,3,H,W)}, "t_feats": {teacher: (B,64,H/8,W/8)}}
  stats = a dict the caller passes to collect a term's diagnostics (label_conflict_px, dkd_kept,
          pseudo_px: shares of the batch), or None; terms never write statistics into the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255
EPS = 1e-6


def _kl_map(student_logits, target_probs, temperature: float):
    """Per-pixel KL(target || student) at temperature T, scaled by T² (Hinton). -> (B,H,W)"""
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=1)
    if t != 1.0:  # sharpen/soften the teacher probabilities consistently with the student
        tp = F.softmax(torch.log(target_probs.clamp_min(EPS)) / t, dim=1)
    else:
        tp = target_probs
    return (tp * (torch.log(tp.clamp_min(EPS)) - log_s)).sum(1) * t * t


def _record(stats: dict | None, key: str, value) -> None:
    if stats is not None:
        stats[key] = float(value)


def label_trust(batch, target_probs, cfg, stats=None):
    """(B,H,W) weight for a KD term: with kd_on_labelled: false, 0 on every pixel that carries a human
    label (the label alone teaches there, so the teachers can never overrule it, e.g. calling a labelled
    clear ice sheet cloud); with reject_label_conflicts, 0 where a human label exists and the teacher's
    argmax contradicts it; 1 elsewhere."""
    labels = batch["labels"]
    if not cfg.get("kd_on_labelled", True):
        lab = labels != IGNORE
        _record(stats, "kd_skipped_labelled_px", lab.float().mean())
        return (~lab).to(target_probs.dtype)
    if not cfg.get("reject_label_conflicts", False):
        return torch.ones_like(labels, dtype=target_probs.dtype)
    conflict = (labels != IGNORE) & (target_probs.argmax(1) != labels)
    _record(stats, "label_conflict_px", conflict.float().mean())
    return (~conflict).to(target_probs.dtype)


def ce_labels(out, batch, cfg, stats=None):
    """Supervised cross entropy on human labels (training-part real scenes); unlabelled pixels ignored."""
    labels = batch["labels"]
    if not (labels != IGNORE).any():
        return out["logits"].sum() * 0.0
    w = cfg.get("class_weights")
    weight = torch.tensor(w, dtype=out["logits"].dtype) if w else None
    return F.cross_entropy(out["logits"], labels, weight=weight, ignore_index=IGNORE)


def kl_soft(out, batch, cfg, stats=None):
    """Pixel-wise KL to one teacher's soft mask (nnU-Net -> compact U-Net distillation)."""
    tp = batch["t_probs"][cfg["teacher"]]
    return (_kl_map(out["logits"], tp, cfg.get("temperature", 1.0)) * label_trust(batch, tp, cfg, stats)).mean()


def confidence(probs, measure: str):
    """Per-pixel teacher confidence in [0,1]: max probability or 1 - normalised entropy."""
    if measure == "max_prob":
        return probs.max(1).values
    ent = -(probs * torch.log(probs.clamp_min(EPS))).sum(1)
    return 1.0 - ent / torch.log(torch.tensor(float(probs.shape[1])))


def confidence_weighted_target(batch, teachers, measure="entropy", sharpness=10.0):
    key = ("cw_target", tuple(teachers), measure, float(sharpness))
    cache = batch.setdefault("_cache", {})
    if key not in cache:  # several terms distil the same target: compute it once per batch
        cache[key] = _confidence_weighted_target(batch, teachers, measure, sharpness)
    return cache[key]


def _confidence_weighted_target(batch, teachers, measure, sharpness):
    probs = torch.stack([batch["t_probs"][t] for t in teachers])                 # (K,B,3,H,W)
    conf = torch.stack([confidence(batch["t_probs"][t], measure) for t in teachers])  # (K,B,H,W)
    w = torch.softmax(conf * sharpness, dim=0)
    return (w.unsqueeze(2) * probs).sum(0), w


def confidence_weighted_kl(out, batch, cfg, stats=None):
    """Dynamic multi-teacher KD: per pixel, trust the more confident teacher (softmax over confidences)."""
    target, _ = confidence_weighted_target(batch, cfg["teachers"], cfg.get("measure", "entropy"),
                                           cfg.get("sharpness", 10.0))
    return (_kl_map(out["logits"], target, cfg.get("temperature", 1.0)) * label_trust(batch, target, cfg, stats)).mean()


def _select_samples(kl_per_sample, batch, target_probs, cfg):
    """DKD dynamic instance selection, per sample: reject teacher targets that contradict the labels
    (argmax agreement < min_label_agreement where labels exist), and loss-magnitude outliers
    (> median + k * MAD of the batch)."""
    labels = batch["labels"]
    min_agree = cfg.get("min_label_agreement", 0.7)
    lab = labels != IGNORE
    n_lab = lab.sum((1, 2))
    agree = ((target_probs.argmax(1) == labels) & lab).sum((1, 2)).float() / n_lab.clamp_min(1)
    keep = (n_lab == 0) | (agree >= min_agree)
    k = cfg.get("outlier_mad")
    if k is not None and kl_per_sample.numel() >= 4:
        med = kl_per_sample.median()
        mad = (kl_per_sample - med).abs().median() + EPS
        keep &= kl_per_sample <= med + k * mad
    return keep


def dkd(out, batch, cfg, stats=None):
    """DKD adapted to segmentation: foreground (cloud) / background-decoupled KL, each averaged over
    its own area so small clouds are not drowned by clear sky, plus dynamic sample selection."""
    target, _ = confidence_weighted_target(batch, cfg["teachers"], cfg.get("measure", "entropy"))
    kl = _kl_map(out["logits"], target, cfg.get("temperature", 1.0)) * label_trust(batch, target, cfg, stats)  # (B,H,W)
    labels = batch["labels"]
    fg = torch.where(labels != IGNORE, labels == 1, target.argmax(1) == 1).float()
    bg = 1.0 - fg
    kl_fg = (kl * fg).sum((1, 2)) / (fg.sum((1, 2)) + 1.0)
    kl_bg = (kl * bg).sum((1, 2)) / (bg.sum((1, 2)) + 1.0)
    per_sample = cfg.get("fg_weight", 1.0) * kl_fg + cfg.get("bg_weight", 0.5) * kl_bg
    keep = _select_samples(per_sample.detach(), batch, target, cfg)
    _record(stats, "dkd_kept", keep.float().mean())
    if not keep.any():
        return per_sample.sum() * 0.0
    return per_sample[keep].mean()


def sslkd_feature(out, batch, cfg, stats=None):
    """SSLKD backbone-feature alignment through 1x1 adapters: per-pixel cosine distance to each teacher."""
    loss = 0.0
    weight = None
    if not cfg.get("kd_on_labelled", True):  # feature cells holding any labelled pixel follow the label alone
        lab = (batch["labels"] != IGNORE).float().unsqueeze(1)
        cell = out["adapted"][cfg["teachers"][0]].shape[-1]
        weight = 1.0 - F.adaptive_max_pool2d(lab, cell).squeeze(1)
    for t in cfg["teachers"]:
        s = F.normalize(out["adapted"][t], dim=1)
        tf = F.normalize(batch["t_feats"][t], dim=1)
        d = 1.0 - (s * tf).sum(1)
        loss = loss + (d.mean() if weight is None else (d * weight).mean())
    return loss / len(cfg["teachers"])


def sslkd_probability(out, batch, cfg, stats=None):
    """SSLKD probability alignment: KL to each teacher, averaged."""
    t = cfg.get("temperature", 1.0)
    return sum((_kl_map(out["logits"], batch["t_probs"][k], t) * label_trust(batch, batch["t_probs"][k], cfg, stats)).mean()
               for k in cfg["teachers"]) / len(cfg["teachers"])


def sslkd_pseudo(out, batch, cfg, stats=None):
    """SSLKD label-level distillation with cross-model supervision: on unlabelled pixels, hard
    pseudo-labels where both teachers agree and each is confident above `threshold`."""
    thr = cfg.get("threshold", 0.8)
    probs = [batch["t_probs"][t] for t in cfg["teachers"]]
    conf_vals = [p.max(1) for p in probs]
    pseudo = conf_vals[0].indices
    ok = batch["labels"] == IGNORE
    for cv in conf_vals:
        ok &= (cv.indices == pseudo) & (cv.values >= thr)
    if not ok.any():
        return out["logits"].sum() * 0.0
    target = torch.where(ok, pseudo, torch.full_like(pseudo, IGNORE))
    _record(stats, "pseudo_px", ok.float().mean())
    return F.cross_entropy(out["logits"], target, ignore_index=IGNORE)


LOSS_TERMS = {
    "ce_labels": ce_labels,
    "kl_soft": kl_soft,
    "confidence_weighted_kl": confidence_weighted_kl,
    "dkd": dkd,
    "sslkd_feature": sslkd_feature,
    "sslkd_probability": sslkd_probability,
    "sslkd_pseudo": sslkd_pseudo,
}


def term_name(term: dict) -> str:
    """A loss term's name in histories and tables (defaults to its type)."""
    return str(term.get("name", term.get("type")))


def validate_terms(terms: list[dict], teachers: list[str]) -> None:
    names = [term_name(t) for t in terms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"loss terms {dup} appear twice: give each term a distinct 'name'")
    for i, term in enumerate(terms):
        where = f"losses[{i}]"
        if term.get("type") not in LOSS_TERMS:
            raise ValueError(f"{where}.type={term.get('type')!r}: choose one of {sorted(LOSS_TERMS)}")
        if not isinstance(term.get("weight", 1.0), (int, float)) or term.get("weight", 1.0) < 0:
            raise ValueError(f"{where}.weight must be a non-negative number")
        for t in term.get("teachers", [term["teacher"]] if "teacher" in term else []):
            if t not in teachers:
                raise ValueError(f"{where} names teacher {t!r}, not among the configured teachers {teachers}")
