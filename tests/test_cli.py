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
    ("--candidates", "0", "argument --candidates: must be an integer >= 1, got '0'"),
    ("--max-tokens", "ten", "argument --max-tokens: must be an integer >= 1, got 'ten'"),
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
