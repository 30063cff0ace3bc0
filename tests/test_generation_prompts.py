"""Prompts as a string or chat messages (generation/prompts.py), in the strategies and the
wrapper: a tiny word-level tokenizer with a chat template; the real model for the wrapper."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from creative_sparse.generation.prompts import check_prompt, prompt_ids, prompt_text  # noqa: E402
from creative_sparse.generation.strategies import Fixed  # noqa: E402

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "the sea"},
        {"role": "assistant", "content": "is blue"},
        {"role": "user", "content": "and deep"}]


def _tokenizer(template=TEMPLATE):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<unk> </s> <system> <user> <assistant> the sea is blue and deep be brief"
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words.split())},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                               eos_token="</s>")
    tok.chat_template = template
    return tok


def _words(tok, ids):
    return tok.convert_ids_to_tokens(ids[0].tolist())


def test_a_string_is_one_user_turn_and_messages_keep_their_roles():
    tok = _tokenizer()
    assert _words(tok, prompt_ids(tok, "the sea")) == \
        "<user> the sea </s> <assistant>".split()
    assert _words(tok, prompt_ids(tok, CHAT)) == (
        "<system> be brief </s> <user> the sea </s> <assistant> is blue </s> <user> and deep "
        "</s> <assistant>").split()


def test_without_a_chat_template_strings_are_raw_and_messages_refused():
    tok = _tokenizer(template=None)
    assert _words(tok, prompt_ids(tok, "the sea")) == ["the", "sea"]
    with pytest.raises(ValueError, match="has no chat template, so chat messages cannot be "
                                         "rendered; pass the prompt as a string"):
        prompt_ids(tok, CHAT)


def test_quality_reads_the_user_turns():
    assert prompt_text(CHAT) == "the sea\nand deep"
    assert prompt_text("the sea") == "the sea"


@pytest.mark.parametrize("prompt, match", [
    ("", "prompt must be a non-empty string"),
    (None, "prompt must be a non-empty string or a non-empty list of chat messages"),
    ([], "prompt must be a non-empty string or a non-empty list of chat messages"),
    ({"role": "user", "content": "hi"}, "non-empty list of chat messages"),
    (["hi"], "chat message 0 must be a dict with exactly the keys 'role' and 'content'"),
    ([{"role": "user", "content": "hi", "name": "x"}], "exactly the keys 'role' and 'content'"),
    ([{"role": "tool", "content": "hi"}], "chat message 0 has role 'tool'; allowed: system, "
                                          "user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
      {"role": "user", "content": "hi"}], "chat message 1 is a system message; only the "
                                          "first message may be one"),
    ([{"role": "user", "content": "  "}], r"chat message 0 \(user\) must have a non-empty "
                                          "string content"),
    ([{"role": "user", "content": 3}], "must have a non-empty string content, got 3"),
    ([{"role": "user", "content": "\ud800"}], "chat message 0 content is not valid Unicode"),
    ([{"role": "system", "content": "be brief"}], "the chat must end with a user message"),
], ids=["empty", "none", "empty-list", "one-dict", "not-a-dict", "extra-key", "bad-role",
        "late-system", "blank", "not-text", "surrogate", "no-user"])
def test_bad_prompts_say_what_is_allowed(prompt, match):
    with pytest.raises(ValueError, match=match):
        check_prompt(prompt)


def test_strategies_take_chat_messages():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    tok = _tokenizer()
    run = lambda prompt: Fixed(0.5).generate(model, tok, prompt, num_candidates=2,  # noqa: E731
                                             max_new_tokens=4, seed=1)
    chat, ids = run(CHAT), run(prompt_ids(tok, CHAT))
    assert chat.texts == ids.texts and chat.stats.prompt_tokens == 17
    assert run("the sea").stats.prompt_tokens == 5
