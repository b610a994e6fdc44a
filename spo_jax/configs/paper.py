"""The SPO paper's experiment grid (arXiv 2507.07723, Table 2) as spo_jax configs.

One config file for the whole grid; ml_collections passes the text after ``:``
to ``get_config``::

    python -m spo_jax.train --config=paper:MODEL,LOSS,SPO,DATASET[,STAGE][,MESH] \
        [--config.a.b=value ...]

    MODEL    qwen2.5-0.5b | llama-3.2-1b | llama-3-8b       (see MODELS)
    LOSS     dpo | cpo | dpop | rdpo | simpo | alphadpo      (see LOSSES), or "sft"
             (the SFT model itself: stage sft trains it, stage eval scores it)
    SPO      spo | nospo                                     (wrap the loss in SPO or not)
    DATASET  gsm8k | ultrafeedback                           (see the pipeline below)
    STAGE    sft | preference | eval   (default: sft for LOSS=sft, else preference)
    MESH     gpu | tpu | local         (default gpu; see MESHES)

Examples::

    # GSM8K, Qwen-2.5-0.5B: SFT -> on-policy pairs -> DPO+SPO -> greedy accuracy
    python -m spo_jax.train --config=paper:qwen2.5-0.5b,sft,nospo,gsm8k
    #   (sample pairs from runs/qwen2.5-0.5b/gsm8k/sft/hf_final into runs/qwen2.5-0.5b/gsm8k/pairs.jsonl)
    python -m spo_jax.train --config=paper:qwen2.5-0.5b,dpo,spo,gsm8k
    python -m spo_jax.train --config=paper:qwen2.5-0.5b,dpo,spo,gsm8k,eval
    # UltraFeedback, LLaMA-3-8B on a TPU pod slice, from a local SFT checkpoint
    python -m spo_jax.train --config=paper:llama-3-8b,simpo,spo,ultrafeedback,tpu \
        --config.model.path=/ckpt/llama-3-8b-sft
    # every entry of the grid, one per line (script the sweep with it)
    python -m spo_jax.configs.paper --list [--stage preference]

Paths (all overridable with ``--config.<field>=``):

* ``$SPO_JAX_DATA`` (default ``../shared/data`` next to the repository): GSM8K's
  ``gsm8k/train.jsonl`` and ``gsm8k/test.jsonl`` (fields ``question``, ``answer``).
* ``$SPO_JAX_RUNS`` (default ``runs``): run directories
  ``<runs>/<model>/<dataset>/<method>`` with method ``sft``, ``dpo``, ``dpo+spo``, ...;
  the GSM8K pairs file is ``<runs>/<model>/gsm8k/pairs.jsonl``.

GSM8K pipeline (per model): (1) stage ``sft`` on the GSM8K train set, exported to
``<runs>/<model>/gsm8k/sft/hf_final``; (2) sample solutions of the train questions
from that model and pair a correct one (chosen) with an incorrect one (rejected)
with ``spo_jax.data.gsm8k.build_preference_pairs``, written as jsonl rows
``{"prompt", "chosen", "rejected"}`` to ``pairs.jsonl`` (the prompt must be the
SFT prompt ``"Question: {question}\\nAnswer:"``); (3) stage ``preference`` from the
SFT model (which is also the reference) on those pairs; (4) stage ``eval``: greedy
GSM8K test accuracy of the exported model (SFT reports it at its end too).
UltraFeedback: stage ``preference`` on ``HuggingFaceH4/ultrafeedback_binarized``
(``train_prefs`` / ``test_prefs``) from ``model.path`` (default: the Hub base
model; the SimPO setup starts from an UltraChat SFT model, e.g.
``princeton-nlp/Llama-3-Base-8B-SFT``: pass it with ``--config.model.path``).

Where each hyperparameter comes from is written next to it. The paper's own
training hyperparameters were not available to us (docs/METHOD.md: only its
abstract and Table 2), so the values are the published defaults of each loss and
of the SimPO training recipe, and the SPO weight that worked in our CPU prototype.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator

import ml_collections

from spo_jax import objectives
from spo_jax.config import get_default_config

__all__ = ["ROOT", "data_root", "runs_root", "MODELS", "LOSSES", "LR_OVERRIDE", "SPO", "MESHES", "DATASETS",
           "STAGES_OF", "PAPER_TABLE2_METRICS", "PAPER_TABLE2_MODELS", "PAPER_TABLE2", "UF_ROWS",
           "GSM8K_TRAIN_ROWS", "BATCH", "SFT_EPOCHS", "GSM8K_PREF_STEPS", "GridError", "parse", "method_name",
           "grid", "get_config", "main"]

#: The checkout this package sits in (``$SPO_JAX_DATA`` defaults to ``../shared/data`` next to it).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def data_root() -> str:
    return os.environ.get("SPO_JAX_DATA") or os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


def runs_root() -> str:
    return os.environ.get("SPO_JAX_RUNS") or "runs"


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #

#: name -> Hub id, family (spo_jax.models model_type), and the settings that depend on size.
#: ``grad_accum``: micro-batches per step (128 pairs = 256 sequences of <= 2048 tokens do not
#: fit one step's activations on 8 GPUs at 8B; 4 x 32 pairs do, with remat).
#: ``pref_lr``: our choice inside the range of the SimPO repo's recipes (3e-7..1e-6, cosine,
#: warm-up 10%); 5e-7 at 8B is the DPO learning rate of the alignment-handbook / SimPO baselines.
MODELS = {
    "qwen2.5-0.5b": dict(hub="Qwen/Qwen2.5-0.5B", family="qwen2", remat=False, grad_accum=1, pref_lr=1e-6),
    "llama-3.2-1b": dict(hub="meta-llama/Llama-3.2-1B", family="llama", remat=False, grad_accum=1, pref_lr=1e-6),
    "llama-3-8b": dict(hub="meta-llama/Meta-Llama-3-8B", family="llama", remat=True, grad_accum=4, pref_lr=5e-7),
}

#: Each model's architecture, the fields of its Hub config.json that spo_jax.models reads: what
#: ``python -m spo_jax.plan`` builds the model's shapes from (``hf_config``), without weights or network.
HF_CONFIGS = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, use_sliding_window=False, hidden_act="silu",
                         bos_token_id=151643, eos_token_id=151643),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000, eos_token_id=128001,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
}

#: The paper's BT losses (names of spo_jax.losses) and their hyperparameters.
LOSSES = {
    # Rafailov et al. 2023; TRL DPOConfig default beta = 0.1.
    "dpo": dict(beta=0.1),
    # Xu et al. 2024 (CPO): beta 0.1 and NLL weight lambda = 1 (TRL CPOConfig beta=0.1, cpo_alpha=1.0).
    "cpo": dict(beta=0.1, lam=1.0),
    # Pal et al. 2024 (Smaug, DPO-Positive): lambda = 50 as in the paper; beta as DPO.
    "dpop": dict(beta=0.1, lam=50.0),
    # Park et al. 2024 (R-DPO): beta as DPO; alpha = spo_jax.losses' default 0.01 (a length
    # penalty per token; the right value depends on the length gap of the data -- tune it).
    "rdpo": dict(beta=0.1, alpha=0.01),
    # Meng et al. 2024 (SimPO): beta 2.0, gamma/beta 0.5 -> gamma 1.0, the Llama-3-8B-Base recipe
    # (princeton-nlp/SimPO training_configs/llama-3-8b-base-simpo.yaml).
    "simpo": dict(beta=2.0, gamma=1.0),
    # Wu et al. 2024 (alpha-DPO): the SimPO margin (beta 2.0, gamma 1.0, as above) with
    # alpha = 0.1, spo_jax.losses' default; margins standardised per batch.
    "alphadpo": dict(beta=2.0, gamma=1.0, alpha=0.1),
}

#: SimPO's recipe uses a slightly higher learning rate than DPO at 8B (6e-7, the yaml above).
LR_OVERRIDE = {("llama-3-8b", "simpo"): 6e-7, ("llama-3-8b", "alphadpo"): 6e-7}

#: SPO: the penalty solver with the reference value (q_i = a_ref(y_w) - a_theta(y_w)), weight 10,
#: slack 0, per sample. The paper's weight is not available to us; our CPU prototype
#: (docs/METHOD.md) kept accuracy at or above SFT with weights 5..20 and lost 9..12 points
#: with weight 1.
SPO = dict(solver="penalty", value="reference", gamma=10.0, epsilon=0.0, per_sample=True, squared=False)

#: Device meshes (axis sizes; -1 = the remaining devices). Every micro-batch holds a multiple of
#: 64 sequences, so it splits over 8, 16, 32 or 64 devices (larger slices: raise data.batch_size
#: or lower optim.grad_accum_steps).
MESHES = {
    # One GPU host (e.g. 8 x H100/A100 80 GB): FSDP over the host's GPUs (parameters, gradients
    # and AdamW state sharded 8 ways; the batch is split over the same axis), one process.
    "gpu": dict(data=1, fsdp=-1, tensor=1, coordinator=""),
    # A TPU pod slice (v4-32 = 16 chips / 4 hosts, v5e-32 / v5e-64, ...): FSDP over every chip of
    # the slice; one process per host, started with jax.distributed.initialize() ("auto").
    # Fits for qwen2.5-0.5b DPO+SPO at 128 x 512 on v5p-8 (4 chips, 52.8 GiB peak/chip) and v5p-32
    # (16 chips, 14.9 GiB), TPU compiler's estimate (benchmarks/RESULTS.md, plan_grid); other slices unchecked.
    "tpu": dict(data=1, fsdp=-1, tensor=1, coordinator="auto"),
    # Pure data parallelism over whatever devices there are (small models, CPU smoke runs).
    "local": dict(data=-1, fsdp=1, tensor=1, coordinator=""),
}

DATASETS = ("gsm8k", "ultrafeedback")
STAGES_OF = {"gsm8k": ("sft", "preference", "eval"), "ultrafeedback": ("preference",)}

#: What the paper reports: v2, Table 2, in %, per (model, method): ``alpacaeval2_wr`` (AlpacaEval 2
#: win rate against the GPT-4-Turbo reference, judged by GPT-4-Turbo), ``alpacaeval2_lc`` (its
#: length-controlled win rate) -- the preference objective, after training on UltraFeedback -- and
#: ``gsm8k`` (GSM8K test accuracy) -- the retained reasoning ability. The whole table, as given in
#: the paper. AlpacaEval 2 needs an API judge; this project measures preference quality offline
#: instead (held-out pair metrics on UltraFeedback's ``test_prefs``: reward accuracy, margins, log-probs).
PAPER_TABLE2_METRICS = ("alpacaeval2_wr", "alpacaeval2_lc", "gsm8k")
PAPER_TABLE2_MODELS = ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3-8b")
_TABLE2_ROWS = {  # method: (Qwen-2.5-0.5B, LLaMA-3.2-1B, LLaMA-3-8B), each WR / LC / GSM8K
    "sft": ((2.0, 2.1, 42.7), (3.5, 3.2, 49.8), (11.9, 11.2, 73.5)),
    "dpo": ((4.2, 4.6, 35.2), (3.9, 4.6, 49.6), (15.4, 14.6, 63.8)),
    "dpo+spo": ((4.4, 4.8, 43.2), (4.2, 4.9, 54.4), (16.0, 17.4, 76.5)),
    "cpo": ((2.3, 3.5, 33.5), (4.6, 3.7, 48.4), (16.9, 16.4, 73.2)),
    "cpo+spo": ((3.2, 3.7, 41.3), (4.6, 3.9, 49.9), (16.7, 17.1, 77.1)),
    "dpop": ((3.7, 4.2, 43.1), (3.4, 2.7, 53.6), (13.2, 12.7, 74.6)),
    "dpop+spo": ((3.6, 4.4, 44.1), (3.6, 3.2, 53.9), (13.0, 13.3, 77.2)),
    "rdpo": ((3.2, 3.8, 34.3), (3.6, 2.8, 42.2), (14.7, 13.7, 65.4)),
    "rdpo+spo": ((3.3, 3.9, 43.8), (4.0, 3.5, 55.0), (15.7, 17.4, 75.5)),
    "simpo": ((5.5, 4.1, 22.3), (6.4, 6.5, 26.9), (19.6, 21.8, 37.4)),
    "simpo+spo": ((6.5, 5.6, 43.9), (8.2, 7.5, 52.2), (22.6, 26.5, 76.0)),
    "alphadpo": ((4.5, 4.2, 34.7), (8.2, 8.6, 32.9), (20.4, 22.3, 33.5)),
    "alphadpo+spo": ((6.7, 6.0, 40.3), (9.0, 8.8, 42.3), (22.0, 26.6, 70.2)),
}
PAPER_TABLE2: dict[tuple[str, str], dict[str, float]] = {
    (model, method): dict(zip(PAPER_TABLE2_METRICS, cells))
    for method, by_model in _TABLE2_ROWS.items() for model, cells in zip(PAPER_TABLE2_MODELS, by_model)
}

UF_ROWS = 61135  # HuggingFaceH4/ultrafeedback_binarized train_prefs
GSM8K_TRAIN_ROWS = 7473
BATCH = 128  # pairs (or SFT examples) per optimizer step: the SimPO recipe's global batch
SFT_EPOCHS = 3  # our choice (GSM8K is small; the paper's SFT recipe is not available)
GSM8K_PREF_STEPS = 60  # ~1 epoch of <= 1 pair per train question (7473 / 128); set it to ceil(pairs / 128)


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #


class GridError(ValueError):
    """A bad ``--config=paper:<arg>`` argument; the message names the field and the fix."""


def parse(arg: str) -> dict:
    """``"model,loss,spo|nospo,dataset[,stage][,mesh]"`` -> dict(model, loss, spo, dataset, stage, mesh)."""
    usage = ("use --config=paper:MODEL,LOSS,spo|nospo,DATASET[,STAGE][,MESH] with MODEL in "
             f"{sorted(MODELS)}, LOSS in {sorted(LOSSES) + ['sft']}, DATASET in {list(DATASETS)}, "
             f"STAGE in ['sft', 'preference', 'eval'], MESH in {sorted(MESHES)}")
    if not isinstance(arg, str) or not arg.strip():
        raise GridError(f"empty grid argument; {usage}")
    fields = [f.strip().lower() for f in arg.split(",")]
    if len(fields) < 4 or len(fields) > 6:
        raise GridError(f"{arg!r} has {len(fields)} comma-separated fields, expected 4 to 6; {usage}")
    model, loss, spo, dataset, *rest = fields
    if model not in MODELS:
        raise GridError(f"model {model!r} (field 1 of {arg!r}) is not in the grid; use one of {sorted(MODELS)} "
                        "(any other checkpoint: pick the same family and pass --config.model.path)")
    if loss not in LOSSES and loss != "sft":
        raise GridError(f"loss {loss!r} (field 2 of {arg!r}) is not in the grid; use one of "
                        f"{sorted(LOSSES) + ['sft']}")
    if spo not in ("spo", "nospo"):
        raise GridError(f"field 3 of {arg!r} is {spo!r}; use 'spo' (wrap the loss in SPO) or 'nospo'")
    if dataset not in DATASETS:
        raise GridError(f"dataset {dataset!r} (field 4 of {arg!r}) is not in the grid; use one of {list(DATASETS)}")
    stage = mesh = None
    for f in rest:
        if f in ("sft", "preference", "eval") and stage is None:
            stage = f
        elif f in MESHES and mesh is None:
            mesh = f
        else:
            raise GridError(f"optional field {f!r} of {arg!r} is neither a stage ('sft', 'preference', 'eval') "
                            f"nor a mesh preset {sorted(MESHES)} (or it repeats one)")
    stage = stage or ("sft" if loss == "sft" else "preference")
    mesh = mesh or "gpu"
    if stage not in STAGES_OF[dataset]:
        raise GridError(f"stage {stage!r} is not part of the {dataset} pipeline (stages {STAGES_OF[dataset]}); "
                        "UltraFeedback starts from an SFT checkpoint given as --config.model.path")
    if loss == "sft" and stage == "preference":
        raise GridError(f"{arg!r}: 'sft' is the SFT model, not a preference loss; use stage sft or eval")
    if loss != "sft" and stage == "sft":
        raise GridError(f"{arg!r}: stage sft trains the SFT model; write LOSS=sft (e.g. {model},sft,nospo,{dataset})")
    if loss == "sft" and spo == "spo":
        raise GridError(f"{arg!r}: SPO wraps a preference loss; the SFT model takes 'nospo'")
    return dict(model=model, loss=loss, spo=spo == "spo", dataset=dataset, stage=stage, mesh=mesh)


def hf_config(arg: str = "qwen2.5-0.5b,dpo,spo,gsm8k") -> dict:
    """The HF config fields of the grid entry's model (``spo_jax.plan`` reads them: no weights needed)."""
    return dict(HF_CONFIGS[parse(arg)["model"]])


