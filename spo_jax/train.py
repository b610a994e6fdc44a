"""The training loop: run directory, data, model, checkpoint / metrics / evaluation hooks.

One way through (docs/DESIGN.md): config (``spo_jax.config``, validated first) ->
``spo_jax.inputs`` (tokenizer, model, tokenized data, Contract-1 NumPy batches, each
process its slice) -> global arrays sharded over ``("data", "fsdp")`` ->
``train_step(state, batch)`` (pure, jitted with in/out shardings, state donated):
``spo_jax.reference`` adds reference log-probs, ``spo_jax.objectives`` gives the
solver's direction -> optax (AdamW, warm-up + cosine/linear decay, global-norm
clipping) -> metrics read one step late -> writers; Orbax saves the state with the
data-iterator position. The command line is ``spo_jax.cli``
(``python -m spo_jax.train --config ...`` runs it).

Public Python API (what the demo, the experiments and the benchmarks call):

* ``train(config, *, train_data=None, eval_data=None, sft_data=None, stop_at=None) -> TrainResult``
* ``TrainState``, ``make_step_fn``, ``make_train_step``, ``make_eval_step``: the jitted programs, defined
  in ``spo_jax.steps`` (shared with the pre-flight ``spo_jax.plan``) and re-exported here

With ``model.lora.enabled`` (``spo_jax.adapters``) ``params`` are the LoRA adapters, ``frozen`` the base
model, and the step functions take an ``adapters.Policy`` (its graphdefs) where they take a graphdef.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from spo_jax import adapters
from spo_jax import config as config_lib
from spo_jax import inputs, models, plan, run_info, sampling, validation
from spo_jax import reference as reference_lib
from spo_jax import sharding as sharding_lib
from spo_jax.checkpoint import (EVAL_SECTIONS, RESUME_SECTIONS, Checkpointer, all_processes_agree,
                                check_resume_config)
from spo_jax.metrics import (MetricWriter, Progress, TrainingHealth, degenerate_error, measure_peak_flops, mfu,
                             pooled_mean)
from spo_jax import optim as optim_lib
from spo_jax.optim import make_optimizer
from spo_jax.runlock import lock_run_dir
from spo_jax.steps import TrainState, make_eval_step, make_step_fn, make_train_step

__all__ = ["STOP_REQUESTED", "TrainState", "TrainResult", "make_step_fn", "make_train_step", "make_eval_step",
           "SCAN_STEPS", "FlatLossCheck", "train", "validate_for_run"]

logger = logging.getLogger("spo_jax.train")

#: Set (by the CLI's SIGINT / SIGTERM handling) to end the loop after the current step, with a
#: checkpoint there, as a pre-empted job should (before the first step: at once, nothing to save).
STOP_REQUESTED = threading.Event()

@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the final state (on device), the metric history
    (list of ``{"step", "split", ...}`` dicts, as in metrics.jsonl), the last
    evaluation's metrics, the run directory, and where the HF export went."""

    state: TrainState | None
    graphdef: Any
    history: list[dict]
    final_eval: dict
    run_dir: str
    export_dir: str | None
    start_step: int
    policy: adapters.Policy | None = None  # the graphdefs (under LoRA: merge eval_graphdef with
    #                                        adapters.full_state(state.params, state.frozen))


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


