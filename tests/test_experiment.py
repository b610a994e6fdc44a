"""spo_jax.experiment's pure parts, on hand-made inputs whose answers are known:

methods and their configs, the style rule of setting (b), the pair-shift measurements,
the paired bootstrap (against closed forms: degenerate intervals, a seed-only spread,
the normal approximation of a Bernoulli mean, exact pairing), the Pareto frontier and
the verdicts, and ``summarize`` / ``write_report`` / the Pareto figure on small stored
results built here (two seeds, known outcomes). The pipeline end to end is
tests/test_demo.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import types

import jax.numpy as jnp
import numpy as np
import pytest

from spo_jax import compile_cache
from spo_jax import config as config_lib
from spo_jax import experiment as E

# --------------------------------------------------------------------------- methods


def test_method_labels_defaults_and_overrides():
    m = E.method("DPO+SPO")
    assert (m.family, m.loss, m.hp, m.spo_gamma, m.label, m.base) == ("DPO+SPO", "dpo", {"beta": 0.1}, 10.0,
                                                                      "DPO+SPO", "DPO")
    assert E.method("DPO+SPO", spo_gamma=30).label == "DPO+SPO γ=30"
    r = E.method("RPO", lam=10)
    assert (r.loss, r.hp, r.spo, r.label) == ("rpo", {"beta": 0.1, "lam": 10.0}, False, "RPO λ=10")
    assert E.method("RFT").loss == "sft" and E.method("DPOP").hp == {"beta": 0.1, "lam": 50.0}
    assert set(E.families()) == {"DPO", "DPO+SPO", "CPO", "CPO+SPO", "DPOP", "DPOP+SPO", "R-DPO", "R-DPO+SPO",
                                 "SimPO", "SimPO+SPO", "AlphaDPO", "AlphaDPO+SPO", "RFT", "RPO", "SFT-mix",
                                 "DPO+SPO(SFT)"}
    mix = E.method("SFT-mix", lam=3)
    assert (mix.loss, mix.hp, mix.sft_data_weight, mix.spo, mix.uses_sft_data, mix.label) == (
        "dpo", {"beta": 0.1}, 3.0, False, True, "SFT-mix λ=3")
    assert E.method("SFT-mix").sft_data_weight == E.SFT_MIX_LAMBDA
    inner = E.method("DPO+SPO(SFT)", spo_gamma=3)
    assert (inner.loss, inner.spo_gamma, inner.base, inner.uses_sft_data, inner.label) == (
        "dpo", 3.0, "DPO", True, "DPO+SPO(SFT) γ=3")
    assert dict(inner.spo_extra)["value"] == "inner_sft"
    assert not any(E.method(f).uses_sft_data for f in ("DPO", "DPO+SPO", "RPO", "RFT", "DPOP"))
    with pytest.raises(ValueError, match="'SFT-mix' has no hyperparameter 'gamma'; accepted: \\['beta', 'lam'\\]"):
        E.method("SFT-mix", gamma=1)
    with pytest.raises(ValueError, match="unknown method family 'RFT\\+SPO'"):
        E.method("RFT+SPO")
    with pytest.raises(ValueError, match="spo_gamma only applies"):
        E.method("DPO", spo_gamma=3)
    with pytest.raises(ValueError, match="'SimPO' has no hyperparameter 'lam'; accepted: \\['beta', 'gamma'\\]"):
        E.method("SimPO", lam=1)


@pytest.mark.parametrize("family, ref", [("DPO+SPO", "cached"), ("SimPO", "none"), ("SimPO+SPO", "cached"),
                                         ("RFT", "none"), ("RPO", "cached"), ("CPO", "none"), ("SFT-mix", "cached"),
                                         ("DPO+SPO(SFT)", "cached")])
def test_apply_method_sets_loss_spo_and_reference_and_validates(family, ref, tmp_path):
    c = config_lib.get_default_config()
    c.run_dir = str(tmp_path)
    c.loss.sft_weight = 5.0
    m = E.method(family)
    E.apply_method(c, m)
    assert (c.stage, c.loss.name, dict(c.loss.hparams), c.loss.sft_weight) == ("preference", m.loss, m.hp, 0.0)
    assert c.spo.enabled == m.spo and c.reference.mode == ref
    assert c.loss.sft_data_weight == m.sft_data_weight
    if m.spo:
        assert (c.spo.solver, c.spo.value, c.spo.gamma, c.spo.epsilon, c.spo.per_sample) == (
            "penalty", "inner_sft" if m.uses_sft_data else "reference", 10.0, 0.0, True)
    c.data.train_path = str(tmp_path)  # an existing path stands in for the pairs
    c.model.path = str(tmp_path)
    if m.sft_data_weight:  # SFT-mix refuses to run without SFT data
        with pytest.raises(config_lib.ConfigError, match=r"config\.loss\.sft_data_weight=1\.0: .*needs SFT data"):
            config_lib.validate_config(c, num_devices=1, process_count=1)
    c.data.sft_path = str(tmp_path) if m.uses_sft_data else ""
    config_lib.validate_config(c, num_devices=1, process_count=1)
    if not m.uses_sft_data:  # the other arms have no reader for SFT data
        c.data.sft_path = str(tmp_path)
        with pytest.raises(config_lib.ConfigError, match=r"config\.data\.sft_path=.*nothing reads the SFT data"):
            config_lib.validate_config(c, num_devices=1, process_count=1)


def test_compare_gives_sft_data_to_the_arms_that_read_them_only(tmp_path, monkeypatch):
    calls = []

    class Trained(Exception):
        pass

    def fake_train(config, **kw):  # records what the arm got, then stops compare
        calls.append(kw)
        raise Trained

    monkeypatch.setattr(E.runs, "train", fake_train)
    arms = [E.method("DPO"), E.method("SFT-mix")]
    with pytest.raises(ValueError, match=r"arms \['SFT-mix'\] train on SFT data; pass sft_data="):
        E.compare(arms, make_config=lambda m, d: None, train_data="pairs", measure=None, out_dir=str(tmp_path))
    assert not calls  # refused before anything trained
    for m in arms:
        with pytest.raises(Trained):
            E.compare([m], make_config=lambda m, d: None, train_data="pairs", measure=None, out_dir=str(tmp_path),
                      sft_data="sft rows")
    assert [c["sft_data"] for c in calls] == [None, "sft rows"]
    # an arm recorded (arm.json) before the SFT-data fields existed still matches its method
    assert set(E.method("DPO+SPO").spec()) == {"family", "loss", "hparams", "spo_gamma", "label"}
    assert E.method("SFT-mix", lam=3).spec()["sft_data_weight"] == 3.0


def test_compare_measures_after_dropping_the_trained_state(tmp_path, monkeypatch):
    """The measurements get the parameters on the host; the trained state (parameters and AdamW moments,
    1.6 GB for SmolLM2-135M) is released before they run."""
    import weakref
    trained = []

    class Result:  # what train returns
        def __init__(self, run_dir):
            self.state = types.SimpleNamespace(params={"w": jnp.ones(3)}, opt_state=jnp.zeros(6))
            self.graphdef, self.history, self.run_dir = "graphdef", [{"split": "train", "loss": 0.5}], run_dir

    def fake_train(run_dir, **kw):
        os.makedirs(run_dir)
        res = Result(run_dir)
        trained.append(weakref.ref(res))
        return res

    def measure(m, graphdef, params):
        assert trained[-1]() is None, "the trained state is still alive while measuring"
        return {"sum": float(np.sum(params["w"])), "on_host": isinstance(params["w"], np.ndarray)}

    monkeypatch.setattr(E.runs, "train", fake_train)
    out = E.compare([E.method("DPO")], make_config=lambda m, d: d, train_data="pairs", measure=measure,
                    out_dir=str(tmp_path))
    assert out["DPO"]["sum"] == 3.0 and out["DPO"]["on_host"] and out["DPO"]["steps"] == 1


def test_sweep_arms_and_choose_per_family():
    arms = E.sweep_arms(["DPO+SPO", "RPO", "RFT"])
    assert [a.label for a in arms] == ["DPO+SPO γ=3", "DPO+SPO γ=10", "DPO+SPO γ=30", "DPO+SPO γ=100", "RPO λ=0.3",
                                       "RPO λ=1", "RPO λ=3", "RPO λ=10", "RPO λ=30", "RFT"]
    assert [a.label for a in E.sweep_arms(["SFT-mix", "DPO+SPO(SFT)"])] == [
        "SFT-mix λ=0.3", "SFT-mix λ=1", "SFT-mix λ=3", "SFT-mix λ=10", "SFT-mix λ=30", "DPO+SPO(SFT) γ=3",
        "DPO+SPO(SFT) γ=10", "DPO+SPO(SFT) γ=30", "DPO+SPO(SFT) γ=100"]
    runs = {a.label: {"accuracy": 0.5, "win_rate": 0.5} for a in arms}
    runs["DPO+SPO γ=10"]["accuracy"] = 0.7
    runs["RPO λ=3"].update(accuracy=0.4, win_rate=0.9)  # best for style (win + acc), not for correctness
    assert {f: m.label for f, m in E.choose(runs, arms, "correctness").items()} == {
        "DPO+SPO": "DPO+SPO γ=10", "RPO": "RPO λ=0.3", "RFT": "RFT"}
    assert E.choose(runs, arms, "style")["RPO"].label == "RPO λ=3"


# --------------------------------------------------------------------------- style rule


def test_restyle_and_style_reward():
    ans = "14 - 12 = 2 . 2 + 24 = 26 . 26 * 2 = 52 . #### 52"
    rng = np.random.default_rng(0)
    assert E.restyle_answer(ans, rng, 0.0) == ans
    assert E.restyle_answer(ans, rng, 1.0) == "2 = 14 - 12 . 26 = 2 + 24 . 52 = 26 * 2 . #### 52"
    assert E.style_reward(ans) == 0.0
    assert E.style_reward("2 = 14 - 12 . 26 = 2 + 24 . 26 * 2 = 52 . #### 52") == pytest.approx(2 / 3)
    assert E.style_reward(" 52 = 26 * 2 . #### 52") == 1.0
    assert E.style_reward("#### 52") == 0.0 and E.style_reward("garbage") == 0.0
    with pytest.raises(ValueError, match="no '#### N'"):
        E.restyle_answer("1 + 1 = 2 .", rng, 0.5)
    np.testing.assert_array_equal(E.win_rate([1.0, 0.5, 0.0], [0.5, 0.5, 1.0]), [1.0, 0.5, 0.0])


def test_style_pairs_pick_highest_and_lowest_reward():
    samples = [["1 + 1 = 2 . #### 2", "2 = 1 + 1 . #### 2", "2 = 1 + 1 . #### 3"],  # rewards 0, 1, 1
               ["1 + 1 = 2 . #### 2", "1 + 1 = 2 . #### 2"]]                         # all tie: no pair
    pairs, stats = E.style_pairs(["p0", "p1"], samples)
    assert stats == {"num_questions": 2, "num_pairs": 1, "mean_sample_reward": pytest.approx(2 / 5)}
    assert pairs[0] == {"prompt": "p0", "chosen": " 2 = 1 + 1 . #### 2", "rejected": " 1 + 1 = 2 . #### 2",
                        "chosen_reward": 1.0, "rejected_reward": 0.0, "question_index": 0}


def test_levelled_off():
    assert E.levelled_off({"100": 0.5, "200": 0.79, "300": 0.8})
    assert not E.levelled_off({"100": 0.5, "200": 0.7}) and not E.levelled_off({"100": 0.5})
    assert E.levelled_off({"900": 0.8, "1000": 0.7, "200": 0.1})  # steps sort as numbers


def test_sft_start_is_the_curves_best_point_and_the_report_says_what_the_curve_did():
    assert E.best_step({"75": 0.062, "150": 0.0}) == 75
    assert E.best_step({"100": 0.5, "200": 0.9, "300": 0.9}) == 300  # ties: the later step
    assert E.best_step({"1500": 0.925, "1750": 0.94, "2000": 0.78}) == 1750
    fell = E.curve_words({"75": 0.062, "150": 0.0})
    assert fell == "**fell** (0.062 -> 0.000 over the last 75 steps)" and "levelled" not in fell
    assert E.curve_words({"1500": 0.925, "1750": 0.94, "2000": 0.78}).startswith("**fell** (0.940 -> 0.780")
    assert E.curve_words({"100": 0.5, "200": 0.79, "300": 0.8}) == (
        "levelled off (0.790 -> 0.800 over the last 100 steps, less than 0.03 apart)")
    assert E.curve_words({"100": 0.5, "200": 0.7}).startswith("**still rising** (0.500 -> 0.700 over the last 100")
    assert E.curve_words({"100": 0.5}).startswith("one point")


def test_pair_shift():
    start = {"example_index": np.arange(3), "chosen": np.array([-10.0, -20.0, -5.0]),
             "rejected": np.array([-12.0, -8.0, -6.0]), "chosen_len": np.array([5.0, 10.0, 5.0])}
    now = dict(start, chosen=np.array([-11.0, -18.0, -5.0]), rejected=np.array([-20.0, -9.0, -6.0]))
    r = E.pair_shift(start, now)
    np.testing.assert_allclose(r["delta_chosen"], [-1, 2, 0])
    np.testing.assert_allclose(r["violation"], [1, 0, 0])
    assert r["delta_chosen_logp"] == pytest.approx(1 / 3) and r["delta_rejected_logp"] == pytest.approx(-3)
    assert r["violation_frac"] == pytest.approx(1 / 3) and r["margin_gain"] == pytest.approx(1 / 3 + 3)
    assert r["delta_chosen_token_mean"] == pytest.approx((-0.2 + 0.2 + 0) / 3)
    with pytest.raises(ValueError, match="different pairs"):
        E.pair_shift(start, dict(now, example_index=np.array([0, 2, 1])))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_degenerate_and_exactly_paired():
    a = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    r = E.paired_bootstrap({"A": [a], "B": [a], "C": [a * 0 + 1.0]}, n_boot=500, reference="A")
    assert r["A"]["mean"] == pytest.approx(0.6) and r["A"]["diff"] == 0.0
    assert r["B"]["diff_lo"] == r["B"]["diff_hi"] == 0.0          # identical arms: the paired difference is 0
    assert r["C"]["lo"] == r["C"]["hi"] == 1.0                    # constant arm: no spread
    assert r["C"]["diff"] == pytest.approx(0.4) and r["C"]["diff_lo"] >= 0.0 and r["C"]["n_items"] == 5


def test_bootstrap_seed_level_spread():
    # two seeds, no within-seed variance: draws of the seed pair give means 0, 0.5 or 1
    r = E.paired_bootstrap({"A": [np.zeros(10), np.ones(10)]}, n_boot=4000)
    assert r["A"]["mean"] == 0.5 and r["A"]["lo"] == 0.0 and r["A"]["hi"] == 1.0 and r["A"]["n_seeds"] == 2


def test_bootstrap_matches_the_normal_approximation_of_a_bernoulli_mean():
    rng = np.random.default_rng(3)
    x = (rng.random(2000) < 0.3).astype(float)
    r = E.paired_bootstrap({"A": [x]}, n_boot=4000, seed=5)["A"]
    half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / len(x))
    assert r["hi"] - r["lo"] == pytest.approx(2 * half, rel=0.1)
    assert r["lo"] < x.mean() < r["hi"]


def test_bootstrap_pairing_narrows_the_difference_of_correlated_arms():
    rng = np.random.default_rng(0)
    a = (rng.random(1000) < 0.5).astype(float)
    b = a.copy()
    b[:30] = 1.0  # b = a plus a few extra successes
    r = E.paired_bootstrap({"a": [a], "b": [b]}, n_boot=2000, reference="a", return_draws=True)
    unpaired_half = 1.96 * np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert r["b"]["diff_lo"] > 0.0 and (r["b"]["diff_hi"] - r["b"]["diff_lo"]) / 2 < unpaired_half / 3
    d, lo, hi = E.diff_interval(r["b"], r["a"])
    assert d == pytest.approx(b.mean() - a.mean()) and (lo, hi) == pytest.approx((r["b"]["diff_lo"], r["b"]["diff_hi"]))


def test_bootstrap_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="as long as arm 'A'"):
        E.paired_bootstrap({"A": [np.ones(3)], "B": [np.ones(4)]})
    with pytest.raises(ValueError, match="has 2 seeds"):
        E.paired_bootstrap({"A": [np.ones(3)], "B": [np.ones(3), np.ones(3)]})
    with pytest.raises(ValueError, match="reference 'Z'"):
        E.paired_bootstrap({"A": [np.ones(3)]}, reference="Z")


# --------------------------------------------------------------------------- Pareto


def test_pareto_front_and_positions():
    pts = {"a": (0.9, 0.5), "b": (0.7, 0.7), "c": (0.5, 0.9), "d": (0.6, 0.6)}
    assert E.pareto_front(pts) == ["c", "b", "a"]
    assert E.frontier_position((0.95, 0.6), pts) == ("ahead of", ["a"])
    assert E.frontier_position((0.8, 0.6), pts) == ("on", [])
    assert E.frontier_position((0.6, 0.6), pts) == ("behind", ["b"])  # equal to d: not dominated by it
    assert E.frontier_position((0.5, 0.5), pts)[0] == "behind"


# --------------------------------------------------------------------------- stored results


def _stored_results(n=200):
    """Two report seeds, three arms per setting, with known outcomes: on correctness pairs DPO
    collapses, DPO+SPO is clearly above RPO; on the style pairs DPO+SPO is dominated by RPO."""
    rng = np.random.default_rng(0)

    def items(p):
        return (rng.random(n) < p).astype(int).tolist()

    per_seed = []
    for seed in (1, 2):
        sft_reward = rng.choice([0.0, 0.5, 1.0], n)
        run = {"seed": seed, "sft": {"accuracy": 0.8, "reward": float(sft_reward.mean()), "correct": items(0.8),
                                     "reward_items": sft_reward.tolist(), "curve": {"100": 0.79, "200": 0.8}},
               "pairs": {}, "settings": {}}
        for k, acc, reward in (("correctness", {"DPO": 0.3, "DPO+SPO": 0.97, "RPO": 0.8}, None),
                               ("style", {"DPO": 0.3, "DPO+SPO": 0.6, "RPO": 0.75},
                                {"DPO": 1.0, "DPO+SPO": 0.6, "RPO": 0.75})):
            runs = {}
            for a, p in acc.items():
                rew = (np.full(n, reward[a]) if reward else sft_reward).tolist()
                runs[a] = {"accuracy": p, "correct": items(p), "reward_items": rew,
                           "delta_chosen": rng.normal(-2.0 if a == "DPO" else 0.3, 0.5, 50).tolist(),
                           "delta_rejected": rng.normal(-5, 1, 50).tolist(),
                           "violation": (rng.random(50) < (0.8 if a == "DPO" else 0.1)).astype(float).tolist(),
                           "mass_split": {"chosen": 0.5, "rejected": 0.2, "other": 0.3}}
            run["settings"][k] = {"runs": runs, "methods": {a: {"family": a} for a in acc},
                                  "sft_mass_split": {"chosen": 0.6, "rejected": 0.2, "other": 0.2},
                                  "gradient_diagnostics": {"num_pairs": 16, "mean_cos": 0.9,
                                                           "frac_dpo_lowers_chosen": 0.7}}
        per_seed.append(run)
    return {"settings": {"n_test": n, "n_pair_prompts": 50, "num_samples": 8, "pref_steps": 10, "pref_batch": 8,
                         "pref_lr": 1e-4},
            "report_seeds": [1, 2], "validation_seed": 0, "criteria": dict((k, v[0]) for k, v in E.CRITERIA.items()),
            "chosen": {"correctness": {"DPO": "DPO"}, "style": {"DPO": "DPO"}}, "validation": None,
            "per_seed": per_seed, "timings_s": {"total": 1.0},
            "machine": {"cpu_count": 2, "load_avg_1min_at_end": 3.0}}


def test_summarize_report_and_figure_on_stored_results(tmp_path):
    res = json.loads(json.dumps(_stored_results()))  # as stored in results.json
    summ = E.summarize(res, n_boot=500)
    acc = summ["correctness"]["accuracy"]
    sft_mean = np.mean([np.mean(r["sft"]["correct"]) for r in res["per_seed"]])
    assert acc["SFT"]["mean"] == pytest.approx(sft_mean) and acc["SFT"]["diff"] == 0.0
    assert acc["DPO"]["diff_hi"] < 0 < acc["DPO+SPO"]["diff_lo"]
    assert summ["style"]["win_rate"]["SFT"]["mean"] == 0.5 and summ["style"]["win_rate"]["DPO"]["mean"] > 0.6
    assert "draws" not in acc["DPO"]  # the bootstrap draws are not stored
    assert summ["correctness"]["violation"]["DPO"]["lo"] > summ["correctness"]["violation"]["DPO+SPO"]["hi"]
    # the readings state the verdicts these numbers imply
    assert "DPO+SPO: " in summ["correctness"]["reading"] and "AHEAD OF the best baseline" in summ["correctness"][
        "reading"]
    assert "Best baseline by held-out accuracy: RPO" in summ["correctness"]["reading"]
    assert "is BEHIND the frontier (dominated by RPO; the 95% interval of the paired difference excludes 0" in summ[
        "style"]["reading"]
    assert "0 of 1 SPO points ahead" in summ["style"]["reading"]
    res["summary"] = summ
    text = E.write_report(res, str(tmp_path))
    assert (tmp_path / "report.md").read_text() == text
    assert "swept on **seed 0**" in text and "reported on seeds [1, 2]" in text
    assert text.count("-- levelled off (0.790 -> 0.800 over the last 100 steps") == 2
    assert text.count("the arms start from step 200") == 2 and f"Rule: {E.SFT_RULE}." in text
    assert "| DPO+SPO | 0.9" in text and "![Pareto](pareto_style.png)" in text
    assert (tmp_path / "pareto_style.png").stat().st_size > 5000


def test_sft_mix_is_a_frontier_baseline_and_spo_sft_an_spo_arm():
    """SFT-mix decides the frontier like RPO / DPOP / RFT; DPO+SPO(SFT) is read as an SPO arm."""
    res = _stored_results(100)
    rng = np.random.default_rng(1)
    for run in res["per_seed"]:
        for k in ("correctness", "style"):
            runs, methods = run["settings"][k]["runs"], run["settings"][k]["methods"]
            for label, family, p, reward in (("SFT-mix λ=3", "SFT-mix", 0.99, 1.0),
                                             ("DPO+SPO(SFT) γ=3", "DPO+SPO(SFT)", 0.5, 0.5)):
                runs[label] = {**runs["RPO"], "correct": (rng.random(100) < p).astype(int).tolist(),
                               "reward_items": np.full(100, reward).tolist()}
                methods[label] = {"family": family}
    summ = E.summarize(res, n_boot=300)
    assert "Best baseline by held-out accuracy: SFT-mix λ=3" in summ["correctness"]["reading"]
    assert "DPO+SPO(SFT) γ=3: " in summ["correctness"]["reading"]
    style = summ["style"]["reading"]
    assert "Frontier of the baselines (RFT, RPO, DPOP, SFT-mix)" not in style  # only the families present
    assert "Frontier of the baselines (RPO, SFT-mix)" in style
    assert "DPO+SPO(SFT) γ=3 (" in style and "0 of 2 SPO points ahead" in style
    assert re.search(r"DPO\+SPO\(SFT\) γ=3 \([^)]*\) is BEHIND the frontier \(dominated by [^;]*SFT-mix λ=3", style)


def test_summarize_refuses_unpaired_seeds():
    res = _stored_results(20)
    del res["per_seed"][1]["settings"]["style"]["runs"]["RPO"]
    with pytest.raises(ValueError, match="different arms"):
        E.summarize(res, n_boot=10)


def test_run_grid_checks_its_arguments_before_running(tmp_path):
    s = E.WorldSettings.quick()
    with pytest.raises(ValueError, match="validation seed 0 is also a report seed"):
        E.run_grid(s, str(tmp_path / "a"), families_=["DPO"], report_seeds=[0, 1], validation_seed=0)
    with pytest.raises(ValueError, match="unknown method family 'XPO'"):
        E.run_grid(s, str(tmp_path / "b"), families_=["DPO", "XPO"], report_seeds=[1])
    with pytest.raises(ValueError, match="report_seeds is empty"):
        E.run_grid(s, str(tmp_path / "c"), families_=["DPO"], report_seeds=[])
    assert not any(tmp_path.iterdir())  # nothing was written


def test_run_command_reports_and_makes_expected_errors_one_line_with_exit_2(tmp_path, monkeypatch, capsys):
    """The grid's and the demo's shared command-line tail: the --compile-cache value reaches the cache, the
    report path and wall time are printed, an expected error is one line with exit code 2, others propagate."""
    caches = []
    monkeypatch.setattr(E.cli, "enable_compile_cache", caches.append)
    p = argparse.ArgumentParser(prog="prog")
    compile_cache.add_flag(p)
    a = p.parse_args(["--compile-cache", "off"])
    res = E.run_command(p, a, str(tmp_path), lambda: {"timings_s": {"total": 3.2}}, expected=(ValueError,), quiet=())
    assert res == {"timings_s": {"total": 3.2}} and caches == ["off"]
    assert capsys.readouterr().out.startswith(f"report: {tmp_path / 'report.md'}  (wall 3 s; ")

    def fails(exc):
        def run():
            raise exc
        return run
    with pytest.raises(SystemExit) as e:
        E.run_command(p, a, str(tmp_path), fails(ValueError("unknown method family 'XPO'")), expected=(ValueError,),
                      quiet=())
    assert e.value.code == 2 and capsys.readouterr().err == "prog: error: unknown method family 'XPO'\n"
    with pytest.raises(KeyError):
        E.run_command(p, a, str(tmp_path), fails(KeyError("a bug")), expected=(ValueError,), quiet=())


def test_grid_dry_run_lists_and_counts_the_runs_and_estimates_their_time(capsys):
    """Counted by hand from the sweep: 7 SPO families x 4 gammas, RPO and SFT-mix 5 lambdas each, DPOP 4
    lambdas, DPO 4 betas, 5 families at their defaults = 51 runs per setting on the validation seed; 16 per
    setting on each report seed; 2 settings."""
    E.main(["--dry-run"])
    text = capsys.readouterr().out
    assert "51 runs per setting" in text and "  DPOP: λ=5, λ=50, λ=500, λ=5000" in text and "  RFT: defaults" in text
    assert "In all: 3 SFT models (one per seed) and 166 preference runs." in text  # 2 x (51 + 2 x 16)
    per_run, source = E.cli.RUN_COST["grid"]
    assert f"166 runs x {per_run:.1f} CPU s = {166 * per_run:,.0f} CPU s" in text and source in text
    E.main(["--dry-run", "--quick", "--families", "DPO", "RFT", "--seeds", "4"])
    assert "In all: 2 SFT models (one per seed) and 14 preference runs." in capsys.readouterr().out  # 2 x (5 + 2)
    with pytest.raises(SystemExit) as e:
        E.main(["--dry-run", "--families", "XPO"])
    assert e.value.code == 2 and "unknown method family 'XPO'" in capsys.readouterr().err


@pytest.mark.parametrize("prog", ["experiment", "demo"])
def test_help_shows_the_whole_description_and_every_default(prog, capsys):
    from spo_jax import demo
    main = E.main if prog == "experiment" else demo.main
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", out.split("options:")[1])[1:]  # one entry per option
    assert len(options) >= 5 and all("default" in o for o in options if not o.startswith("-h,")), options
    if prog == "demo":
        assert " ".join(demo.__doc__.split()) in " ".join(out.split())  # the whole description


def test_sft_goes_on_until_the_curve_levels_off():
    s = E.WorldSettings(sft_steps=1000, sft_eval_every=250, sft_max_steps=2000)
    script = {1000: {500: 0.5, 750: 0.7, 1000: 0.8}, 1250: {1250: 0.9}, 1500: {1500: 0.91}}
    calls = []

    def run_sft(n):
        calls.append(n)
        return script[n]

    curve = {}
    E.sft_until_levelled(s, curve, run_sft)
    assert calls == [1000, 1250, 1500] and max(curve) == 1500 and E.levelled_off(curve)
    calls.clear()
    E.sft_until_levelled(s, curve, run_sft)  # read back, already level: nothing to train
    assert calls == []
    rising = {1000: {750: 0.1, 1000: 0.5}, **{n: {n: 0.5 + (n - 1000) / 1000} for n in (1250, 1500, 1750, 2000)}}
    curve = {}
    E.sft_until_levelled(s, curve, lambda n: calls.append(n) or rising[n])
    assert calls == [1000, 1250, 1500, 1750, 2000] and not E.levelled_off(curve)  # stops at sft_max_steps
