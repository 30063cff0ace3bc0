"""The creative-sparse command."""

import pytest

from creative_sparse.cli import main, structured_qkv


def test_demo_attention_part_runs_and_reports(capsys):
    assert main(["demo", "--length", "384", "--heads", "2", "--no-model"]) == 0
    out = capsys.readouterr().out
    assert "cdfthreshd=0.97 (default)" in out and "topk=0.25" in out
    rows = [line for line in out.splitlines() if line.startswith(("cdf", "topk"))]
    assert len(rows) == 6
    for row in rows:  # sparsity column is a fraction in [0, 1]
        sparsity = float(row.split()[-6])
        assert 0.0 <= sparsity <= 1.0


def test_backends_lists_the_cpu_default(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "default on cpu: cpu_kernel" in out and "torch" in out


def test_bad_demo_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--length", "0"])
    assert exc.value.code == 2
    assert "--length" in capsys.readouterr().err


def test_structured_inputs_have_positional_structure():
    q, k, v = structured_qkv(1, 2, 256, 32)
    assert q.shape == k.shape == v.shape == (1, 2, 256, 32)
    near = (q[0, 0, 100] * k[0, 0, 101]).sum()
    far = (q[0, 0, 100] * k[0, 0, 250]).sum()
    assert near > far  # nearby positions score higher: a sparse map exists


@pytest.mark.slow
def test_creative_demo_compares_both(smollm2, capsys):
    from creative_sparse.cli import run_creative_demo
    run_creative_demo(prompts=["Write one line about the sea."], candidates=2, max_tokens=10)
    out = capsys.readouterr().out
    assert "top-p sampling" in out and "Creative-Sparse" in out and out.count("best Q") == 2


@pytest.mark.slow
def test_generate_json(smollm2, capsys):
    import json
    assert main(["generate", "Write one line about the sea.", "--candidates", "2",
                 "--max-tokens", "12", "--seed", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["drafts"]) == 4 and len(data["candidates"]) == 2
    cand = data["candidates"][0]
    assert cand["text"] and -1.0 <= cand["q"] <= 1.0 and 0.0 <= cand["incoherence"] <= 1.0
    assert 0.0 <= cand["relevance"] <= 1.0
    assert cand["nll"] is None or cand["nll"] >= 0


@pytest.mark.parametrize("flag, value, message", [
    ("--schedule", "0.7", "argument --schedule: must be two numbers 'diverge,refine' in [0, 1]"),
    ("--schedule", "1.5,0.2", "argument --schedule: must be two numbers"),
    ("--sparsity", "nan", "argument --sparsity: must be a number in [0, 1], got 'nan'"),
    ("--candidates", "0", "argument --candidates: must be an integer in [1, 64], got '0'"),
    ("--max-tokens", "ten", "argument --max-tokens: must be an integer in [1, 32768], got 'ten'"),
])
def test_generate_rejects_bad_arguments_before_loading_the_model(capsys, monkeypatch, flag,
                                                                 value, message):
    import creative_sparse.generation as generation

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(generation, "CreativeSparseWrapper", no_loading)
    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", flag, value])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail loudly if a command gets as far as doing its work."""
    import creative_sparse.autotune as autotune
    import creative_sparse.cli as cli
    import creative_sparse.generation as generation

    def ran(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")
    for module, name in ((cli, "run_demo"), (cli, "run_creative_demo"),
                         (generation, "CreativeSparseWrapper"), (autotune, "sweep_sparsity")):
        monkeypatch.setattr(module, name, ran)


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("creative-sparse")
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["demo", "--length", "100000000"], "argument --length: must be an integer in [1, 32768]"),
    (["demo", "--heads", "100000"], "argument --heads: must be an integer in [1, 64]"),
    (["demo", "--head-dim", "1"], "argument --head-dim: must be an integer in [2, 256]"),
    (["demo", "--length", "32768", "--heads", "64"], "is more than 67108864 (2**26) elements"),
    (["generate", "hi", "--candidates", "100000000"], "must be an integer in [1, 64]"),
    (["generate", "hi", "--max-tokens", "100000000"], "must be an integer in [1, 32768]"),
    (["generate", "hi", "--seed", str(2**64)],
     "argument --seed: must be an integer in [-9223372036854775808, 18446744073709551615]"),
    (["generate", "hi", "--seed", str(-2**63 - 1)], "argument --seed: must be an integer in"),
    (["generate", "\udcff"], "argument prompt: the prompt is not valid Unicode: it holds a lone "
                            "surrogate U+DCFF"),
    (["generate", "  "], "argument prompt: must be a non-empty text"),
    (["tune", "--task", "poetry", "--seed", str(10**30)], "argument --seed: must be an integer"),
], ids=["demo-length", "demo-heads", "demo-head-dim", "demo-elements", "candidates",
        "max-tokens", "seed-too-big", "seed-too-small", "surrogate-prompt", "blank-prompt",
        "tune-seed"])
