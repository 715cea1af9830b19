"""A tiny random Llama with a real (small) byte-level BPE tokenizer, built in seconds.

Used by unit tests and quick benchmarks in place of a real model: same code paths, no downloads.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
    "Adapters are small low-rank updates to a large base model.",
    "0123456789 +-*/=()[]{}<>.,;:!?'\"",
]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few sentences, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    arch: str = "llama",
) -> Path:
    """Write a random Llama-family model (fp32 safetensors) and its tokenizer to ``out_dir``.

    ``arch`` is ``llama``, ``mistral`` or ``qwen2`` (same layout; Qwen2 adds q/k/v biases).
    """
    import torch
    import transformers

    classes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
    config_cls = getattr(transformers, f"{classes[arch]}Config")
    model_cls = getattr(transformers, f"{classes[arch]}ForCausalLM")
    tokenizer = build_tiny_tokenizer()
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # larger weights than the default init so that outputs differ per token
        for name, param in model.named_parameters():
            if param.dim() == 2 or name.endswith("proj.bias"):
                param.normal_(0.0, 0.2)
    config.name_or_path = f"tiny-{arch}"
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 1,
    scale: float = 0.1,
) -> Path:
    """Save a random (non-zero B) LoRA adapter for ``base_dir`` with plain PEFT ``save_pretrained``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules), use_rslora=use_rslora, lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
