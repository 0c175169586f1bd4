"""Files beside the weights (config, tokenizer, sentence-transformers modules) copied into
the output: which ones, from which model, and how ``config.json`` follows the vocabulary rule."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from streammerge.errors import MergeError
from streammerge.output import OutputDir
from streammerge.plan import Plan
from streammerge.reader import INDEX_FILE, ModelDir

#: Files never copied from the base: weights in any format, and our own record.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".pkl",
)
SKIP_NAMES = {INDEX_FILE, "pytorch_model.bin.index.json", "streammerge.json", "README.md"}
TOKENIZER_PREFIXES = (
    "tokenizer",
    "special_tokens_map",
    "added_tokens",
    "vocab.",
    "merges.txt",
    "spiece",
    "sentencepiece",
)
#: Largest non-weight file copied (bytes).
MAX_COPY_BYTES = 256 * 2**20


def copy_side_files(
    output: OutputDir,
    plan: Plan,
    base: ModelDir,
    models: Sequence[ModelDir],
    tokenizer_model: int | None = None,
) -> None:
    """Copy config, tokenizer and module configs (sentence-transformers) from the base.

    Tokenizer files come from fine-tune ``tokenizer_model`` when given (a recipe's
    ``tokenizer_source``), else, with the vocabulary rule in force, from the fine-tune with
    the most rows; ``config.json``'s ``vocab_size`` follows the output rows. The base's own
    README.md is not copied (the output gets its model card).
    """
    tok = tokenizer_model if tokenizer_model is not None else plan.tokenizer_model
    tok_dir = models[tok].path if tok is not None else None

    def files(root: Path):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                p = Path(dirpath) / f
                rel = p.relative_to(root)
                if (
                    f.startswith(".")
                    or f in SKIP_NAMES
                    or f.endswith(WEIGHT_SUFFIXES)
                    or f.endswith(".tmp")
                ):
                    continue
                if p.is_file() and p.stat().st_size <= MAX_COPY_BYTES:
                    yield rel, p

    is_tok = lambda rel: len(rel.parts) == 1 and rel.name.startswith(TOKENIZER_PREFIXES)
    for rel, p in files(base.path):
        if tok_dir is not None and is_tok(rel):
            continue
        if rel.as_posix() == "config.json" and plan.vocab_rows is not None:
            try:
                cfg = json.loads(p.read_text("utf-8"))
            except (OSError, ValueError) as e:
                raise MergeError(
                    f"cannot read config ({e})", p, None, "fix the base's config.json"
                ) from e
            if "vocab_size" in cfg:
                cfg["vocab_size"] = plan.vocab_rows
            output.write_file(
                "config.json", (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()
            )
            continue
        output.copy_file(p, rel.as_posix())
    if tok_dir is not None:
        for rel, p in files(tok_dir):
            if is_tok(rel):
                output.copy_file(p, rel.as_posix())
