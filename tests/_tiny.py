"""Small stand-ins shared by the strategy tests: a tiny random Llama and a tokenizer
that decodes ids as digits (no vocabulary files, nothing downloaded)."""

import torch


class DigitTokenizer:
    """Decodes ids as space-separated numbers; no EOS, no chat template."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def tiny_llama96():
    """A 2-layer Llama with a 96-token vocabulary and GQA (4 heads, 2 KV heads), eval mode."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config).eval()