def _config_dict(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


def _count_params(params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


class _Loop:
    """Holds the run's objects; ``run()`` is the training loop."""

    def __init__(self, config, train_data=None, eval_data=None, sft_data=None):
        self.config = c = config
        self.run_dir = os.path.abspath(os.path.expanduser(c.run_dir))
        self.is_main = jax.process_index() == 0
        self.mesh = sharding_lib.make_mesh((c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
        self.history: list[dict] = []
        self._warned: set[str] = set()
        self.writer = MetricWriter(self.run_dir, jsonl=c.metrics.jsonl, tensorboard=c.metrics.tensorboard,
                                   enabled=self.is_main, wandb_project=c.metrics.wandb_project,
                                   wandb_config=_config_dict(c))
        self.tokenizer = inputs.load_tokenizer(c)
        self.pad_id = inputs.pad_id(self.tokenizer)
        self.accum = int(c.optim.grad_accum_steps)

        # data
        self.train_ds = self.eval_ds = self.sft_ds = None
        if c.stage != "eval":
            self.train_ds, stats = inputs.load_split(c, self.tokenizer, c.data.train_path, c.data.train_split,
                                                     train_data)
            self._check_kind(stats, "data.train_path", c.data.train_path)
            if len(self.train_ds) < c.data.batch_size and self.is_main:
                logger.warning("data.train_path has %d usable row(s), fewer than data.batch_size=%d: each batch "
                               "holds at most %d distinct row(s)", len(self.train_ds), c.data.batch_size,
                               len(self.train_ds))
        if c.data.sft_path or sft_data is not None:  # validated: a preference run whose objective reads it
            self.sft_ds, _ = inputs.load_split(c, self.tokenizer, c.data.sft_path, c.data.sft_split, sft_data,
                                               sft=True)
        if c.data.eval_path or eval_data is not None:
            self.eval_ds, stats = inputs.load_split(c, self.tokenizer, c.data.eval_path, c.data.eval_split,
                                                    eval_data)
            self._check_kind(stats, "data.eval_path", c.data.eval_path)
            self.eval_kind = stats["kind"]

        # model (policy), reference, state
        # LoRA: params = the adapters, frozen = the base (spo_jax.adapters); else frozen is None
        model = inputs.build_model(c)
        too_long = inputs.check_positions(c, model.config)  # a Hub id / .gguf is first known here
        inputs.check_token_ids(c, model.config.vocab_size, {"data.train_path": self.train_ds,
                               "data.eval_path": self.eval_ds, "data.sft_path": self.sft_ds}, self.pad_id)
        if too_long and self.is_main:
            logger.warning("%s", too_long)
        self.policy, params, frozen = adapters.split_policy(c, model)
        self.graphdef = self.policy.graphdef
        self.tx, self.schedule = make_optimizer(c)
        self.num_params = _count_params(params) + _count_params(frozen)
        params = self._shard(params)
        frozen = None if frozen is None else self._shard(frozen)
        self.reference = reference_lib.Reference.setup(
            c, graphdef=self.policy.base_graphdef if self.policy.lora else self.graphdef,
            policy_params=adapters.full_state(params, frozen),
            shares_policy=self.policy.lora, shard=self._shard, mesh=self.mesh, pad_id=self.pad_id,
            datasets={"train": self.train_ds, "eval": self.eval_ds},
            batch_sizes={"train": c.data.batch_size // self.accum, "eval": c.data.eval_batch_size},
            run_dir=self.run_dir, is_main=self.is_main)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(self.tx.init)(params),
                           rng=jax.random.PRNGKey(int(c.seed)), ref_params=self.reference.params, frozen=frozen)
        self.shardings = sharding_lib.param_shardings(jax.eval_shape(lambda: state), self.mesh)
        self.state = jax.device_put(state, self.shardings)
        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=c.checkpoint.keep,
                                         async_save=c.checkpoint.async_save)

    # --------------------------------------------------------------- helpers

    def _check_kind(self, stats, field, value):
        c = self.config
        want = "sft" if c.stage == "sft" else "preference"
        if c.stage == "eval":
            want = "preference" if reference_lib.reference_mode(c) != "none" else stats.get("kind")
        if stats.get("kind") != want:
            raise config_lib.ConfigError(
                f"config.{field}={value!r}: holds {stats.get('kind')} data (format {stats.get('format')!r}) but "
                f"stage {c.stage!r} needs {want} data; point it at a {want} dataset or change config.stage")

    def _shard(self, params):
        return jax.device_put(params, sharding_lib.param_shardings(jax.eval_shape(lambda: params), self.mesh))

    def _next_local(self, batches: inputs.TrainBatches) -> dict:
        if self.accum == 1:
            return self.reference.add_to(next(batches), "train")
        return inputs.stack_micro([self.reference.add_to(next(batches), "train") for _ in range(self.accum)])

    # --------------------------------------------------------------- eval

    def evaluate(self, params, step: int) -> dict:
        """Held-out metrics (weighted by pairs / sequences) over ``eval.num_batches``."""
        c = self.config
        if self.eval_ds is None:
            return {}
        if not hasattr(self, "_eval_step"):
            self._eval_step = make_eval_step(c, self.policy, self.mesh, sft_data=self.eval_kind == "sft")
        it = inputs.make_iterator(c, self.eval_ds, batch_size=c.data.eval_batch_size, shuffle=False, num_epochs=1,
                                  seed=0, pad_id=self.pad_id)
        per_batch = []
        total = min(it.num_batches(), c.eval.num_batches or it.num_batches())
        bar = tqdm(total=total, desc=f"eval at step {step}", unit="batch", dynamic_ncols=True, leave=False,
                   disable=not (c.metrics.progress_bar and self.is_main))
        for i, local in enumerate(it):
            if c.eval.num_batches and i >= c.eval.num_batches:
                break
            batch = sharding_lib.make_global_batch(self.reference.add_to(local, "eval"), self.mesh)
            per_batch.append(jax.device_get(self._eval_step(params, self.reference.params, batch, self.state.frozen)))
            bar.update(1)
        bar.close()
        out = pooled_mean(per_batch)
        if c.eval.generation:
            out.update(self._generation_accuracy(params))
        logger.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(out.items())))
        self.writer.write(step, out, split="eval")
        self.history.append({"step": step, "split": "eval", **out})
        return out

    def _generation_accuracy(self, params) -> dict:
        """``sampling.tokenized_accuracy`` on the first ``eval.num_prompts`` held-out rows."""
        c = self.config
        n = min(int(c.eval.num_prompts), len(self.eval_ds))
        accuracy, _ = sampling.tokenized_accuracy(
            (self.policy.eval_graphdef, adapters.full_state(params, self.state.frozen)), self.tokenizer,
            self.eval_ds.select(range(n)), max_new_tokens=int(c.eval.max_new_tokens),
            key=jax.random.fold_in(jax.random.PRNGKey(int(c.seed)), 7), temperature=float(c.eval.temperature),
            batch_size=min(int(c.data.eval_batch_size), n), pad_id=self.pad_id)
        return {"gen/accuracy": accuracy, "gen/num_prompts": float(n)}

    # --------------------------------------------------------------- train

    def restore_if_any(self, it: inputs.TrainBatches | None) -> int:
        c = self.config
        if not c.checkpoint.resume:
            existing = self.checkpointer.all_steps()
            if existing:  # starting over would mix two runs' checkpoints and metrics in one directory
                raise config_lib.ConfigError(
                    f"config.checkpoint.resume=False: run_dir {self.run_dir} already holds checkpoints (steps "
                    f"{existing}); use a new run_dir to start over, or set checkpoint.resume=True to continue")
            return 0
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                self.state.saveable(), self.shardings.saveable())
        found = self.checkpointer.restore_latest(abstract, strict=bool(c.checkpoint.strict_restore),
                                                 check_config=self._check_resume_config,
                                                 step=int(c.checkpoint.restore_step) or None)
        if found is None:
            return 0
        step, restored, data_state, _ = found
        self.state = self.state.replace(**restored)
        if data_state and it is not None:
            it.set_state(data_state)
        logger.info("resumed from %s step %d", self.checkpointer.directory, step)
        if c.stage != "eval" and self.is_main:  # the resume check passed: this config continues the run
            run_info.write_config(self.run_dir, _config_dict(c))
        return int(step)

    def _check_resume_config(self, saved: dict) -> None:
        check_resume_config(saved, _config_dict(self.config), self.checkpointer.directory,
                            allow_optim_change=bool(self.config.checkpoint.allow_optim_change),
                            sections=EVAL_SECTIONS if self.config.stage == "eval" else RESUME_SECTIONS,
                            defaults=_config_dict(config_lib.get_default_config()))

    def _save(self, step: int, it) -> None:
        self.writer.flush()  # every record up to this checkpoint is on disk before it exists
        self.checkpointer.save(step, self.state.saveable(), it.get_state(), _config_dict(self.config))

    def run(self, stop_at: int | None = None) -> TrainResult:
        c = self.config
        num_steps = int(c.train.num_steps)
        last = num_steps if stop_at is None else min(int(stop_at), num_steps)
        it = inputs.train_batches(c, self.train_ds, self.sft_ds, pad_id=self.pad_id)
        health = TrainingHealth(float(optax.tree.norm(self.state.params)), int(c.train.degenerate_steps))
        start = self.restore_if_any(it)
        self.writer.start(start)  # drops records after the resumed step (recomputed now)
        train_step = make_train_step(c, self.policy, self.tx, self.schedule, self.mesh, self.shardings)
        programs = self._compile_ahead(it, start, last, train_step)
        flat = FlatLossCheck(start, self._lr_hint())
        peak = c.metrics.peak_tflops * 1e12 if c.metrics.peak_tflops else measure_peak_flops(
            "bfloat16" if jax.devices()[0].platform != "cpu" and c.model.dtype == "bfloat16" else "float32")
        ref_n = self.num_params if self.reference.mode == "online" else 0
        progress = Progress(num_steps, initial=start, enabled=c.metrics.progress_bar and self.is_main)
        pending = None  # (step, metrics still on device)
        final_eval: dict = {}
        done_at = [None]  # when the last read step had finished (None: nothing in flight before the next)

        def read(p):
            # step time = from the previous step's completion to this one's (the loop keeps one step in
            # flight, so each read waits for its step to finish), or from its dispatch when nothing ran
            # before it (after a save or an evaluation, which drain the pipeline)
            step, metrics, dispatched = p
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            dt = now - (done_at[0] if done_at[0] is not None else dispatched)
            done_at[0] = now
            tokens = m["tokens"]
            problem = health.check(step, m)
            if problem is not None:
                self._degenerate(problem, health.first_bad_step)
            if step > start + 1:  # the first step of a process includes compilation
                m["step_time"] = dt
                m["tokens_per_sec"] = tokens / dt
                m["mfu"] = mfu(self.num_params, tokens, dt, peak, jax.device_count(), ref_n)
                if step == start + 2 and self.is_main:  # the first timed step: the run's projected time
                    logger.info("step time %.3g s: the remaining %d steps take about %.1f min", dt, num_steps - step,
                                dt * (num_steps - step) / 60)
            if self.is_main and (warning := flat.check(step, m["loss"])):
                logger.warning("%s", warning)
            if step % c.metrics.log_every == 0 or step == num_steps:
                self.writer.write(step, m)
                self.history.append({"step": step, "split": "train", **m})
            progress.update(1, m)

        if STOP_REQUESTED.is_set():  # asked before this invocation's first step: nothing new to save
            last = start
        try:
            for step in range(start, last):
                local = self._next_local(it)
                batch = sharding_lib.make_global_batch(local, self.mesh, leading_micro_axis=self.accum > 1)
                dispatched = time.perf_counter()
                self.state, metrics = programs.get(_shape_key(local), train_step)(self.state, batch)
                if pending is not None:
                    read(pending)  # step t's metrics, after step t+1 was dispatched
                pending = (step + 1, metrics, dispatched)
                done = step + 1
                stopping = STOP_REQUESTED.is_set() and done < last  # Ctrl-C, SIGTERM: save and end here
                save_now = done == last or stopping or (c.checkpoint.every and done % c.checkpoint.every == 0)
                eval_now = bool(c.eval.every) and done % c.eval.every == 0 and done != num_steps
                if save_now or eval_now:
                    read(pending)  # never save or evaluate a state whose step was not checked
                    pending = None
                if save_now:
                    self._save(done, it)
                if eval_now:
                    self.evaluate(self.state.params, done)
                if save_now or eval_now:
                    done_at[0] = None
                if stopping:
                    self.checkpointer.wait()  # complete on disk before it is announced
                    logger.warning("stop requested: checkpoint at step %d written; rerun the same command to resume",
                                   done)
                    last = done
                    break
            if pending is not None:
                read(pending)
            self.checkpointer.wait()
            finished = last == num_steps
            if self.eval_ds is not None and finished:
                final_eval = self.evaluate(self.state.params, num_steps)
            export = self._export() if c.checkpoint.export_hf and finished else None
        finally:
            progress.close()
            self.writer.flush()
            self.checkpointer.close()
            self.writer.close()
        return TrainResult(self.state, self.graphdef, self.history, final_eval, self.run_dir, export, start,
                           self.policy)

    def _compile_ahead(self, it: inputs.TrainBatches, start: int, last: int, train_step) -> dict:
        """Compile the train step for every batch shape of steps ``start..last`` before the first
        step (a new length bucket mid-run would stall that step for the whole compile). The shapes
        come from a copy of the data iterator at the run's position (NumPy batches only; the first
        :data:`SCAN_STEPS` steps). Returns ``{shape key: compiled step}``; a shape not in it (past
        the scan) compiles where it first occurs."""
        peek = inputs.train_batches(self.config, self.train_ds, self.sft_ds, pad_id=self.pad_id)
        peek.set_state(it.get_state())
        firsts: dict = {}
        for _ in range(min(last - start, SCAN_STEPS)):
            local = self._next_local(peek)
            firsts.setdefault(_shape_key(local), local)
        if self.is_main and firsts:
            logger.info("the train step compiles for %d batch shape(s) over steps %d-%d (length x scored positions: "
                        "%s); compiling each before the first step", len(firsts), start + 1, last,
                        ", ".join(_shape_name(b) for b in firsts.values()))
        programs = {}
        for i, (key, local) in enumerate(firsts.items(), 1):
            t0 = time.perf_counter()
            if self.is_main:
                logger.info("compiling the train step for %s (%d of %d) ...", _shape_name(local), i, len(firsts))
            batch = sharding_lib.make_global_batch(local, self.mesh, leading_micro_axis=self.accum > 1)
            programs[key] = train_step.lower(self.state, batch).compile()
            if self.is_main:
                logger.info("compiled the train step for %s in %.1f s", _shape_name(local), time.perf_counter() - t0)
        return programs

    def _lr_hint(self) -> str:
        c = self.config
        lr = optim_lib.learning_rate(c)
        hint = f"peak learning rate {lr:g}" + (f" reached after optim.warmup_steps={c.optim.warmup_steps}"
                                               if c.optim.warmup_steps else "")
        if c.model.lora.enabled and lr < optim_lib.DEFAULT_LEARNING_RATES["lora"] / 10:
            hint += (f"; LoRA adapters need a rate ~10-100x full fine-tuning's (default "
                     f"{optim_lib.DEFAULT_LEARNING_RATES['lora']:g})")
        return hint

    def _degenerate(self, problem: tuple[str, str], first_bad: int) -> None:
        """Stop (or, with train.on_degenerate='warn', log once and go on) on degenerate
        training; non-finite values always stop. The state is never saved."""
        kind, what = problem
        if kind != "non_finite" and self.config.train.on_degenerate == "warn":
            if kind not in self._warned:
                self._warned.add(kind)
                logger.warning("%s; continuing (train.on_degenerate='warn')", what)
            return
        self.checkpointer.wait()
        good = [s for s in self.checkpointer.all_steps() if s < first_bad]
        raise degenerate_error(problem, good, self.checkpointer.directory)

    def _export(self) -> str | None:
        """The final policy in HF format (``models.save_pretrained``) under <run_dir>/hf_final; under LoRA
        the adapters merged in, and the PEFT adapter in <run_dir>/adapter_final (``adapters.export``)."""
        params = jax.jit(lambda p: p, out_shardings=sharding_lib.replicated(self.mesh))(self.state.params)
        if self.policy.lora:
            frozen = jax.jit(lambda p: p, out_shardings=sharding_lib.replicated(self.mesh))(self.state.frozen)
            base = self.config.model.path or None
            if self.is_main:
                return adapters.export(self.policy, jax.device_get(params), jax.device_get(frozen), self.run_dir,
                                       base_source=base, tokenizer=self.tokenizer)
            return os.path.join(self.run_dir, "hf_final")
        path = os.path.join(self.run_dir, "hf_final")
        if self.is_main:
            model = nnx.merge(self.graphdef, jax.device_get(params))
            models.save_pretrained(model, path)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(path)
        return path

    def run_eval(self) -> TrainResult:
        """Stage "eval": restore the run's latest checkpoint (``checkpoint.restore_step``: that one; only
        model.* and optim.* must match its config) and evaluate it; with ``checkpoint.resume=False``
        evaluate the model as loaded, saying so when it is also its own reference."""
        c = self.config
        start = self.restore_if_any(None) if c.checkpoint.resume else 0  # no training data to position
        if not c.checkpoint.resume and self.reference.mode != "none" and not c.reference.path and self.is_main:
            logger.warning(
                "stage eval restored no checkpoint (checkpoint.resume=False): the policy is the model as loaded "
                "(model.path=%r) and is also its own reference, so the preference metrics are an untrained "
                "model's (loss ln 2, rewards 0). To evaluate a training run, set run_dir to it with "
                "checkpoint.resume=True; to evaluate an exported model against its base, set reference.path to "
                "the base", c.model.path)
        self.writer.start(None)  # appends an evaluation record to the run's history
        try:
            out = self.evaluate(self.state.params, start)
        finally:
            self.writer.flush()
            self.checkpointer.close()
            self.writer.close()
        return TrainResult(self.state, self.graphdef, self.history, out, self.run_dir, None, start, self.policy)


