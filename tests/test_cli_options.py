"""The command's options: defaults in --help, choices, --device, --quiet, constraint
flags, per-token progress, --csv, and tune without matplotlib. The heavy parts
(the model, the sweep's measurements) are replaced by fakes."""

import csv
import io
import json
import sys
from types import SimpleNamespace

import pytest

from creative_sparse.cli import main
from test_autotune import fake  # noqa: F401  (the fixture: a sweep without a model)


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_defaults_and_choices(capsys):
    text = _help(capsys, ["generate"])
    assert "new tokens per candidate" in text and "(default: 120)" in text
    assert "--device" in text and "(default: cpu)" in text and "--regex" in text
    text = _help(capsys, ["tune"])
    assert "one of ad_copy, code, creative_writing, music, poetry" in text
    assert "(default: 1.0)" in text and "--csv" in text
    assert "2**64 - 1] (default: 0)" in text and "(default: False)" not in text
    assert "(default: smollm2-135m)" in _help(capsys, ["evaluate"])


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    return err.splitlines()[-1]


@pytest.fixture
def fake_wrapper(monkeypatch):
    """A CreativeSparseWrapper that records how it was built and called, and ticks
    the progress callback once per decoding step."""
    import creative_sparse.generation as generation

    seen = {}

    class Wrapper:
        sparsity_schedule = (0.3, 0.3)

        def __init__(self, model, sparsity_schedule, device, **kwargs):
            seen["init"] = dict(model=model, device=device, schedule=sparsity_schedule,
                                **kwargs)

        def generate_candidates(self, prompt, **kwargs):
            seen["call"] = kwargs
            for _ in range(kwargs["max_length"]):
                kwargs["progress"](1)
            quality = SimpleNamespace(q=0.5, novelty=0.4, diversity=0.3, incoherence=0.2,
                                      relevance=0.9, violations=0.0)
            cands = [SimpleNamespace(text=f"text {i}, with a comma", draft=f"d{i}",
                                     quality=quality, safety=None) for i in range(2)]
            return SimpleNamespace(candidates=cands, drafts=["d0", "d1"], reference="ref",
                                   wall_time=1.0, safety=[], withheld=None, flagged_drafts=0,
                                   draft_flags=[])
    monkeypatch.setattr(generation, "CreativeSparseWrapper", Wrapper)
    return seen


def test_generate_passes_constraints_device_and_shows_per_token_progress(
        fake_wrapper, capsys, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    assert main(["generate", "hi", "--max-tokens", "7", "--ban", "robot", "--ban", "sea",
                 "--require", "moon", "--regex", "[a-z ,]+", "--json-schema", str(schema),
                 "--device", "auto"]) == 0
    assert fake_wrapper["call"]["constraints"] == {
        "banned": ["robot", "sea"], "required": ["moon"], "regex": "[a-z ,]+",
        "json_schema": {"type": "object"}}
    assert fake_wrapper["init"]["device"] in ("cpu", "cuda")
    from creative_sparse.generation.creative_strategy import DEFAULT_SCHEDULE
    assert fake_wrapper["init"]["schedule"] == DEFAULT_SCHEDULE == (0.3, 0.3)  # one default
    err = capsys.readouterr().err
    assert "7/7" in err and "tok" in err                 # one tick per token, with a rate


def test_generate_quiet_and_csv(fake_wrapper, capsys):
    assert main(["generate", "hi", "--max-tokens", "3", "--quiet"]) == 0
    assert "3/3" not in capsys.readouterr().err
    assert fake_wrapper["call"]["constraints"] is None
    assert main(["generate", "hi", "--max-tokens", "3", "--csv"]) == 0
    captured = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert [r["text"] for r in rows] == ["text 0, with a comma", "text 1, with a comma"]
    assert float(rows[0]["q"]) == 0.5 and "3/3" not in captured.err


@pytest.mark.parametrize("argv,message", [
    (["generate", "hi", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
    (["generate", "hi", "--regex", "(open"], "argument --regex: invalid regex '(open'"),
    (["generate", "hi", "--regex", "(?=a)a"], "cannot be a token mask"),
    (["generate", "hi", "--json-schema", "/no/such.json"], "is not a file"),
    (["generate", "hi", "--json", "--csv"], "not allowed with argument"),
    (["tune", "--task", "limericks"], "argument --task: invalid choice: 'limericks'"),
], ids=["device", "regex", "regex-not-rust", "schema-file", "json-and-csv", "task"])
def test_bad_options_are_refused_up_front(fake_wrapper, capsys, argv, message):
    assert message in _refused(capsys, argv)
    assert "call" not in fake_wrapper


def test_schema_file_must_hold_an_object(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text("[1, 2]")
    assert "must hold a JSON object" in _refused(capsys, ["generate", "hi", "--json-schema",
                                                          str(path)])


def test_cuda_without_a_gpu_is_refused(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "torch.cuda.is_available() is False" in _refused(
        capsys, ["generate", "hi", "--device", "cuda"])


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib cannot be imported, as on a machine without the [plots] extra."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import raises ImportError


def test_tune_json_and_csv_need_no_matplotlib(fake, no_matplotlib,  # noqa: F811
                                              tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CREATIVE_SPARSE_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--task", "poetry", "--budget", "0.3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert 0 <= data["s_star"] <= 1 and data["plot"] is None
    assert main(["tune", "--task", "poetry", "--budget", "0.3", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) >= 3 and {r["split"] for r in rows} == {"tune"}
    assert not list(tmp_path.glob("*.png"))
    assert sys.modules["matplotlib"] is None               # nothing imported it
    line = _refused(capsys, ["tune", "--task", "poetry", "--plot"])
    assert "plotting needs matplotlib" in line
