"""Tiny Hugging Face models built from config objects: nothing is downloaded."""
import torch

# The suite's one tiny LLaMA, as the config dict PrunableLM builds from (``model=dict(TINY_LLAMA)``, with
# ``vocab_size=128``) and as a model (:func:`tiny_llama`, which can vary its sizes).
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}


def tiny_llama(layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers)
    return LlamaForCausalLM(LlamaConfig(**config))


def tiny_gpt2(layers: int = 2, hidden: int = 32, vocab: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config)


def tiny_bert(layers: int = 2, hidden: int = 32, intermediate: int = 64, vocab: int = 128, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertModel(config)