#: Steps of the data iterator scanned for the train step's batch shapes (``_Loop._compile_ahead``).
SCAN_STEPS = 10_000


def _shape_key(local: dict) -> tuple:
    return tuple(np.shape(x) for x in jax.tree.leaves(local))


def _shape_name(local: dict) -> str:
    ids, scored = local["input_ids"], local["score_index"]
    micro = f"{ids.shape[0]} micro-batches of " if ids.ndim == 3 else ""
    name = f"{micro}length {ids.shape[-1]} x {scored.shape[-1]} scored"
    if "sft" in local:
        name += f", SFT batch length {local['sft']['input_ids'].shape[-1]}"
    return name


class FlatLossCheck:
    """Warns once when the loss has not moved over the first :attr:`STEPS` steps of an invocation
    (relative change below :attr:`RTOL`): the updates are too small, most often a learning rate
    meant for another setting (e.g. full fine-tuning's under LoRA) or a warm-up longer than the
    steps run. ``check(step, loss)`` returns the warning's text once, else None."""

    STEPS = 10
    RTOL = 1e-3

    def __init__(self, start: int, hint: str):
        self.start, self.hint, self.first, self.warned = start, hint, None, False

    def check(self, step: int, loss: float) -> str | None:
        if self.first is None:
            self.first = loss
        if self.warned or step != self.start + self.STEPS or not np.isfinite(loss):
            return None
        self.warned = True
        if abs(loss - self.first) > self.RTOL * max(abs(self.first), 1e-8):
            return None
        return (f"the loss has not moved over the first {self.STEPS} steps ({self.first:.6g} -> {loss:.6g}): "
                f"the updates are too small; {self.hint}. Raise optim.learning_rate or shorten optim.warmup_steps")


