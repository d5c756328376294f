"""Pretrain the tiny Qwen2-MoE model bundled in `flexmoe/assets/tiny`, reproducibly from a seed.

Builds the multi-domain corpus (`scripts/corpus.py`), trains a byte-level BPE tokenizer on the
train split, pretrains a small Qwen2-MoE with balanced domain sampling and the router aux loss,
writes a held-out text sample per domain to `assets/heldout/`, and records held-out perplexity
(trained vs untrained) and per-domain expert usage in `pretrain_report.json`.

    python scripts/pretrain_tiny.py --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from corpus import DOMAINS, DomainSplit, load_corpus
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig

ASSETS = Path(__file__).resolve().parents[1] / "src" / "flexmoe" / "assets"
EOS = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    """Parse command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSETS / "tiny")
    p.add_argument("--heldout-dir", type=Path, default=ASSETS / "heldout")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=0, help="step budget instead of --minutes (if > 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--max-chars", type=int, default=3_000_000, help="train chars per domain")
    p.add_argument("--heldout-chars", type=int, default=16_000, help="shipped sample per domain")
    p.add_argument("--eval-tokens", type=int, default=32_768, help="held-out tokens per domain")
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args()


def log(msg: str) -> None:
    """Print a timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train_text(split: DomainSplit, max_chars: int, seed: int) -> list[str]:
    """Take a seeded random subset of train documents up to max_chars."""
    docs = list(split.train)
    random.Random(seed).shuffle(docs)
    out, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def train_tokenizer(texts: dict[str, list[str]], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample = [doc for docs in texts.values() for doc in docs[: len(docs) // 2]]
    tok.train_from_iterator(sample, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=EOS, model_max_length=256
    )


def encode(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """Encode documents into one token stream with EOS between documents."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def heldout_sample(split: DomainSplit, chars: int) -> str:
    """Concatenate held-out documents (in order) up to about `chars` characters."""
    out: list[str] = []
    for doc in split.heldout:
        if sum(map(len, out)) >= chars:
            break
        out.append(doc)
    return "\n\n".join(out)[: chars + 2000]


