"""The methods a comparison runs: the paper's Table-2 Bradley-Terry losses, each alone or ``+SPO``, and the
baselines a reviewer asks for, as :class:`Method` values (:func:`method`), and how one is written into a
preference-stage trainer config (:func:`apply_method`).

* the six losses of Table 2 (DPO, CPO, DPOP, R-DPO, SimPO, AlphaDPO), alone or ``+SPO`` (penalty solver,
  reference value, per-sample relu, weight ``spo_gamma``);
* **RFT** (fine-tuning on the chosen responses alone, loss ``sft``), **RPO** (DPO + λ·NLL of the chosen,
  loss ``rpo``), **DPOP**, **SFT-mix** (DPO + λ·NLL of the SFT data, ``loss.sft_data_weight``);
* **DPO+SPO(SFT)**: SPO whose lower level is the SFT objective on the SFT data (penalty solver, value
  ``inner_sft``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from spo_jax import losses

#: The paper's Table 2 losses: family -> (registered loss, default hparams). Defaults as in
#: experiments/paper.py (DPO beta 0.1; CPO lam 1; DPOP lam 50; R-DPO alpha 0.01; SimPO beta 2,
#: gamma 1; AlphaDPO + alpha 0.1).
BT_LOSSES: dict[str, tuple[str, dict]] = {
    "DPO": ("dpo", {"beta": 0.1}),
    "CPO": ("cpo", {"beta": 0.1, "lam": 1.0}),
    "DPOP": ("dpop", {"beta": 0.1, "lam": 50.0}),
    "R-DPO": ("rdpo", {"beta": 0.1, "alpha": 0.01}),
    "SimPO": ("simpo", {"beta": 2.0, "gamma": 1.0}),
    "AlphaDPO": ("alphadpo", {"beta": 2.0, "gamma": 1.0, "alpha": 0.1}),
}
#: The simple fixes SPO is compared with (DPOP is also one of the BT losses above).
BASELINES: dict[str, tuple[str, dict]] = {
    "RFT": ("sft", {}),                          # fine-tuning on the chosen responses alone
    "RPO": ("rpo", {"beta": 0.1, "lam": 1.0}),   # DPO + lam * token-mean NLL of the chosen
    "SFT-mix": ("dpo", {"beta": 0.1}),           # DPO + lam * token-mean NLL of the SFT data (SFT_MIX_LAMBDA)
}
#: Baseline families whose frontier decides the claim (item 6 of issue 14).
FRONTIER_BASELINES = ("RFT", "RPO", "DPOP", "SFT-mix")
SPO_GAMMA = 10.0  # the prototype's weight (docs/METHOD.md)
SFT_MIX_LAMBDA = 1.0  # SFT-mix's default weight λ of the SFT-data NLL (swept in SWEEP)
#: SPO with the SFT objective on the SFT data as its lower level: family -> (its loss, the SPO settings
#: beyond apply_method's penalty defaults). One inner SGD step keeps it cheap in the 2-core grid; with
#: epsilon 0, q_i > 0 for nearly every SFT sequence, so its direction is close to that of SFT-mix at
#: lambda = gamma (docs/METHOD.md).
SPO_SFT_FAMILIES: dict[str, tuple[str, dict]] = {
    "DPO+SPO(SFT)": ("DPO", {"value": "inner_sft", "inner_steps": 1, "inner_lr": 1e-2}),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One arm of a comparison: a family (``"DPO+SPO"``, ``"RPO"``, ...) at given hyperparameters.

    ``loss``/``hparams``: the registered loss (``spo_jax.losses``); ``spo_gamma`` > 0 wraps it in
    SPO's penalty solver (per-sample relu, epsilon 0) with that weight, its value ``"reference"``
    or, for the ``+SPO(SFT)`` families, ``"inner_sft"`` on the SFT data (``spo_extra``: the
    further ``spo.*`` settings); ``sft_data_weight`` > 0 adds λ·NLL of the SFT data (SFT-mix).
    ``label``: the family plus the hyperparameters that differ from the family's defaults.
    """

    family: str
    loss: str
    hparams: tuple[tuple[str, float], ...]
    spo_gamma: float = 0.0
    label: str = ""
    sft_data_weight: float = 0.0
    spo_extra: tuple[tuple[str, Any], ...] = ()

    @property
    def hp(self) -> dict:
        return dict(self.hparams)

    @property
    def spo(self) -> bool:
        return self.spo_gamma > 0

    @property
    def uses_sft_data(self) -> bool:
        """Whether the arm trains on the SFT data too (SFT-mix, the +SPO(SFT) families)."""
        return self.sft_data_weight > 0 or dict(self.spo_extra).get("value") == "inner_sft"

    def spec(self) -> dict:
        """The fields that define the arm (``arm.json``'s ``method``); the SFT-data fields only for
        the arms that read SFT data, so an arm recorded before those fields existed still matches."""
        spec = dataclasses.asdict(self)
        if not self.uses_sft_data:
            del spec["sft_data_weight"], spec["spo_extra"]
        return spec

    @property
    def base(self) -> str:
        """The family without its SPO suffix (``+SPO``, ``+SPO(SFT)``)."""
        return plain_family(self.family)


