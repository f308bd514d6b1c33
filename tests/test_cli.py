"""The command line's contract: exit statuses, bundled configs by name, and a JSONL batch checked before any
model loads (no model is needed here: a checkpoint path that does not exist is never even looked at)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mistral4_jax import cli, configs
from mistral4_jax.serve import batch

MISSING = "/nonexistent/mistral4-checkpoint"
HELLO = [{"role": "user", "content": "Hello"}]


def main(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in this process: (exit status, stderr)."""
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


# ------------------------------------------------------------------------------------- exit status
@pytest.mark.parametrize("argv, message", [
    (["plan"], "the following arguments are required: --config"),
    (["plan", "--config", "tiny", "--hbm", "12 XB"], "argument --hbm: cannot read '12 XB' as a size"),
    (["plan", "--config", "tiny", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
    (["generate", "--checkpoint", MISSING], "give exactly one of --prompt or --input"),
    (["generate", "--checkpoint", MISSING, "--prompt", "hi", "--input", "r.jsonl"], "give exactly one of --prompt"),
    (["generate", "--checkpoint", MISSING, "--input", "r.jsonl"], "--input needs --output"),
    (["generate", "--checkpoint", MISSING, "--prompt", "hi", "--output", "o.jsonl"], "--output goes with --input"),
    (["generate", "--checkpoint", MISSING, "--input", "r.jsonl", "--output", "o", "--system", "x"], "--image and --system go with --prompt"),
    (["generate", "--checkpoint", MISSING, "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["generate", "--checkpoint", MISSING, "--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "--checkpoint", MISSING, "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--checkpoint", MISSING, "--prompt", "hi", "--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["generate", "--checkpoint", MISSING, "--prompt", "hi", "--reasoning-effort", "max"], "argument --reasoning-effort: invalid choice: 'max'"),
    (["chat", "--checkpoint", MISSING, "--top-k", "-2"], "--top-k must be >= 0"),
    (["demo", "--max-new-tokens", "x"], "argument --max-new-tokens: expected a positive integer, got 'x'"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_usage_errors_exit_2_with_the_usage(capsys, argv, message):
    status, err = main(capsys, *argv)
    assert status == 2
    assert err.startswith("usage: mistral4-jax") and f"error: {message}" in err
    assert MISSING not in err  # nothing was loaded


def test_errors_in_files_exit_1_in_one_line_and_help_exits_0(capsys, tmp_path):
    status, err = main(capsys, "generate", "--checkpoint", MISSING, "--prompt", "hi")
    assert status == 1 and MISSING in err and err.count("\n") == 1 and "usage" not in err
    status, err = main(capsys, "plan", "--config", "no-such-model")
    assert status == 1 and "no bundled config of that name (bundled: mistral-small-4-119b, small, tiny)" in err
    assert main(capsys, "plan", "--help")[0] == 0


# --------------------------------------------------------------------------------- bundled configs
def test_plan_config_by_name_from_any_directory(tmp_path):
    """`plan --config mistral-small-4-119b` in a fresh process started in an empty directory: the config comes
    from the installed package (configs/ is package data), not from a clone's working directory."""
    out = subprocess.run([sys.executable, "-m", "mistral4_jax.cli", "plan", "--config", "mistral-small-4-119b",
                          "--mesh", "expert=8,tensor=2", "--dtype", "float8_e4m3fn", "--hbm", "16GiB", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    real = json.load(open(configs.resolve("mistral-small-4-119b")))
    assert plan["kv_bytes_per_token"] == real["num_hidden_layers"] * (real["kv_lora_rank"] + real["qk_rope_head_dim"]) * 2
    assert 118.5e9 <= plan["params"] <= 119.5e9 and plan["fits"] is True
    assert os.listdir(tmp_path) == []


def test_config_lookup_by_name_or_path(tmp_path, monkeypatch):
    package_dir = os.path.dirname(configs.__file__)
    assert configs.names() == ["mistral-small-4-119b", "small", "tiny"]
    assert configs.resolve("tiny") == configs.resolve("tiny.json") == os.path.join(package_dir, "tiny.json")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text("{}")
    assert configs.resolve("tiny.json") == "tiny.json"  # a path that exists wins over a bundled name
    with pytest.raises(FileNotFoundError, match="'configs/tiny.json': no such file"):
        configs.resolve("configs/tiny.json")


# ------------------------------------------------------------------------------------- JSONL batch
def _write(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def _generate(capsys, requests: str, output: str) -> tuple[int, str]:
    return main(capsys, "generate", "--checkpoint", MISSING, "--input", requests, "--output", output)


@pytest.mark.parametrize("content, why", [("", "the file is empty"), ("\n  \n\n", "the file is blank")])
def test_empty_batch_fails_before_the_model_loads(capsys, tmp_path, content, why):
    (tmp_path / "r.jsonl").write_text(content)
    status, err = _generate(capsys, str(tmp_path / "r.jsonl"), str(tmp_path / "out.jsonl"))
    assert status == 1 and f"no requests ({why})" in err
    assert MISSING not in err and not (tmp_path / "out.jsonl").exists()


BAD = [
    ("{not json", "line 1: not valid JSON"),
    ({"id": "b", "messages": HELLO, "max_tokens": 0}, "line 2: 'max_tokens' must be >= 1, got 0"),
    ({"id": "c", "messages": HELLO, "max_new_tokens": "5"}, "line 3: 'max_new_tokens' must be an integer, got '5'"),
    ({"id": ["d"], "messages": HELLO}, "line 4: 'id' must be a string or an integer, got ['d']"),
    ({"id": "e", "messages": HELLO, "temperature": "hot"}, "line 5: temperature must be a number, got 'hot'"),
    ({"id": "b", "messages": HELLO}, "line 6: id 'b' is already used by line 2"),
    ({"id": "g", "messages": HELLO, "top_k": 1.5}, "line 7: top_k must be an integer, got 1.5"),
    ({"id": "h", "messages": HELLO, "seed": -1}, "line 8: 'seed' must be in [0, 4294967296), got -1"),
    ({"id": "i", "messages": HELLO, "stream": True}, "line 9: unknown field 'stream'"),
    ({"id": "j", "messages": "Hello"}, "line 10: 'messages' must be a non-empty list"),
    ({"id": "k", "messages": HELLO, "max_tokens": 3, "max_new_tokens": 3}, "line 11: give one of 'max_tokens' and"),
    ({"id": "l", "messages": [{"content": "x"}]}, "line 12: messages[0] must be an object with a string 'role'"),
    ({"id": "m", "messages": HELLO, "reasoning_effort": "max"}, "line 13: 'reasoning_effort' must be one of 'none', "),
    ({"id": "n", "messages": HELLO, "stop_token_ids": [2, -1]}, "line 14: 'stop_token_ids' must be a list of token ids"),
    ([1, 2], "line 15: expected a JSON object, got list"),
    ({"id": True, "messages": HELLO}, "line 16: 'id' must be a string or an integer, got True"),
]


def test_parse_names_the_line_and_field_of_every_bad_request():
    parsed = batch.parse([line if isinstance(line, str) else json.dumps(line) for line, _ in BAD], source="r.jsonl")
    assert [p.error for p in parsed] == [p.error for p in parsed if p.error]  # every line is bad
    for p, (_, message) in zip(parsed, BAD):
        assert p.error.startswith(f"r.jsonl {message}"), (p.error, message)


def test_invalid_batch_fails_before_the_model_loads(capsys, tmp_path):
    """Only bad lines: each is reported (the first 10, then a count) and nothing is loaded or written."""
    requests = _write(tmp_path / "r.jsonl", [line for line, _ in BAD])
    status, err = _generate(capsys, requests, str(tmp_path / "out.jsonl"))
    assert status == 1 and MISSING not in err and not (tmp_path / "out.jsonl").exists()
    for _, message in BAD[:10]:
        assert f"mistral4-jax generate: {requests} {message}" in err
    assert "... and 6 more bad lines" in err
    assert err.rstrip().endswith(f"{requests}: none of its 16 requests is valid (see above); nothing to run")


def test_mixed_batch_reports_bad_lines_before_loading_the_model(capsys, tmp_path):
    requests = _write(tmp_path / "r.jsonl", [{"id": "a", "messages": HELLO}, "{oops"])
    status, err = _generate(capsys, requests, str(tmp_path / "out.jsonl"))
    assert status == 1  # the checkpoint does not exist: reported after the bad line, so after the check
    assert err.index(f"{requests} line 2: not valid JSON") < err.index("1 of 2 requests are invalid") < err.index(MISSING)


@pytest.mark.parametrize("ids, default", [(["a", None, "c"], ["a", "2", "c"]), ([10, None, 30], [10, 2, 30]),
                                          ([None, None, None], [1, 2, 3])])
def test_default_ids_take_the_type_of_the_files_ids(ids, default):
    """A line that is not JSON, or has no id, is named by its line number: a string in a file of string ids."""
    for broken in (False, True):
        lines = [json.dumps({"messages": HELLO} | ({"id": i} if i is not None else {})) for i in ids]
        if broken:
            lines[1] = "{not json"
        parsed = batch.parse(lines)
        assert [p.id for p in parsed] == default
        assert [type(p.id) for p in parsed] == [type(d) for d in default]
        assert (parsed[1].error is not None) == broken


def test_parse_applies_defaults_and_request_values():
    lines = [json.dumps({"messages": HELLO}),
             json.dumps({"messages": HELLO, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                         "reasoning_effort": "high", "stop_token_ids": [5]}),
             json.dumps({"messages": HELLO, "max_tokens": None, "temperature": None}),
             ""]
    a, b, c = batch.parse(lines, {"max_new_tokens": 16, "temperature": 0.2, "seed": 9})
    assert (a.max_new_tokens, a.sampling.temperature, a.seed, a.reasoning_effort, a.stop_token_ids) == (16, 0.2, 9, None, None)
    assert (b.max_new_tokens, b.sampling.temperature, b.sampling.top_p, b.seed) == (7, 0.5, 0.9, 3)
    assert (b.reasoning_effort, b.stop_token_ids) == ("high", (5,))
    assert (c.max_new_tokens, c.sampling.temperature) == (16, 0.2)  # null means "the default"


def test_batch_stop_token_ids_empty_means_no_stop_token():
    """In a batch line, `stop_token_ids: []` means no stop token (as in `model.generate`), absent means eos."""
    msg = [{"role": "user", "content": "hi"}]
    none, default, ids = batch.parse([json.dumps({"messages": msg, "stop_token_ids": []}), json.dumps({"messages": msg}),
                                      json.dumps({"messages": msg, "stop_token_ids": [2, 5]})])
    assert (none.error, none.stop_token_ids) == (None, ())
    assert (default.error, default.stop_token_ids) == (None, None)
    assert ids.stop_token_ids == (2, 5)


# ------------------------------------------------------------------------------- tools and JSON
@pytest.mark.parametrize("tools, extra, message", [
    (None, ["--tools", "/nonexistent/tools.json"], "--tools /nonexistent/tools.json: /nonexistent/tools.json: cannot read"),
    ("[{not json", [], "not valid JSON"),
    ('{"type": "function"}', [], "tools must be a list"),
    ('[{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}]', [],
     r"tools[0] (f): parameters are not a valid JSON schema"),
    ('[{"type": "function", "function": {"name": "f"}}]', ["--tool-choice", "g"],
     "--tool-choice: tool_choice names the function 'g', which is not among the tools (f)"),
    (None, ["--tool-choice", "required"], "--tool-choice: tool_choice='required' needs tools"),
    (None, ["--json-schema", "SCHEMA"], "is not a valid JSON schema"),
])
def test_bad_tool_options_fail_before_the_model_loads(capsys, tmp_path, tools, extra, message):
    argv = ["generate", "--checkpoint", MISSING, "--prompt", "hi"]
    if tools is not None:
        (tmp_path / "tools.json").write_text(tools)
        argv += ["--tools", str(tmp_path / "tools.json")]
    (tmp_path / "schema.json").write_text('{"type": "objekt"}')
    argv += [str(tmp_path / "schema.json") if a == "SCHEMA" else a for a in extra]
    status, err = main(capsys, *argv)
    assert status == 2 and message in err and MISSING not in err
    status, err2 = main(capsys, *["chat" if a == "generate" else a for a in argv if a not in ("--prompt", "hi")])
    assert status == 2 and message in err2
