"""SFT data beside the pairs: ``batch["sft"]``, the "DPO + λ·SFT-data NLL" baseline and SPO's
lower level on the SFT batch, on a tiny Llama (2 layers, width 32).

Oracles: a naive NLL (full logits, ``log_softmax``, per-sequence sums by one-hot masks; none
of ``spo_jax.logprobs`` / ``objectives.sequence_nll``) and its ``jax.grad``, separately jitted
(the same identities on a float64 toy LM against finite differences, and the unrolled solver's
inner loop on ``batch["sft"]``, are in tests/test_bilevel.py):

* DPO + λ·SFT-data NLL with SPO's inner_sft penalty on the same SFT batch: g* = the naive NLL
  after K hand-written SGD steps, the penalty = mean relu(ℓ_i(θ) − ℓ_i(θ_K)), and with every
  q_i > 0 (ε = 0) the direction is ∇DPO (the batch without its SFT part) + (λ + γ)·∇NLL(SFT
  batch) (docs/METHOD.md);
* the trainer: step 1's loss = log 2 + λ·NLL of the SFT batch, a stopped-and-resumed run
  equals a straight one bitwise (both iterators' positions are checkpointed), gradient
  accumulation equals one batch; the CLI with a JSONL SFT file; the bad-input messages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spo_jax import config as config_lib
from spo_jax import inputs, models, objectives, train
from spo_jax.checkpoint import Checkpointer
from spo_jax.data import BatchIterator
from tests.test_train import ROOT, flat_params, tiny_config, train_losses, write_pairs, write_sft
from tests.helpers import xla_flags

LAM = 0.7


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    return write_pairs(d / "pairs.jsonl"), write_sft(d / "sft.jsonl")


@pytest.fixture(scope="module")
def setup(files, tmp_path_factory):
    """The tiny model's init params, a pair batch (with ref_logps = the policy's: π = π_ref) and an
    SFT batch of all 16 SFT rows."""
    pairs, sft = files
    c = tiny_config(tmp_path_factory.mktemp("run"), pairs)
    tok = inputs.load_tokenizer(c)
    model = inputs.build_model(c)
    graphdef, params = nnx.split(model)
    pair_ds, _ = inputs.load_split(c, tok, pairs, "train")
    sft_ds, _ = inputs.load_split(c, tok, sft, "train", sft=True)
    kw = dict(max_length=32, packing=False, length_bucket=16, shuffle=False, num_epochs=1, process_index=0,
              process_count=1)
    batch = {k: jnp.asarray(v) for k, v in next(iter(BatchIterator(pair_ds, batch_size=8, **kw))).items()}
    sft_batch = {k: jnp.asarray(v) for k, v in next(iter(BatchIterator(sft_ds, batch_size=16, **kw))).items()}
    logps_fn = objectives.make_logps_fn(graphdef)
    batch["ref_logps"] = jax.jit(logps_fn)(params, batch)[0]
    return c, graphdef, params, batch, sft_batch, logps_fn


def naive_nll(graphdef, params, b):
    """Per-sequence token-mean NLL [S] and the mean over valid sequences, from full logits."""
    hidden = models.apply(graphdef, params, b["input_ids"], b["positions"], b["segment_ids"])
    w, bias = models.unembedding(graphdef, params)
    logits = jnp.einsum("rtd,dv->rtv", hidden.astype(jnp.float32), w.astype(jnp.float32))
    if bias is not None:
        logits = logits + bias
    tok = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), b["targets"][..., None], -1)[..., 0]
    num = b["seq_valid"].shape[0]
    onehot = (b["seq_ids"][..., None] == jnp.arange(num)) * b["loss_mask"][..., None]  # [R, T, S]
    sums = jnp.einsum("rt,rts->s", tok, onehot)
    counts = jnp.sum(onehot, axis=(0, 1))
    per_seq = -sums / counts
    return per_seq, jnp.sum(per_seq * b["seq_valid"]) / jnp.sum(b["seq_valid"])


def _config(c, **kw):
    c = c.copy_and_resolve_references()
    for k, v in kw.items():
        section, field = k.split("__")
        c[section][field] = v
    return c


def _close(a, b, rtol=2e-4, atol=2e-6):
    fa, fb = flat_params(a), flat_params(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=atol, err_msg=k)


def _combine(a, scale, b):
    return jax.tree.map(lambda x, y: x + scale * y, a, b)


def test_mixed_objective_and_inner_sft_on_the_sft_batch_match_hand_written_pieces(setup):
    """DPO + λ·SFT-data NLL, wrapped in SPO's penalty with the inner_sft value on the same SFT batch:
    g* = the naive NLL after K hand-written SGD steps, the penalty = mean relu(ℓ_i(θ) − ℓ_i(θ_K)), the
    upper objective = log 2 + λ·NLL (π = π_ref), and with every q_i > 0 (ε = 0) the direction is
    ∇DPO + (λ + γ)·∇NLL of the SFT batch, each piece jitted on its own."""
    c, graphdef, params, batch, sft_batch, logps_fn = setup
    gamma, lr, steps = 3.0, 0.05, 2
    cfg = _config(c, spo__enabled=True, spo__value="inner_sft", spo__gamma=gamma, spo__inner_steps=steps,
                  spo__inner_lr=lr, spo__epsilon=0.0, loss__sft_data_weight=LAM)
    solver = jax.jit(objectives.make_solver(cfg, logps_fn))
    grads, m = solver(params, {**batch, "sft": sft_batch})

    grad_g = jax.jit(jax.grad(lambda p: naive_nll(graphdef, p, sft_batch)[1]))
    theta = params
    for _ in range(steps):
        theta = _combine(theta, -lr, grad_g(theta))
    per0, g0 = naive_nll(graphdef, params, sft_batch)
    perk, gk = naive_nll(graphdef, theta, sft_batch)
    np.testing.assert_allclose(m["spo/g_star"], gk, rtol=1e-5)
    np.testing.assert_allclose(m["spo/inner_loss_first"], g0, rtol=1e-5)
    np.testing.assert_allclose(m["sft_data/nll"], g0, rtol=1e-5)
    np.testing.assert_allclose(m["loss/preference"], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(m["spo/upper_loss"], np.log(2.0) + LAM * g0, rtol=1e-5)
    np.testing.assert_allclose(m["spo/penalty"], jnp.mean(jax.nn.relu(per0 - perk)), rtol=1e-4)
    assert float(m["spo/violation_frac"]) == 1.0  # ε = 0: every q_i > 0, the relu is the identity
    g_dpo, _ = jax.jit(objectives.make_solver(c, logps_fn))(params, batch)
    g_nll = grad_g(params)
    _close(grads, _combine(g_dpo, LAM + gamma, g_nll))
    # the NLL terms move the direction (the check is not DPO against itself)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_nll)) > 1e-3


def test_resume_with_the_sft_iterator_is_bitwise_identical(files, tmp_path):
    pairs, sft = files
    # 8 SFT rows per step from 16: the SFT iterator starts its second epoch at step 3, after the resume
    kw = dict(data__sft_path=sft, data__sft_batch_size=8, loss__sft_data_weight=LAM, train__num_steps=4,
              checkpoint__every=2)
    straight = train.train(tiny_config(tmp_path / "a", pairs, **kw))
    first = train.train(tiny_config(tmp_path / "b", pairs, **kw), stop_at=2)
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 2
    resumed = train.train(tiny_config(tmp_path / "b", pairs, **kw))
    assert resumed.start_step == 2
    a, b = flat_params(straight.state.params), flat_params(resumed.state.params)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert train_losses(first) + train_losses(resumed) == train_losses(straight)
    nll = [h["sft_data/nll"] for h in straight.history if h["split"] == "train"]
    assert len(set(nll)) == len(nll)  # the SFT batch changes from step to step


def test_train_batches_resume_both_positions_and_refuse_a_position_of_another_kind(files, tmp_path):
    """``inputs.train_batches``: each pair batch carries an SFT batch under "sft"; batches made afresh and set
    to a saved (JSON round-tripped) position go on exactly as the first ones, the SFT iterator into its second
    epoch; a position with an SFT iterator is refused by batches without SFT data, and the reverse."""
    pairs, sft = files
    c = tiny_config(tmp_path, pairs, data__sft_path=sft, data__sft_batch_size=8, loss__sft_data_weight=LAM)
    tok = inputs.load_tokenizer(c)
    pair_ds, _ = inputs.load_split(c, tok, pairs, "train")
    sft_ds, _ = inputs.load_split(c, tok, sft, "train", sft=True)

    def make(with_sft):
        return inputs.train_batches(c, pair_ds, sft_ds if with_sft else None, pad_id=inputs.pad_id(tok))

    straight = make(True)
    next(straight)
    state = json.loads(json.dumps(straight.get_state()))
    resumed = make(True)
    resumed.set_state(state)
    for _ in range(2):  # 16 SFT rows, 8 a batch: the second of these starts the SFT iterator's epoch 2
        a, b = next(straight), next(resumed)
        assert set(a) == set(b) and "sft" in a
        jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(config_lib.ConfigError, match=r"has an SFT-data iterator but this run has no SFT data"):
        make(False).set_state(state)
    with pytest.raises(config_lib.ConfigError, match=r"has no SFT-data iterator but this run reads SFT data"):
        make(True).set_state(make(False).get_state())


def test_trainer_step_one_and_gradient_accumulation_with_sft_batches(files, setup, tmp_path):
    """Step 1's SFT batch is all 16 SFT rows: its loss = log 2 + λ·NLL of them under the initial model
    (naive oracle); two micro-batches of 4 pairs + 8 SFT rows equal one batch of 8 + 16."""
    pairs, sft = files
    _, graphdef, params, _, sft_batch, _ = setup
    kw = dict(data__sft_path=sft, data__sft_batch_size=16, loss__sft_data_weight=LAM, data__shuffle=False,
              data__batch_size=8, train__num_steps=2)
    one = train.train(tiny_config(tmp_path / "one", pairs, **kw))
    first = [h for h in one.history if h["split"] == "train"][0]
    value = float(naive_nll(graphdef, params, sft_batch)[1])
    np.testing.assert_allclose(first["sft_data/nll"], value, rtol=1e-5)
    np.testing.assert_allclose(first["loss"], np.log(2.0) + LAM * value, rtol=1e-5)
    assert first["tokens"] > int(np.sum(sft_batch["segment_ids"] > 0))  # the SFT tokens count with the pairs'
    acc = train.train(tiny_config(tmp_path / "acc", pairs, optim__grad_accum_steps=2, **kw))
    np.testing.assert_allclose(train_losses(acc), train_losses(one), rtol=1e-5, atol=1e-6)
    _close(acc.state.params, one.state.params, rtol=1e-5, atol=1e-6)


def test_cli_with_a_jsonl_sft_file(files, tmp_path):
    pairs, sft = files
    args = [sys.executable, "-m", "spo_jax.train", f"--config={os.path.join(ROOT, 'experiments', 'tiny_test.py')}",
            f"--config.run_dir={tmp_path}", f"--config.data.train_path={pairs}", f"--config.data.sft_path={sft}",
            "--config.data.sft_batch_size=8", "--config.loss.sft_data_weight=2.0", "--config.train.num_steps=1",
            "--config.optim.warmup_steps=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"loss=dpo + 2·SFT-data NLL train={pairs} eval=- sft_data={sft} " in proc.stdout + proc.stderr
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl") if '"train"' in x]
    assert [r["step"] for r in rows] == [1]
    for r in rows:
        np.testing.assert_allclose(r["loss"], r["loss/preference"] + 2.0 * r["sft_data/nll"], rtol=1e-5)


def test_bad_sft_inputs_name_the_field_and_the_fix(files, tmp_path):
    pairs, sft = files

    def check(pattern, **kw):
        with pytest.raises(config_lib.ConfigError, match=pattern):
            config_lib.validate_config(tiny_config(tmp_path, pairs, **kw), num_devices=8, process_count=1)

    check(r"config\.data\.sft_path=.*nothing reads the SFT data: set loss\.sft_data_weight > 0", data__sft_path=sft)
    check(r"config\.data\.sft_path=.*nothing reads", data__sft_path=sft, spo__enabled=True)  # value 'reference'
    check(r"config\.loss\.sft_data_weight=1\.0: the SFT-data NLL term needs SFT data: set data\.sft_path",
          loss__sft_data_weight=1.0)
    check(r"config\.loss\.sft_data_weight=-1\.0: must be a finite number >= 0", loss__sft_data_weight=-1.0)
    check(r"config\.data\.sft_path=.*stage 'sft' does not read it", data__sft_path=sft, stage="sft",
          reference__mode="none", data__batch_size=8)
    check(r"config\.data\.sft_path=.*missing\.jsonl.*no such file", data__sft_path=str(tmp_path / "missing.jsonl"),
          loss__sft_data_weight=1.0)
    for solver in ("unrolled", "implicit"):  # their inner loop is a reader: accepted
        config_lib.validate_config(tiny_config(tmp_path, pairs, data__sft_path=sft, data__sft_batch_size=8,
                                               spo__enabled=True, spo__solver=solver, spo__gamma=0.0),
                                   num_devices=8, process_count=1)
    check(r"config\.data\.sft_batch_size=4: .*mesh\.data\*mesh\.fsdp = 8", data__sft_path=sft, data__sft_batch_size=4,
          loss__sft_data_weight=1.0)
    # preference rows given as the SFT data: refused when loaded, before any model is built
    rows = datasets.Dataset.from_list([json.loads(x) for x in open(pairs)])
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.sft_path='<in-memory sft_data>': holds "
                                                     r"preference data .* needs SFT data"):
        train.train(tiny_config(tmp_path / "bad", pairs, loss__sft_data_weight=1.0, data__sft_batch_size=8),
                    sft_data=rows)
