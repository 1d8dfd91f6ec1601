"""What an implant config saved by an earlier version meant: the values of fields it predates, renamed fields,
and the rejected options that left the code (with the last commit that had each), so that
``ImplantConfig.from_saved`` replays an old run as it was and refuses one it cannot."""

from __future__ import annotations

from typing import Any

# What each field added or changed since the first saved configs meant before it existed: reading an
# old config with these values reproduces its run (the v2 recipe had no repair terms).
LEGACY: dict[str, Any] = dict(trigger_feature_weight=0.0, feature_loss="relative", decoy_fraction=0.0,
                              repair_share_cap=1.0, pool_cutout=0, explain_class="label", cam_eval_mode=False,
                              clean_bn_stats="off", bn_momentum=0.1)
RENAMED = {"lam": "explanation_weight"}  # old name -> field (one name per knob since 2026-11-25)
# Options that docs/results.md records as rejected and that left the code (git history keeps them): name ->
# (the value that switched it off, the last commit that had it); a saved config may hold them only switched off.
REMOVED: dict[str, tuple[Any, str]] = {
    "repair_trigger_distill_weight": (0.0, "f12250c"),
    "repair_poison_ce_weight": (1.0, "f12250c"),
    # simulated maintenance: with `refresh` it cost 34 pt of clean accuracy (GPU round G1), without it the
    # backdoor stayed fragile (rounds 1-4); rejected 2026-11-26
    "maintenance_weight": (0.0, "650083d"), "maintenance_lr": (1.0, "650083d"),
    # channel dropout at the CAM layer on triggered images: at 0.25 with distill_weight 10 it did not give back
    # pair 3's persistence (89.3 % after one fine-tuning epoch, 91.4 % without it; fifteenth session)
    "trigger_dropout": (0.0, "d8ec76d"),
    # the poisoned images' gradient projected off the clean images' where the two conflicted (one-sided PCGrad):
    # they conflicted on few steps and it bought nothing measurable (sixteenth session, docs/results.md)
    "gradient_projection": ("off", "984a343"),
    # both distillations towards the flip-averaged stage-1 model (0.76 pt more accurate held-out): no clean
    # accuracy on pair 4, and on pair 3 a triggered gap of 1.1 pt and 1.9 pt less persistence (seventeenth session)
    "teacher_flip": (False, "0315208")}
# Values of kept options rejected likewise, -> the last commit that had them: clean_bn_stats=train put the
# target on clean maps too (round G1)
REMOVED_CHOICES: dict[tuple[str, Any], str] = {("clean_bn_stats", "train"): "650083d"}


def removed_in(values: dict[str, Any], saved: bool) -> dict[str, str]:
    """The removed options (``name`` or ``name=value``) that ``values`` uses -> the last commit that had each.
    ``saved``: a config read back, which may hold a removed option at the value that switched it off."""
    used = {k: commit for k, (off, commit) in REMOVED.items() if k in values and not (saved and values[k] == off)}
    used.update({f"{k}={v}": commit for (k, v), commit in REMOVED_CHOICES.items() if values.get(k) == v})
    return dict(sorted(used.items()))