def test_sizes_seeds_and_prompts_are_refused_before_any_work(capsys, nothing_runs, argv,
                                                              message):
    """Issue 21: `demo --length 100000000` ran out of memory, a huge --seed failed
    only after the model had loaded, a lone surrogate reached the tokenizer."""
    assert message in _refused(capsys, argv)


def test_tune_plot_in_a_missing_directory_is_refused_and_not_created(capsys, nothing_runs,
                                                                     tmp_path):
    missing = tmp_path / "no" / "such"
    line = _refused(capsys, ["tune", "--task", "poetry", "--plot", str(missing / "q.png")])
    assert f"argument --plot: directory '{missing}' does not exist" in line
    assert not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("x")
    line = _refused(capsys, ["tune", "--task", "poetry", "--plot",
                             str(tmp_path / "file" / "q.png")])
    assert "is not a directory" in line
    assert "is a directory" in _refused(capsys, ["tune", "--task", "poetry", "--plot",
                                                 str(tmp_path)])
    assert "must end in one of" in _refused(capsys, ["tune", "--task", "poetry", "--plot",
                                                     str(tmp_path / "q.nope")])


def _unwritable_dir(tmp_path):
    import os
    import tempfile
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (folder, "/sys"):     # root writes anywhere but in /sys
        try:
            tempfile.TemporaryFile(dir=candidate).close()
        except OSError:
            return str(candidate)
    pytest.skip(f"no directory here refuses writes (uid {os.getuid()})")


def test_tune_plot_in_an_unwritable_directory_is_refused_up_front(capsys, nothing_runs,
                                                                  tmp_path):
    folder = _unwritable_dir(tmp_path)
    line = _refused(capsys, ["tune", "--task", "poetry", "--plot", f"{folder}/q.png"])
    assert f"argument --plot: cannot write in directory '{folder}'" in line


def test_late_errors_are_one_line_with_status_2(capsys, monkeypatch):
    import creative_sparse.cli as cli

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory:\nyou tried to allocate 1 TB")
    monkeypatch.setattr(cli, "run_demo", out_of_memory)
    line = _refused(capsys, ["demo", "--no-model"])
    assert line == ("creative-sparse: error: DefaultCPUAllocator: not enough memory: you tried "
                    "to allocate 1 TB")


@pytest.mark.parametrize("content, message", [
    ('{"role": "user", "content": "hi"}', "must hold a JSON list of messages, got dict"),
    ('[{"role": "user", "content": "hi"', "cannot read"),
    ('[{"role": "bot", "content": "hi"}]', "chat message 0 has role 'bot'; allowed: system, "
                                           "user, assistant"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]',
     "the chat must end with a user message"),
    ('[{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}]',
     "--system and a system message in --chat: give one of them"),
], ids=["not-a-list", "broken-json", "bad-role", "ends-with-assistant", "two-systems"])
def test_bad_chats_are_refused_before_any_work(capsys, nothing_runs, tmp_path, content,
                                               message):
    chat = tmp_path / "chat.json"
    chat.write_text(content)
    argv = ["generate", "--chat", str(chat)] + (["--system", "x"] if message.startswith(
        "--system") else [])
    assert message in _refused(capsys, argv)


def test_generate_needs_a_prompt_or_a_chat(capsys, nothing_runs):
    assert "give a prompt, or --chat FILE.json" in _refused(capsys, ["generate"])


def test_system_prompt_and_chat_become_messages(capsys, monkeypatch, tmp_path):
    """The wrapper gets the messages: --system first, the chat, then PROMPT as the last
    user turn."""
    import creative_sparse.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_generate", lambda args: seen.append(args.prompt))
    chat = tmp_path / "chat.json"
    chat.write_text('[{"role": "user", "content": "Name a colour."}, '
                    '{"role": "assistant", "content": "Teal."}]')
    assert main(["generate", "Another one.", "--system", "Answer in one word.",
                 "--chat", str(chat)]) == 0
    assert main(["generate", "Plain text."]) == 0
    assert seen == [[{"role": "system", "content": "Answer in one word."},
                     {"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Teal."},
                     {"role": "user", "content": "Another one."}], "Plain text."]