def is_spo_family(family: str) -> bool:
    """``<loss>+SPO`` or a ``+SPO(SFT)`` family."""
    return family.endswith("+SPO") or family in SPO_SFT_FAMILIES


def plain_family(family: str) -> str:
    """The loss alone of an SPO family (``"DPO+SPO(SFT)"`` -> ``"DPO"``); other families unchanged."""
    if family in SPO_SFT_FAMILIES:
        return SPO_SFT_FAMILIES[family][0]
    return family[:-4] if family.endswith("+SPO") else family


def families() -> list[str]:
    return [f for b in BT_LOSSES for f in (b, b + "+SPO")] + list(BASELINES) + list(SPO_SFT_FAMILIES)


def method(family: str, **overrides) -> Method:
    """``method("DPO+SPO", spo_gamma=30)``, ``method("RPO", lam=10)``, ``method("RFT")``,
    ``method("SFT-mix", lam=3)``, ``method("DPO+SPO(SFT)", spo_gamma=3)``.

    Overrides are loss hyperparameters, SFT-mix's ``lam`` (the SFT-data weight) or ``spo_gamma``
    (only for SPO families). Raises ValueError naming the family / hyperparameter and the accepted ones.
    """
    spo = is_spo_family(family)
    base = plain_family(family)
    table = {**BT_LOSSES, **BASELINES}
    if base not in table or (spo and base not in BT_LOSSES):
        raise ValueError(f"unknown method family {family!r}; choose from {families()}")
    loss, hp = table[base]
    hp = dict(hp)
    mix = base == "SFT-mix"
    sft_weight = SFT_MIX_LAMBDA if mix else 0.0
    gamma = SPO_GAMMA if spo else 0.0
    shown = []
    for k, v in overrides.items():
        if k == "spo_gamma":
            if not spo:
                raise ValueError(f"{family!r} has no SPO term; spo_gamma only applies to '<loss>+SPO' families")
            gamma = float(v)
        elif mix and k == "lam":
            sft_weight = float(v)
        elif k in hp:
            hp[k] = float(v)
        else:
            raise ValueError(f"{family!r} has no hyperparameter {k!r}; accepted: "
                             f"{sorted(hp) + (['lam'] if mix else []) + (['spo_gamma'] if spo else [])}")
        shown.append(f"{'γ' if k == 'spo_gamma' else 'λ' if k == 'lam' else 'β' if k == 'beta' else k}={v:g}")
    label = family + (" " + ",".join(shown) if shown else "")
    extra = tuple(sorted(SPO_SFT_FAMILIES[family][1].items())) if family in SPO_SFT_FAMILIES else ()
    return Method(family, loss, tuple(sorted(hp.items())), gamma, label, sft_weight, extra)


def apply_method(c, m: Method):
    """Write method ``m`` into a preference-stage trainer config ``c`` (in place; returns it):
    loss name and hyperparameters, no NLL term of the chosen, the SFT-data weight, SPO on/off,
    and the reference mode (``cached`` when the loss or SPO reads reference log-probs, else
    ``none``). Arms with ``m.uses_sft_data`` need the SFT data (``train(..., sft_data=)``:
    :func:`compare` passes it to those arms only)."""
    c.stage = "preference"
    c.loss.name = m.loss
    c.loss.hparams = ml_collections.ConfigDict(m.hp)
    c.loss.sft_weight = 0.0
    c.loss.sft_data_weight = float(m.sft_data_weight)
    c.spo.enabled = m.spo
    if m.spo:
        c.spo.solver = "penalty"
        c.spo.value = "reference"
        c.spo.gamma = float(m.spo_gamma)
        c.spo.epsilon = 0.0
        c.spo.per_sample = True
        c.spo.squared = False
        for k, v in m.spo_extra:
            c.spo[k] = v
    spo_reads_reference = m.spo and c.spo.value == "reference"
    c.reference.mode = "cached" if (losses.uses_reference(m.loss) or spo_reads_reference) else "none"
    return c
