"""The evaluation runner on a tiny random Llama: records, resume, sharding, bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from creative_sparse.evaluation.records import comparable, merge_shards, read_results
from creative_sparse.evaluation.runner import evaluate, plan_units, run_code_tests

TINY = textwrap.dedent('''
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from creative_sparse.quality import HiddenStateEmbedder, LikelihoodScorer, QualityFunctional

    def tiny():
        words = "<unk> <s> </s> the sea is a vast blue and deep poem def return x".split()
        vocab = {w: i for i, w in enumerate(words)}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>", pad_token="</s>")
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, eos_token_id=2, pad_token_id=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        quality = QualityFunctional(embedder=HiddenStateEmbedder(model, tok),
                                    scorer=LikelihoodScorer(model, tok))
        return model, tok, quality
''')
namespace: dict = {}
exec(TINY, namespace)
ROUTING = {"CREATIVE_SPARSE_FAST_LINEAR": "1"}
RUN = dict(tasks=["poetry", "code"], methods=["top_p", "creative_sparse"], seeds=[0, 1],
           prompts=2, num_outputs=2, max_new_tokens=6,
           settings={"top_p": [0.8, 1.2], "creative_sparse": [0.6]}, progress=False)


@pytest.fixture(scope="module", autouse=True)
def _same_arithmetic_as_the_torchrun_ranks(one_thread):
    """torchrun gives each rank one thread (OMP_NUM_THREADS=1); the in-process runs
    use one too, since on some CPUs a float sum's order, and so a sampled token,
    depends on the thread count. The CPU linear routing (oneDNN or ``F.linear``) is
    timed once per process, so two processes may round differently: it is pinned here
    and in the ranks (``ROUTING``)."""
    from creative_sparse.models import fast_linear

    with pytest.MonkeyPatch.context() as mp:
        for name, value in ROUTING.items():
            mp.setenv(name, value)
        fast_linear._routing_pays.cache_clear()
        yield
    fast_linear._routing_pays.cache_clear()


@pytest.fixture(scope="module")
def tiny():
    return namespace["tiny"]()


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    model, tok, quality = tiny
    path = tmp_path_factory.mktemp("full") / "results.jsonl"
    evaluate(model, tok, out=path, quality=quality, model_name="tiny", **RUN)
    return read_results(path)


def _units(results):
    return {k: comparable(v) for k, v in results.units.items()}


def _same(got, want, where: str = "units") -> None:
    """``got == want`` with floats equal to float32 rounding (1e-5 relative: a sum
    batched one way or another); texts, counts and flags exactly."""
    if isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            _same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def test_the_float_comparison_can_fail():
    _same({"a": [1.0, "x"]}, {"a": [1.0 + 1e-9, "x"]})
    for got in ({"a": [1.001, "x"]}, {"a": [1.0, "y"]}, {"a": [1.0]}, {"b": [1.0, "x"]}):
        with pytest.raises(AssertionError):
            _same(got, {"a": [1.0, "x"]})


def test_every_unit_is_recorded_with_scores_and_costs(full_run):
    assert len(full_run.units) == len(plan_units(RUN["tasks"], RUN["methods"], RUN["seeds"],
                                                 prompts=2, settings=RUN["settings"])) == 24
    unit = full_run.units["poetry/1/creative_sparse/0.6/1"]
    assert len(unit["outputs"]) == 2 and unit["knob"] == "level"
    out = unit["outputs"][0]
    for key in ("q", "novelty", "diversity", "incoherence", "relevance", "nll", "rep3"):
        assert isinstance(out[key], float), key
    assert out["passed"] is None and out["valid"] is None
    assert unit["cost"]["flops"] > 0 and unit["cost"]["generated_tokens"] > 0
    code = full_run.units["code/0/top_p/0.8/0"]
    assert all(o["passed"] is False for o in code["outputs"])   # a random model's code fails
    assert code["set"]["pass_at_k"] == 0.0 and code["set"]["valid_rate"] is not None
    assert set(full_run.references) == {("poetry", 0), ("poetry", 1), ("code", 0), ("code", 1)}


class _Killed(Exception):
    pass


def _run_killed_after(tiny, path: Path, units: int) -> None:
    """The run of ``RUN`` into ``path``, killed once ``units`` units are written."""
    model, tok, quality = tiny
    seen = []

    def kill(record):
        seen.append(record["id"])
        if len(seen) == units:
            raise _Killed
    with pytest.raises(_Killed):
        evaluate(model, tok, out=path, quality=quality, model_name="tiny", on_unit=kill,
                 **RUN)


def _torchrun(tmp_path: Path, out: Path, port: int) -> None:
    """The run of ``RUN`` into ``out`` under a 2-process torchrun."""
    script = tmp_path / "run.py"
    script.write_text(TINY + textwrap.dedent(f'''
        from creative_sparse.evaluation.runner import evaluate
        model, tok, quality = tiny()
        evaluate(model, tok, out={str(out)!r}, quality=quality, model_name="tiny", **{RUN!r})
    '''))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **ROUTING}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(port), str(script)], check=True, env=env,
                   timeout=600, capture_output=True)


def test_a_killed_run_resumes_to_the_same_results(tiny, full_run, tmp_path):
    model, tok, quality = tiny
    path = tmp_path / "results.jsonl"
    _run_killed_after(tiny, path, 7)
    assert len(read_results(path).units) == 7
    with open(path, "ab") as f:          # the kill also tore a line in half
        f.write(b'{"type": "unit", "id": "poetry/0/top')
    evaluate(model, tok, out=path, quality=quality, model_name="tiny", **RUN)
    resumed = read_results(path)
    # header, reference, 6 units of prompt 0, reference, 1 unit, then the torn line
    assert resumed.skipped == [11]
    _same(_units(resumed), _units(full_run))
    assert resumed.references == full_run.references


def test_two_torchrun_processes_equal_one(full_run, tmp_path):
    _torchrun(tmp_path, tmp_path / "dist.jsonl", 29517)
    merged = read_results(tmp_path / "dist.jsonl")
    shards = [read_results(tmp_path / f"dist.rank{r}.jsonl") for r in range(2)]
    assert all(len(s.units) == 12 for s in shards)
    _same(_units(merged), _units(full_run))


def test_a_run_begun_in_one_process_resumes_under_torchrun(tiny, full_run, tmp_path):
    out = tmp_path / "moved.jsonl"
    _run_killed_after(tiny, out, 5)
    begun = set(read_results(out).units)
    _torchrun(tmp_path, out, 29518)
    shards = [read_results(tmp_path / f"moved.rank{r}.jsonl") for r in range(2)]
    redone = set().union(*(s.units for s in shards))
    assert len(begun) == 5 and not begun & redone               # nothing done twice
    assert len(redone) == len(full_run.units) - 5
    merged = read_results(out)
    _same(_units(merged), _units(full_run))                     # and nothing lost
    assert merged.references == full_run.references


def test_bad_input_is_a_clear_error(tiny, full_run, tmp_path):
    model, tok, quality = tiny
    with pytest.raises(ValueError, match="unknown method 'beam'; known: top_p"):
        plan_units(["poetry"], ["beam"], [0])
    with pytest.raises(ValueError, match="unknown task 'haiku'"):
        plan_units(["haiku"], ["top_p"], [0])
    with pytest.raises(ValueError, match=r"settings of top_p \(temperature\) must be in \(0, 5\]"):
        plan_units(["poetry"], ["top_p"], [0], settings={"top_p": [0.0]})
    with pytest.raises(ValueError, match="seeds must be non-negative ints"):
        plan_units(["poetry"], ["top_p"], [-1])
    # a file of another run (here: another model) is refused, not mixed
    path = full_run.path
    with pytest.raises(ValueError, match="holds results of another run .*model"):
        evaluate(model, tok, out=path, quality=quality, model_name="other", **RUN)
    other = tmp_path / "old.jsonl"
    other.write_text(json.dumps({"type": "header", "format": "creative-sparse/evaluation-results",
                                 "format_version": 0}) + "\n")
    with pytest.raises(ValueError, match="format version 0"):
        read_results(other)
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my notes\n")
    with pytest.raises(ValueError, match="not a creative-sparse evaluation results header"):
        evaluate(model, tok, out=notes, quality=quality, model_name="tiny", **RUN)
    assert notes.read_text() == "my notes\n"       # nothing lost


def test_moe_only_is_left_out_on_a_model_without_experts(tiny, tmp_path):
    """Every setting of MoE-Only on a dense model would decode as the dense level: the
    runner says so and leaves it out, or refuses when it is all that was asked."""
    model, tok, quality = tiny
    run = dict(tasks=["poetry"], seeds=[0], prompts=1, num_outputs=2, max_new_tokens=4,
               progress=False, quality=quality, model_name="tiny")
    path = tmp_path / "r.jsonl"
    dense = r"no MoE layers.*temperature 0\.8, top-p 0\.9.*left out"
    with pytest.warns(UserWarning, match=dense):
        evaluate(model, tok, out=path, methods=["top_p", "moe_only"],
                 settings={"top_p": [1.0]}, **run)
    results = read_results(path)
    assert results.header["methods"] == ["top_p"]
    assert {u["method"] for u in results.units.values()} == {"top_p"}
    with pytest.raises(ValueError, match="no MoE layers"):
        evaluate(model, tok, out=tmp_path / "moe.jsonl", methods=["moe_only"], **run)
    assert not (tmp_path / "moe.jsonl").exists()


def test_shards_that_disagree_are_refused(full_run, tmp_path):
    lines = full_run.path.read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines) + "\n")
    changed = [json.loads(x) for x in lines]
    for record in changed:
        if record.get("type") == "unit":
            record["outputs"][0]["q"] += 1.0
            break
    b.write_text("\n".join(json.dumps(r) for r in changed) + "\n")
    with pytest.raises(ValueError, match="shards disagree on unit"):
        merge_shards([a, b], tmp_path / "merged.jsonl")
    assert not (tmp_path / "merged.jsonl").exists()


def test_code_tests_run_isolated_with_a_time_limit():
    good = "```python\ndef double(x):\n    return 2 * x\n```"
    assert run_code_tests(good, "assert double(2) == 4")
    assert not run_code_tests(good, "assert double(2) == 5")
    assert not run_code_tests("def double(x):\n    while True: pass", "double(1)", timeout=1.0)
    assert not run_code_tests("import socket\nsocket.create_connection(('example.com', 80))",
                              "pass")
    assert not run_code_tests("this is not python", "pass")


def test_cli_report_writes_tables_and_plots(full_run, tmp_path, capsys):
    from creative_sparse.cli import main

    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert main(["report", str(full_run.path), "--out-dir", str(out)]) in (0, None)
    text = (out / "report.md").read_text()
    assert "Dense top-p" in text and "Creative-Sparse" in text and "poetry" in text
    assert (out / "report.csv").read_text().count("\n") >= 7
    assert (out / "frontier_poetry.png").stat().st_size > 1000


def test_cli_evaluate_checks_its_arguments_before_loading_a_model(capsys):
    from creative_sparse.cli import main

    for argv, message in ((["evaluate", "--methods", "beam"], "invalid choice: 'beam'"),
                          (["evaluate", "--tasks", "haiku"], "invalid choice: 'haiku'"),
                          (["evaluate", "--setting", "top_p"], "expected METHOD=V1,V2"),
                          (["evaluate", "--outputs", "1"], "must be an integer in [2,")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:        # checked before the model loads
        main(["evaluate", "--setting", "fixed=1.5", "--prompts", "1"])
    assert exit_.value.code == 2
    assert "settings of fixed (level) must be in [0, 1]" in capsys.readouterr().err


def test_equal_flops_mode_matches_sampling_tokens(tiny, tmp_path):
    """compute="flops": Creative-Sparse decodes no more tokens than top-p for the same
    outputs (as many drafts as outputs, the run's reference); the header records the
    mode and a results file of the other mode is refused."""
    model, tok, quality = tiny
    run = dict(RUN, tasks=["poetry"], seeds=[0], prompts=1)
    path = tmp_path / "flops.jsonl"
    evaluate(model, tok, out=path, quality=quality, model_name="tiny", compute="flops", **run)
    results = read_results(path)
    assert results.header["compute"] == "flops"
    cs = results.units["poetry/0/creative_sparse/0.6/0"]["cost"]
    assert cs["generated_tokens"] <= run["num_outputs"] * run["max_new_tokens"]
    with pytest.raises(ValueError, match="compute"):
        evaluate(model, tok, out=path, quality=quality, model_name="tiny", **run)
    with pytest.raises(ValueError, match="compute must be one of"):
        evaluate(model, tok, out=tmp_path / "x.jsonl", quality=quality, compute="tokens", **run)


def _split_by_task(path: Path, tmp_path: Path) -> list[Path]:
    """One results file per task, each with its own header, as two runs would write."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    header = records[0]
    parts = []
    for task in header["tasks"]:
        part = dict(header, tasks=[task], max_new_tokens={task: header["max_new_tokens"][task]})
        lines = [part] + [r for r in records[1:] if r.get("task") == task]
        parts.append(tmp_path / f"{task}.jsonl")
        parts[-1].write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return parts


def test_results_files_of_other_tasks_combine_into_one_report(full_run, tmp_path):
    from creative_sparse.cli import main
    from creative_sparse.evaluation.records import combine_results

    pytest.importorskip("matplotlib")
    parts = _split_by_task(full_run.path, tmp_path)
    combined = combine_results(parts)
    assert combined.units == full_run.units and combined.references == full_run.references
    assert combined.header["max_new_tokens"] == full_run.header["max_new_tokens"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["report", str(full_run.path), "--out-dir", str(one), "--no-plots"]) in (0, None)
    assert main(["report", *map(str, parts), "--out-dir", str(two), "--no-plots"]) in (0, None)
    tables = [[line for line in (d / "report.md").read_text().splitlines()
               if line.startswith("|")] for d in (one, two)]
    assert tables[0] == tables[1] and len(tables[0]) > 6
    assert (one / "report.csv").read_text() == (two / "report.csv").read_text()
    text = (two / "report.md").read_text()
    assert "From 2 results files: `poetry.jsonl`, `code.jsonl`" in text
    assert re.search(rf"Runtime: [0-9.]+ min of unit time \({len(full_run.units)} units; "
                     r"poetry [0-9.]+ min; code [0-9.]+ min\)", text)


def test_results_files_that_do_not_compare_are_refused(full_run, tmp_path, capsys):
    from creative_sparse.cli import main
    from creative_sparse.evaluation.records import combine_results

    poetry, code = _split_by_task(full_run.path, tmp_path)
    records = [json.loads(line) for line in code.read_text().splitlines()]
    other = tmp_path / "other.jsonl"

    def write(header_changes=None, unit_changes=None):
        changed = [dict(r) for r in records]
        changed[0].update(header_changes or {})
        for r in changed:
            if r["type"] == "unit" and unit_changes:
                r["set"] = dict(r["set"], **unit_changes)
                break
        other.write_text("\n".join(json.dumps(r) for r in changed) + "\n")
        return other

    with pytest.raises(ValueError, match=r"another protocol .*num_outputs: 3 there, 2"):
        combine_results([poetry, write({"num_outputs": 3})])
    with pytest.raises(ValueError, match="gives code a length budget of 7 tokens, another "
                                         "file 6"):
        combine_results([full_run.path, write({"max_new_tokens": {"code": 7}})])
    with pytest.raises(ValueError, match="disagree on unit code/"):
        combine_results([full_run.path, write(unit_changes={"diversity": 9.0})])
    with pytest.raises(ValueError, match="no such results file"):
        combine_results([poetry, tmp_path / "missing.jsonl"])
    with pytest.raises(SystemExit):
        main(["report", str(poetry), str(write({"compute": "flops"})), "--out-dir",
              str(tmp_path / "r")])
    assert "another protocol" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # a file differing only in library version combines, and the report names both
    mixed = combine_results([poetry, write({"library_version": "0.0.1"})])
    assert mixed.header["library_version"].endswith(", 0.0.1")


def test_constrained_runs_hold_every_method_to_the_task_validators(tiny, tmp_path, monkeypatch):
    """constrain=True: the samplers and Creative-Sparse both decode under the code task's
    Python guard (it is asked about their tokens), poetry (no validators) is untouched,
    the header records it and an unconstrained file is refused."""
    from creative_sparse.generation.constraints import ValidatorGuard

    model, tok, quality = tiny
    asked = []
    rejects = ValidatorGuard.rejects
    monkeypatch.setattr(ValidatorGuard, "rejects",
                        lambda self, ids, token: asked.append(1) or rejects(self, ids, token))
    run = dict(RUN, seeds=[0], prompts=1, settings={"top_p": [1.0], "creative_sparse": [0.6]})
    counts = {}
    for method in ("top_p", "creative_sparse"):
        for task in ("code", "poetry"):
            asked.clear()
            path = tmp_path / f"{method}-{task}.jsonl"
            evaluate(model, tok, out=path, quality=quality, model_name="tiny", constrain=True,
                     **dict(run, tasks=[task], methods=[method]))
            assert read_results(path).header["constrained"] is True
            counts[method, task] = len(asked)
    assert counts["top_p", "code"] > 0 and counts["creative_sparse", "code"] > 0, counts
    assert counts["top_p", "poetry"] == counts["creative_sparse", "poetry"] == 0, counts
    asked.clear()
    plain = tmp_path / "plain.jsonl"
    evaluate(model, tok, out=plain, quality=quality, model_name="tiny",
             **dict(run, tasks=["code"], methods=["top_p"]))
    assert asked == [] and read_results(plain).header["constrained"] is False
    with pytest.raises(ValueError, match="constrained"):
        evaluate(model, tok, out=plain, quality=quality, model_name="tiny", constrain=True,
                 **dict(run, tasks=["code"], methods=["top_p"]))
