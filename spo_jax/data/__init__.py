"""Data: datasets -> tokenized rows -> padded / packed Contract-1 batches."""

from spo_jax.data.batching import (BATCH_KEYS, BatchIterator, TokenizedExamples, bucket_length, bucket_scored,
                                   score_index)
from spo_jax.data.loading import FORMATS, DataError, detect_format, extract_prompt, load_rows, render_chat, standardize
from spo_jax.data.tokenize import prepare_dataset, tokenize_dataset
from spo_jax.data import gsm8k, synthetic
from spo_jax.data.gsm8k import accuracy, build_preference_pairs, extract_answer, is_correct

__all__ = ["BATCH_KEYS", "BatchIterator", "TokenizedExamples", "bucket_length", "bucket_scored", "score_index", "FORMATS",
           "DataError", "detect_format", "extract_prompt", "load_rows", "render_chat", "standardize", "prepare_dataset",
           "tokenize_dataset", "gsm8k", "synthetic", "accuracy", "build_preference_pairs", "extract_answer", "is_correct"]
