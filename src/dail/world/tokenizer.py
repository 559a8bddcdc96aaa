"""A small byte-level BPE tokenizer for the world, with a ChatML chat template.

Pre-tokenization keeps every digit, operator and label (`c11`, `w2`) a single piece (digits and
operators with an optional leading space); BPE trained on world text to convergence makes each piece one token.
The fixed instruction sentences of the three roles' prompts are added as whole tokens, so a
prompt costs a few tokens beyond the problem and the reference. Byte-level encoding makes any
text round-trip exactly.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dail.rollout import prompts
from dail.world import generator as gen

logger = logging.getLogger(__name__)

BOS_LIKE = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS_LIKE, IM_START, IM_END)

# Qwen2.5-style ChatML, without a default system message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# One piece: a word or label (letters then digits), one digit, one other symbol, or whitespace.
# Digits and symbols may carry one leading space; words and labels never do, so a label is the
# same token at a line start, in a list and in a sentence (a model copies it from one to the
# other without first learning that ` c11` and `c11` are the same). The vocabulary was learned
# with words that took their leading space (`_TRAIN_PIECE`); those merged tokens go unused.
_PIECE = r"[A-Za-z]+[0-9]*| ?[0-9]| ?[^\sA-Za-z0-9]|\n+| +|\s+"
_TRAIN_PIECE = r" ?[A-Za-z]+[0-9]*| ?[0-9]| ?[^\sA-Za-z0-9]|\n+| +|\s+"


def _pre_tokenizer(piece: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(piece), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def template_phrases() -> list[str]:
    """Fixed sentences of the default prompt templates, each to become one token."""
    phrases = []
    for template in (prompts.STUDENT_TEMPLATE, prompts.PRIVILEGED_TEMPLATE):
        template = template.replace("{instruction}", prompts.ANSWER_INSTRUCTION)  # world problems have answers
        for line in template.split("\n"):
            line = line.strip()
            if line and "{" not in line.replace("\\boxed{}", ""):
                phrases.append(line)
    phrases += ["The final answer is", "Intermediate results used in the solution might include:"]
    return list(dict.fromkeys(phrases))


def corpus(n: int = 3000, seed: int = 0) -> Iterator[str]:
    """World text for training BPE: statements, both solution styles, every label, chat words."""
    rng = random.Random(seed)
    kinds = (*gen.ALL_TYPES, "generic")
    for i in range(n):
        spec = gen.spec_of(kinds[i % len(kinds)], rng)
        yield spec.statement
        yield spec.didactic()
        yield spec.detailed()
    for _ in range(20):  # every label, in both positions (line start and after a space)
        yield "\n".join(f"{label} = 1, {label}" for label in gen.ALL_LABELS)
    for _ in range(20):  # chat-template words and blank lines
        yield "user\nassistant\nsystem\n\nx\n\n\nx\n\n\n\n"
    yield " ".join(gen.WORDS)


def build_tokenizer(vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """Train the BPE on world text and wrap it for `transformers`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(_TRAIN_PIECE)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.pre_tokenizer = _pre_tokenizer(_PIECE)
    tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in template_phrases()])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=BOS_LIKE, unk_token=None,
        bos_token=None, clean_up_tokenization_spaces=False, model_max_length=2048)
    wrapped.chat_template = CHAT_TEMPLATE
    logger.info("tokenizer: %d tokens", len(wrapped))
    return wrapped


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The world tokenizer saved in `directory`, exactly as saved.

    transformers 5's AutoTokenizer maps model_type qwen2 to Qwen2Tokenizer, which replaces this
    tokenizer's pre-tokenizer (digits and labels split apart); tokenizer.json is loaded as is.
    """
    return PreTrainedTokenizerFast.from_pretrained(directory)
