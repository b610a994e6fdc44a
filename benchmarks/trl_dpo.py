"""TRL's DPOTrainer (PyTorch; CPU, or the GPU when there is one) on the benchmark's small Llama:
tokens/s and peak memory.

One process, one measurement: `python benchmarks/trl_dpo.py --steps 7 --warmup 2`.
Prints a JSON line with per-step times (after warm-up), tokens per step and the
process's peak RSS. `benchmarks/throughput.py` runs it (and spo_jax's side) in
fresh processes and writes the table. Needs `pip install -r benchmarks/requirements.txt`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

from common import BOS_ID, EOS_ID, LLAMA_CONFIG, PAD_ID, VOCAB, add_shape_args, make_pairs, peak_rss_mib, real_tokens


def word_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel tokenizer where the word ``w<i>`` is token id i (specials at 0, 1, 2)."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["<pad>"], vocab["</s>"], vocab["<s>"] = PAD_ID, EOS_ID, BOS_ID
    del vocab[f"w{PAD_ID}"], vocab[f"w{EOS_ID}"], vocab[f"w{BOS_ID}"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")


def as_text(ids: list[int], lead_space: bool) -> str:
    words = ["</s>" if i == EOS_ID else f"w{i}" for i in ids]
    return (" " if lead_space else "") + " ".join(words)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.cpu, self._t, self._c = [], [], None, None

    def on_step_begin(self, args, state, control, **kw):
        self._t, self._c = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)
        self.cpu.append(time.process_time() - self._c)  # CPU seconds of all threads


def main() -> None:
    from trl import DPOConfig, DPOTrainer

    p = argparse.ArgumentParser()
    add_shape_args(p)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--precompute-ref", action="store_true",
                   help="precompute_ref_log_probs=True: the reference log-probs in one pass before training")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    rows = make_pairs(a.pairs_per_step * a.steps, a.prompt_len, a.response_len, seed=0)
    # EOS is appended by TRL itself: give it the responses without their final EOS.
    data = Dataset.from_list([dict(prompt=as_text(r["prompt"], False),
                                   chosen=as_text(r["chosen"][:-1], True),
                                   rejected=as_text(r["rejected"][:-1], True)) for r in rows])
    cfg = {k: v for k, v in LLAMA_CONFIG.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    tok = word_tokenizer()
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, per_device_train_batch_size=a.pairs_per_step,
                         max_steps=a.steps, learning_rate=1e-5, beta=0.1, use_cpu=not torch.cuda.is_available(),
                         report_to=[], logging_steps=10_000, save_strategy="no",
                         max_length=a.prompt_len + a.response_len, dataloader_num_workers=0,
                         seed=0, data_seed=0, gradient_checkpointing=False,
                         precompute_ref_log_probs=a.precompute_ref)
        timer = StepTimer()
        # An explicit frozen copy as the reference (online: its forward runs in every step; with
        # --precompute-ref TRL runs it once over the data before the first step).
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=data, processing_class=tok, callbacks=[timer])
        trainer.train()
    step_tokens = real_tokens(rows[: a.pairs_per_step])
    times = timer.times[a.warmup:]
    print(json.dumps(dict(side="trl", step_times=times, cpu_times=timer.cpu[a.warmup:], tokens_per_step=step_tokens,
                          peak_rss_mib=peak_rss_mib(), torch=torch.__version__,
                          peak_device_mib=(torch.cuda.max_memory_allocated() / 2**20
                                           if torch.cuda.is_available() else None),
                          threads=a.threads, precompute_ref=a.precompute_ref)))


if __name__ == "__main__":
    main()
