"""Pretrain the text demo's tiny causal language model and write it to lorafair/assets/demo_text_lm/.

A 3-layer LLaMA-style model (width 64) with a character-level tokenizer (printable ASCII and newline), trained on
questions answered as the demo's clients answer them (lorafair.data.arithmetic.pretraining_text, the text tests
check): bare sums and differences over the whole range, and the five worded kinds of the clients only where the
answer is below 40, so that carrying each wording over to larger answers is left to federated LoRA.
About 17 minutes of one CPU core on a 2-core machine shared with other jobs; seeded, so a rebuild gives the same
weights on one platform.

    python scripts/build_demo_text_lm.py [--steps 6000] [--out lorafair/assets/demo_text_lm]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorafair.data.arithmetic import pretraining_text

SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; decoding joins them back without spaces."""
    vocab = {token: i for i, token in enumerate([*SPECIAL.values(), *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL, padding_side="right")
    fast.add_bos_token = True
    return fast


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def batches(tokenizer: PreTrainedTokenizerFast, lines: list[str], batch_size: int, generator: torch.Generator):
    """Endless shuffled batches of <s>line</s>, right-padded, with the padding left out of the loss. Lines of
    similar length share a batch (sorted within windows of 50 batches), so short equations pad little."""
    encoded = [[tokenizer.bos_token_id, *tokenizer.encode(line, add_special_tokens=False), tokenizer.eos_token_id]
               for line in lines]
    window = 50 * batch_size
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order) - window + 1, window):
            by_length = sorted(order[start:start + window], key=lambda i: len(encoded[i]))
            for group in torch.randperm(50, generator=generator).tolist():
                chosen = [encoded[i] for i in by_length[group * batch_size:(group + 1) * batch_size]]
                width = max(map(len, chosen))
                ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in chosen])
                labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
                yield ids, (ids != tokenizer.pad_token_id).long(), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("lorafair/assets/demo_text_lm"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.05)
    stream = batches(tokenizer, pretraining_text(), args.batch_size, torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, mask, labels = next(stream)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    size = sum(path.stat().st_size for path in args.out.iterdir()) / 1e6
    print(f"wrote {args.out} ({size:.1f} MB)")


if __name__ == "__main__":
    main()
