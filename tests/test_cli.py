"""The `r1` command line, run as users run it (a subprocess, offline).

Commands that are refused before any work (exit 2 with a message) run in this process through
`cluster.cli.main`, the function the `r1` script calls: a subprocess would only add the
interpreter's start and imports to each (seconds apiece) and check the same code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main as r1_main

R1 = str(Path(sys.executable).parent / "r1")


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([R1, *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("generate", "chat", "serve", "model"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "model"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0
    assert "usage: r1 " + command in result.stdout


def test_generate_prints_what_the_engine_generates(tiny):
    from r1.config import SamplingConfig
    from r1.engine import TransformersEngine
    from r1.reasoning import split_reasoning

    question = "Mia has 23 apples. She buys 45 more. How many apples does she have now?"
    result = run("generate", question, "--temperature", "0", "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer)
    text = engine.generate_batch([[{"role": "user", "content": question}]], SamplingConfig(temperature=0, max_new_tokens=24))[0].text
    reasoning, content = split_reasoning(text)
    if reasoning:
        assert "[thinking]\n" + reasoning in result.stdout
    if content:
        assert "[answer]\n" + content in result.stdout


def test_generate_hide_reasoning_and_raw():
    result = run("generate", "12 + 7 =", "--raw", "--temperature", "0", "--max-new-tokens", "4", "--hide-reasoning")
    assert result.returncode == 0, result.stderr
    assert "[thinking]" not in result.stdout


def test_generate_with_a_json_schema_answers_json_after_the_reasoning(tmp_path):
    import json

    schema = tmp_path / "verdict.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
                                  "required": ["answer"], "additionalProperties": False}))
    result = run("generate", "Is 2 + 3 = 5?", "--temperature", "0", "--max-new-tokens", "64", "--json-schema", str(schema),
                 "--hide-reasoning")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) in ({"answer": "yes"}, {"answer": "no"})  # the answer alone, as JSON


def test_generate_with_a_thinking_budget_cuts_the_reasoning():
    # --thinking-budget 0: no reasoning, the answer at once (the reasoning heading has nothing under it).
    free = run("generate", "Tom has 5 pens. He buys 17 more. How many pens does he have now?", "--temperature", "0",
               "--max-new-tokens", "96")
    cut = run("generate", "Tom has 5 pens. He buys 17 more. How many pens does he have now?", "--temperature", "0",
              "--max-new-tokens", "96", "--thinking-budget", "0")
    assert free.returncode == 0 and cut.returncode == 0, free.stderr + cut.stderr
    thought = lambda out: out.partition("[thinking]")[2].partition("[answer]")[0].strip()  # noqa: E731
    assert thought(free.stdout) and not thought(cut.stdout) and "[answer]" in cut.stdout


def test_generate_with_choices_or_a_grammar_answers_one_after_the_reasoning(tmp_path):
    grammar = tmp_path / "sum.gbnf"
    grammar.write_text('root ::= "The sum is " [0-9] [0-9]? "."\n')
    chosen = run("generate", "Is 2 + 3 = 5?", "--temperature", "0", "--max-new-tokens", "64", "--choice", "正确",
                 "--choice", "错误", "--hide-reasoning")
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip() in ("正确", "错误")
    summed = run("generate", "What is 2 + 3?", "--temperature", "0", "--max-new-tokens", "64", "--grammar", str(grammar),
                 "--hide-reasoning")
    assert summed.returncode == 0, summed.stderr
    assert __import__("re").fullmatch(r"The sum is [0-9]{1,2}\.", summed.stdout.strip()), summed.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--json-schema", "./missing.json"], "--json-schema ./missing.json: cannot read it"),
        (["--regex", "[0-"], "regex: the regular expression cannot be used: Regex parsing error"),
        (["--regex", "a", "--choice", "b"], "--regex and --choice each constrain the answer"),
        (["--grammar", "./missing.gbnf"], "--grammar ./missing.gbnf: cannot read it"),
        (["--json-schema", "pyproject.toml"], "--json-schema pyproject.toml: not JSON"),
        (["--temperature", "-1"], "sampling.temperature"),  # out of range, named
        (["--max-new-tokens", "5000"], "use max_new_tokens <= "),  # beyond r1-tiny's 1024-token context
        (["--model", "./missing-model-dir"], "does not exist"),  # a path that is not there
        (["--set", "sampling.tempreature=0.1"], "unknown key"),  # a typo in an override
    ],
)
def test_generate_errors_exit_2_with_a_message(args, message, capsys):
    assert r1_main(["generate", "hi", *args]) == 2
    assert message in capsys.readouterr().err


def test_chat_keeps_the_dialog_and_reads_stdin():
    result = run("chat", "--temperature", "0", "--max-new-tokens", "4", stdin="hello\n/reset\nagain\n/exit\n")
    assert result.returncode == 0, result.stderr
    # Two replies (each stopped at 4 tokens), the reset acknowledged between them.
    assert result.stdout.count("[stopped at max_new_tokens") == 2
    assert "(dialog cleared)" in result.stdout


def test_build_tiny_writes_the_shipped_tokenizer(tmp_path):
    out = tmp_path / "tiny"
    result = run("model", "build-tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr
    # A fresh process, so DeepSpeed (imported by save_pretrained when installed) logs its accelerator
    # detection now: that goes to stderr, stdout holds only the command's own line.
    assert result.stdout == f"built r1-tiny in {out}\n"
    shipped = Path(__file__).resolve().parent.parent / "r1" / "assets" / "r1-tiny"
    # The tokenizer is the shipped one byte for byte (training changes only the weights).
    assert (tmp_path / "tiny" / "tokenizer.json").read_bytes() == (shipped / "tokenizer.json").read_bytes()
    assert (tmp_path / "tiny" / "model.safetensors").stat().st_size > 1_000_000


@pytest.mark.parametrize("port", ["99999", "0"])
def test_serve_with_a_port_outside_the_tcp_range_exits_2_before_starting_ray(port):
    result = run("serve", "--port", port)
    assert result.returncode == 2
    assert f"--port={port} is not a TCP port" in result.stderr
    assert "Started a local Ray instance" not in result.stderr + result.stdout


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: use 1 or more"),  # was pydantic's raw text
    (["--baseline", "/nonexistent-model"], "--baseline /nonexistent-model: model path"),  # found before --model runs
])
def test_eval_errors_exit_2_before_evaluating(args, message, capsys):
    assert r1_main(["eval", "--num-problems", "2", *args]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "exact match" not in captured.out


def test_a_closed_output_pipe_ends_generate_quietly():
    # `r1 generate … | head -n1`: the reader is gone before the answer is written.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([R1, "generate", "--max-new-tokens", "8", "2 + 3 ="], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    process.stdout.close()
    _, stderr = process.communicate(timeout=300)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert process.returncode == 141


def test_build_tiny_refuses_a_directory_that_holds_a_model(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert r1_main(["model", "build-tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a model (config.json)" in err
    assert "--overwrite" in err and (out / "config.json").read_text() == "{}"
    with pytest.raises(SystemExit) as exit_info:  # not the current directory (refused by the argument parser)
        r1_main(["model", "build-tiny", "--out", ""])
    assert exit_info.value.code == 2 and "--out: an empty path" in capsys.readouterr().err
