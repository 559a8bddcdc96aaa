"""Tiny Hugging Face models built locally, for tests and smoke runs.

They are standard `transformers` models (Qwen2 unless another architecture is asked for) with a
byte-level BPE tokenizer trained on the spot and a ChatML chat template (plain, or Qwen3-style
with thinking), saved with `save_pretrained` so they load through exactly the code path a user's
model takes. Their weights are random.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML, written for this project.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ChatML with a reasoning block: with thinking off, an empty <think></think> block is prefilled.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

_CORPUS = [
    "Solve the problem step by step and put your final answer in \\boxed{}.",
    "Let x = 3. Then 2x + 1 = 7, so the answer is \\boxed{7}.",
    "We compute 12 * 4 = 48 and 48 / 6 = 8. Hence \\boxed{8}.",
    "The sum of the roots of x^{2} - 5x + 6 = 0 is 5 and the product is 6.",
    "Expert solution (hidden from the reader): factor the quadratic, then add the roots.",
    "The final answer is 42. Intermediate results used in the solution might include: 3, 7, x+1.",
    "Below is a correct solution written by an expert. Work out the problem yourself.",
    "Therefore \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}, and 0.5 is one half.",
]


def build_tokenizer(thinking: bool = False, vocab_size: int = 512):
    """A byte-level BPE tokenizer with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=THINKING_TEMPLATE if thinking else CHATML_TEMPLATE,
    )


# Tiny random models of the architectures dail is tested on: the `transformers` model type and
# what differs from the shared sizes. "WINDOW" stands for the `window` argument of
# `build_tiny_model`; where a layer type list is given, the first layer slides and the second
# attends to everything. Logit transforms are set far from neutral, so that a loss that skipped
# them would see other logits.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "qwen2": ("qwen2", {}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": "WINDOW", "max_window_layers": 1}),
    "llama": ("llama", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}),
    "mistral": ("mistral", {"sliding_window": "WINDOW"}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"sliding_window": "WINDOW", "final_logit_softcapping": 2.0,
                          "layer_types": ["sliding_attention", "full_attention"]}),
    "gemma3": ("gemma3_text", {"sliding_window": "WINDOW", "final_logit_softcapping": 2.0,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {"logits_scaling": 4.0}),
    "gpt-neox": ("gpt_neox", {}),
    "smollm3": ("smollm3", {}),
    "cohere": ("cohere", {"logit_scale": 0.25}),
}


def build_tiny_model(out_dir: str | Path, *, thinking: bool = False, seed: int = 0,
                     hidden_size: int = 64, layers: int = 2, architecture: str = "qwen2",
                     window: int = 4096, vocab_size: int = 512) -> Path:
    """Save a random tiny model and its tokenizer to `out_dir`; return the path.

    Args:
        architecture: A key of `ARCHITECTURES` (default a Qwen2 model).
        window: The sliding window of the architectures that have one (in tokens).
        vocab_size: The tokenizer's vocabulary (another size gives other token ids).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(thinking=thinking, vocab_size=vocab_size)
    model_type, specific = ARCHITECTURES[architecture]
    heads = 4
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
        head_dim=hidden_size // heads, max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        **{key: window if value == "WINDOW" else value for key, value in specific.items()})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random logits that are not all alike, so proposals and fallbacks both occur.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# (numerator, denominator) of a trace's share in each rate the two backends are compared on:
# accepted proposals, privileged tokens, length (tokens per trace).
TRACE_STATISTICS = {
    "acceptance": lambda t: (t.sources.count("S"), sum(p is not None for p in t.proposal_ids)),
    "privileged share": lambda t: (t.sources.count("P"), len(t.sources)),
    "length": lambda t: (len(t.token_ids), 1),
}


def champ_problems_file(path: str | Path, ids: tuple[str, ...]) -> Path:
    """A JSONL problems file of these CHAMP problems (`dail[champ]`), in this order."""
    import json

    from dail.data import load_champ

    problems = {p.id: p for p in load_champ()}
    path = Path(path)
    path.write_text("".join(json.dumps({"id": i, "problem": problems[i].problem, "solution": problems[i].solution,
                                        "answer": problems[i].answer}) + "\n" for i in ids))
    return path


def random_lora_adapter(model, folder: str | Path, *, r: int, alpha: int, seed: int = 0) -> Path:
    """A PEFT LoRA adapter on every projection of `model` with random, non-zero B (a fresh one
    would change nothing), saved to `folder`; `model` is left as it was."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    peft_model.save_pretrained(folder)
    peft_model.unload()
    return Path(folder)