def make_config(vocab_size: int, seq_len: int, aux_coef: float) -> Qwen2MoeConfig:
    """Return the tiny Qwen2-MoE configuration."""
    return Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        shared_expert_intermediate_size=512,
        decoder_sparse_step=1,
        norm_topk_prob=False,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=aux_coef,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def sample_batch(
    streams: list[torch.Tensor], step: int, batch: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
    """Draw a batch with domains in balanced rotation and random offsets."""
    rows = []
    for i in range(batch):
        stream = streams[(step * batch + i) % len(streams)]
        start = int(torch.randint(0, len(stream) - seq_len - 1, (1,), generator=gen))
        rows.append(stream[start : start + seq_len])
    return torch.stack(rows)


def lr_at(step: int, progress: float, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of peak as progress -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def progress_of(step: int, elapsed: float, args: argparse.Namespace) -> float:
    """Fraction of the training budget used: by steps if --steps is set, else by wall clock."""
    return step / args.steps if args.steps > 0 else elapsed / (args.minutes * 60)


@torch.no_grad()
def evaluate(model: torch.nn.Module, ids: torch.Tensor, seq_len: int) -> tuple[float, torch.Tensor]:
    """Return perplexity and per-layer top-k expert assignment counts on a token stream."""
    model.eval()
    n = (len(ids) - 1) // seq_len
    rows = ids[: n * seq_len].view(n, seq_len)
    nll, count, usage = 0.0, 0, None
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    for chunk in rows.split(16):
        out = model(input_ids=chunk, labels=chunk, output_router_logits=True)
        tokens = chunk.numel() - chunk.shape[0]
        nll += float(out.loss - model.config.router_aux_loss_coef * out.aux_loss) * tokens
        count += tokens
        per_layer = [
            torch.bincount(logits.topk(k, dim=-1).indices.flatten(), minlength=experts)
            for logits in out.router_logits
        ]
        usage = torch.stack(per_layer) if usage is None else usage + torch.stack(per_layer)
    model.train()
    return math.exp(nll / count), usage.float()


def specialisation(usage: dict[str, torch.Tensor]) -> dict:
    """Summarise per-domain routing: fractions, entropy vs uniform, TV distance to the mean."""
    frac = {d: u / u.sum(dim=-1, keepdim=True) for d, u in usage.items()}
    mean = torch.stack(list(frac.values())).mean(0)
    experts = mean.shape[-1]
    out = {"uniform_entropy_nats": math.log(experts), "domains": {}}
    for d, f in frac.items():
        ent = -(f * f.clamp_min(1e-12).log()).sum(-1)
        tv = 0.5 * (f - mean).abs().sum(-1)
        out["domains"][d] = {
            "usage_per_layer": [[round(x, 4) for x in row] for row in f.tolist()],
            "entropy_per_layer": [round(x, 4) for x in ent.tolist()],
            "tv_to_mean_per_layer": [round(x, 4) for x in tv.tolist()],
            "mean_tv_to_mean": round(float(tv.mean()), 4),
        }
    out["mean_tv_over_domains_and_layers"] = round(
        sum(v["mean_tv_to_mean"] for v in out["domains"].values()) / len(frac), 4
    )
    return out


def eval_all(
    model: torch.nn.Module, eval_ids: dict[str, torch.Tensor], seq_len: int
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Evaluate perplexity and expert usage for every domain."""
    ppl, usage = {}, {}
    for d, ids in eval_ids.items():
        ppl[d], usage[d] = evaluate(model, ids, seq_len)
        ppl[d] = round(ppl[d], 3)
    return ppl, usage


def main() -> None:
    """Build corpus and tokenizer, pretrain, save the model and write the report."""
    args = parse_args()
    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    corpus = load_corpus(DOMAINS, seed=args.seed)
    texts = {d: train_text(s, args.max_chars, args.seed) for d, s in corpus.items()}
    log(f"corpus ready: { {d: sum(map(len, t)) for d, t in texts.items()} } chars")
    tokenizer = train_tokenizer(texts, args.vocab_size)
    streams = [encode(tokenizer, texts[d]) for d in DOMAINS]
    log(f"tokenized: { {d: len(s) for d, s in zip(DOMAINS, streams, strict=True)} } tokens")
    args.heldout_dir.mkdir(parents=True, exist_ok=True)
    samples = {d: heldout_sample(s, args.heldout_chars) for d, s in corpus.items()}
    for d, text in samples.items():
        (args.heldout_dir / f"{d}.txt").write_text(text, "utf-8")
    eval_ids = {d: encode(tokenizer, s.heldout)[: args.eval_tokens + 1] for d, s in corpus.items()}
    sample_ids = {d: encode(tokenizer, [t]) for d, t in samples.items()}

    config = make_config(len(tokenizer), args.seq_len, args.aux_coef)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    untrained = copy.deepcopy(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start, tokens, step = time.time(), 0, 0
    while (progress := progress_of(step, time.time() - start, args)) < 1.0:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, args.warmup, args.lr)
        batch = sample_batch(streams, step, args.batch_size, args.seq_len, gen)
        out = model(input_ids=batch, labels=batch, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch.numel()
        if step % args.log_every == 0 or step == 1:
            rate = tokens / (time.time() - start)
            log(
                f"step {step} loss {out.loss.item():.4f} aux {out.aux_loss.item():.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} tokens {tokens:,} {rate:,.0f} tok/s"
            )
    train_seconds = time.time() - start
    log(f"training done: {step} steps, {tokens:,} tokens, {train_seconds:.0f} s")

    ppl, usage = eval_all(model, eval_ids, args.seq_len)
    ppl_untrained, usage_untrained = eval_all(untrained, eval_ids, args.seq_len)
    ppl_sample, _ = eval_all(model, sample_ids, args.seq_len)
    ppl_sample_untrained, _ = eval_all(untrained, sample_ids, args.seq_len)
    log(f"held-out ppl trained {ppl} untrained {ppl_untrained}")

    model.config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    report = {
        "command": " ".join(["python", "scripts/pretrain_tiny.py", *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seed": args.seed,
        "config": model.config.to_dict(),
        "parameters": n_params,
        "domains": list(DOMAINS),
        "train_tokens_per_domain": {d: len(s) for d, s in zip(DOMAINS, streams, strict=True)},
        "steps": step,
        "tokens_seen": tokens,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "heldout_eval_tokens": {d: len(v) - 1 for d, v in eval_ids.items()},
        "heldout_ppl": {"trained": ppl, "untrained": ppl_untrained},
        "heldout_sample_ppl": {"trained": ppl_sample, "untrained": ppl_sample_untrained},
        "expert_usage": specialisation(usage),
        "expert_usage_untrained": specialisation(usage_untrained),
    }
    report["config"].pop("transformers_version", None)
    (args.out / "pretrain_report.json").write_text(json.dumps(report, indent=1), "utf-8")
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