def method_name(loss: str, spo: bool) -> str:
    return loss + ("+spo" if spo else "")


def grid(stages=("sft", "preference", "eval"), datasets=DATASETS, models=tuple(MODELS)) -> Iterator[str]:
    """Every grid entry as a ``get_config`` argument, in pipeline order per model and dataset:
    SFT, its evaluation, the preference runs, their evaluations. ``grid(stages=("preference",))``
    is the paper's 3 models x 6 losses x {alone, +SPO} x 2 datasets = 72 training runs."""
    for model in models:
        for dataset in datasets:
            allowed = STAGES_OF[dataset]
            if dataset == "gsm8k":
                if "sft" in stages:
                    yield f"{model},sft,nospo,{dataset},sft"
                if "eval" in stages:
                    yield f"{model},sft,nospo,{dataset},eval"
            for stage in ("preference", "eval"):
                if stage not in stages or stage not in allowed:
                    continue
                for loss in LOSSES:
                    for spo in ("nospo", "spo"):
                        yield f"{model},{loss},{spo},{dataset},{stage}"


# --------------------------------------------------------------------------- #
# The config
# --------------------------------------------------------------------------- #


def get_config(arg: str = "qwen2.5-0.5b,dpo,spo,gsm8k") -> ml_collections.ConfigDict:
    p = parse(arg)
    m, model, dataset, stage = MODELS[p["model"]], p["model"], p["dataset"], p["stage"]
    method = method_name(p["loss"], p["spo"])
    runs, data = runs_root(), data_root()
    gsm8k_dir = os.path.join(data, "gsm8k")

    c = get_default_config()
    c.stage = stage
    c.seed = 0
    c.run_dir = os.path.join(runs, model, dataset, method) + ("/eval" if stage == "eval" else "")

    # model: bf16 compute, fp32 master weights (docs/ARCHITECTURE.md); remat at 8B
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = m["remat"]
    if dataset == "gsm8k" and stage == "sft":
        c.model.path = m["hub"]
    elif dataset == "gsm8k" and stage == "preference":
        c.model.path = os.path.join(runs, model, "gsm8k", "sft", "hf_final")  # the SFT model = the reference
    elif stage == "eval":
        c.model.path = os.path.join(runs, model, dataset, method, "hf_final")
    else:
        c.model.path = m["hub"]  # UltraFeedback: pass an SFT checkpoint with --config.model.path

    # loss / SPO / reference
    if p["loss"] == "sft" or stage == "eval":  # eval scores an exported model: NLL + accuracy, no loss
        c.loss.name = "sft"
        c.loss.hparams = ml_collections.ConfigDict()
    else:
        c.loss.name = p["loss"]
        c.loss.hparams = ml_collections.ConfigDict(dict(LOSSES[p["loss"]]))
    c.spo.enabled = p["spo"] and stage == "preference"
    if c.spo.enabled:
        for k, v in SPO.items():
            c.spo[k] = v
    c.reference.mode = "cached" if objectives.needs_reference(c) else "none"  # cached: one reference pass before training

    # data
    c.data.format = "auto"
    c.data.packing = False
    c.data.batch_size = BATCH
    c.data.eval_batch_size = 64
    if dataset == "gsm8k":
        # GSM8K train question + solution, tokenized with a digit-splitting BPE (SmolLM2's; Qwen2.5
        # splits digits too): 99th percentile 398 tokens, max 542; 5 of 7473 rows get truncated
        c.data.max_length = 512
        c.data.min_prompt_length = 64
        c.data.use_chat_template = False  # base models: "Question: {question}\nAnswer: {answer}"
        if stage == "sft":
            c.data.train_path = os.path.join(gsm8k_dir, "train.jsonl")
            c.data.train_split = "train"
        elif stage == "preference":
            c.data.train_path = os.path.join(runs, model, "gsm8k", "pairs.jsonl")
            c.data.train_split = "train"
        # greedy test accuracy: at the end of SFT, and in stage eval for every exported model (the
        # preference stage's held-out set would have to be pairs; it evaluates nothing itself)
        if stage in ("sft", "eval"):
            c.data.eval_path = os.path.join(gsm8k_dir, "test.jsonl")
            c.data.eval_split = "train"  # a jsonl file loads as one split named "train"
        c.eval.generation = stage in ("sft", "eval")
        c.eval.num_prompts = 1319  # the whole GSM8K test set, greedy
        c.eval.max_new_tokens = 512
        c.eval.temperature = 0.0
    else:
        # H4's rows hold the user turn inside chosen/rejected as well as in "prompt": the implicit
        # format takes the prompt from their shared leading messages ("auto" would pick
        # "preference" and render the user turn twice).
        c.data.format = "implicit_preference"
        c.data.train_path = "HuggingFaceH4/ultrafeedback_binarized"
        c.data.train_split = "train_prefs"
        c.data.eval_path = "HuggingFaceH4/ultrafeedback_binarized"
        c.data.eval_split = "test_prefs"
        c.data.max_length = 2048  # SimPO recipe: max_length 2048, prompts up to 1800 tokens
        c.data.min_prompt_length = 256
        c.data.use_chat_template = True  # conversational rows; base Llama-3: --config.model.tokenizer=<an instruct tokenizer>
        c.eval.generation = False  # held-out pair metrics (reward accuracy, margins) on test_prefs
    c.eval.every = 0  # evaluate once, at the end
    c.eval.num_batches = 0

    # optimizer: AdamW, cosine, 10% warm-up, no weight decay, clip 1.0 (SimPO / alignment-handbook recipe)
    c.optim.schedule = "cosine"
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0
    c.optim.min_lr_ratio = 0.0
    # SFT sequences are single (not pairs): half the accumulation keeps 64 sequences per micro-batch
    c.optim.grad_accum_steps = max(1, m["grad_accum"] // 2) if stage == "sft" else m["grad_accum"]
    if stage == "sft":
        c.optim.learning_rate = 2e-5  # SimPO repo's llama-3-8b-base-sft.yaml
        c.train.num_steps = math.ceil(SFT_EPOCHS * GSM8K_TRAIN_ROWS / BATCH)
    else:
        c.optim.learning_rate = LR_OVERRIDE.get((model, p["loss"]), m["pref_lr"])
        c.train.num_steps = GSM8K_PREF_STEPS if dataset == "gsm8k" else math.ceil(UF_ROWS / BATCH)  # 1 epoch
    # warm-up = 10% of the steps, following --config.train.num_steps overrides
    c.optim.warmup_steps = c.train.get_ref("num_steps") // 10

    # log-probs: chunk the 128K/152K vocabularies so no [B, T, V] array is formed
    c.logprobs.seq_chunk = 256
    c.logprobs.vocab_chunk = 16384

    # mesh
    mesh = MESHES[p["mesh"]]
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh["data"], mesh["fsdp"], mesh["tensor"]
    c.distributed.coordinator_address = mesh["coordinator"]

    c.checkpoint.every = 100
    c.checkpoint.keep = 2
    c.checkpoint.export_hf = stage != "eval"
    c.checkpoint.resume = stage != "eval"  # eval scores model.path (the run's hf_final), not a checkpoint
    c.metrics.log_every = 1
    return c


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="The SPO paper's grid: print its get_config arguments.")
    ap.add_argument("--list", action="store_true", help="print every grid entry, one per line")
    ap.add_argument("--stage", action="append", choices=("sft", "preference", "eval"),
                    help="only these stages (repeatable)")
    ap.add_argument("--dataset", action="append", choices=DATASETS, help="only these datasets (repeatable)")
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="only these models (repeatable)")
    ap.add_argument("--mesh", choices=sorted(MESHES), help="append this mesh preset to each entry")
    args = ap.parse_args(argv)
    entries = grid(stages=tuple(args.stage or ("sft", "preference", "eval")),
                   datasets=tuple(args.dataset or DATASETS), models=tuple(args.model or MODELS))
    for e in entries:
        print(e + (f",{args.mesh}" if args.mesh else ""))


if __name__ == "__main__":
    main()