def train(config, *, train_data=None, eval_data=None, sft_data=None, stop_at: int | None = None) -> TrainResult:
    """Validate ``config``, then run its stage. ``train_data`` / ``eval_data`` / ``sft_data``
    (optional ``datasets.Dataset`` in any supported row format) replace the
    ``data.train_path`` / ``data.eval_path`` / ``data.sft_path`` sources (the fields may then be
    empty; ``sft_data``: SFT rows batched as ``batch["sft"]`` beside the pairs). ``stop_at``: end this invocation after that optimizer step (with a
    checkpoint there, as a pre-empted job would; a later call resumes). The run
    resumes from the latest complete checkpoint in ``run_dir`` when
    ``checkpoint.resume``. The run holds ``<run_dir>/run.lock`` (``spo_jax.runlock``) from before it
    writes anything until it returns: a second run on the same directory raises a ``ConfigError``
    naming the holder. Returns a ``TrainResult``."""
    c = config
    sharding_lib.initialize_distributed(c.distributed.coordinator_address, c.distributed.num_processes,
                                        c.distributed.process_id, c.distributed.cpu_collectives)
    validate_for_run(c, train_data=train_data, eval_data=eval_data, sft_data=sft_data)
    if c.stage == "eval" and c.checkpoint.resume:
        _check_eval_source(c)
    lock = lock_run_dir(c.run_dir, is_main=jax.process_index() == 0, agree=all_processes_agree)
    try:
        # config.json is the training run's: written now for a fresh run, after the resume check for a
        # resumed one (a refused resume leaves it as it was), never by an evaluation
        run_info.write(c, _config_dict(c), in_memory=tuple(k for k, d in (("train", train_data), ("eval", eval_data),
                                                                          ("sft", sft_data)) if d is not None),
                       config_file=c.stage != "eval" and not _has_checkpoints(c))
        plan.preflight(c)  # the step's memory against the devices', before any data or reference work
        loop = _Loop(c, train_data=train_data, eval_data=eval_data, sft_data=sft_data)
        if c.stage == "eval":
            return loop.run_eval()
        return loop.run(stop_at=stop_at)
    finally:
        if lock is not None:
            lock.release()


def _checkpoint_dir(c) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(c.run_dir)), "checkpoints")


def _has_checkpoints(c) -> bool:
    directory = _checkpoint_dir(c)
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def _check_eval_source(c) -> None:
    """Stage eval with ``checkpoint.resume``: run_dir must hold a training run's checkpoints (a
    mistyped run_dir would otherwise evaluate the initial model)."""
    directory = _checkpoint_dir(c)
    if not _has_checkpoints(c):
        raise config_lib.ConfigError(
            f"config.run_dir={c.run_dir!r}: stage eval evaluates a training run's latest checkpoint, and "
            f"{directory} {'holds none' if os.path.isdir(directory) else 'does not exist'}; point run_dir at a "
            "training run, or set checkpoint.resume=False to evaluate model.path as it is (e.g. "
            "model.path=<run_dir>/hf_final)")


def validate_for_run(config, *, train_data=None, eval_data=None, sft_data=None) -> None:
    """``config.validate_config`` with in-memory datasets standing in for paths."""
    if train_data is None and eval_data is None and sft_data is None:
        config_lib.validate_config(config)
        return
    c = config.copy_and_resolve_references()
    if train_data is not None and not c.data.train_path:
        c.data.train_path = validation.IN_MEMORY + ">"
    if eval_data is not None and not c.data.eval_path:
        c.data.eval_path = validation.IN_MEMORY + ">"
    if sft_data is not None and not c.data.sft_path:
        c.data.sft_path = validation.IN_MEMORY + " sft_data>"
    config_lib.validate_config(c)


if __name__ == "__main__":  # ``python -m spo_jax.train``: the CLI, run as a script (this module never imports it)
    import runpy

    runpy.run_module("spo_jax.cli", run_name="__main__", alter_sys=True)
