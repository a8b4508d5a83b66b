"""``benchmarks/agent_generate.py`` on the CPU: transformers' ``generate`` over a tiny checkpoint in the published
layout replays ``serve_load.py --agent``'s requests (1 session x 2 steps), with the prompt ids the server makes
of them (its request model, chat format and vision encoder: the same token counts per step, the second step's
history holding the first step's reply), transformers' own image preprocessing and rotary positions agreeing;
``serve_load.py --baseline`` reads the row back and prints it as the table's third line.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow
TOKENS = 3


def serve_load():
    """benchmarks/serve_load.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("serve_load_under_test", ROOT / "benchmarks" / "serve_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    """(row, its file): agent_generate.py's JSON for 1 session x 2 steps on a random checkpoint of the tiny sizes."""
    root = tmp_path_factory.mktemp("agent-generate")
    made = subprocess.run([sys.executable, "scripts/make_layout_checkpoint.py", "-c", str(TINY), "-o",
                           str(root / "ckpt"), "--shard-mib", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    out = subprocess.run([sys.executable, "benchmarks/agent_generate.py", "--checkpoint", str(root / "ckpt"), "-c",
                          str(TINY), "--agent", "1x2", "--agent-tokens", str(TOKENS), "--device", "cpu",
                          "--json", str(root / "row.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads((root / "row.json").read_text())
    assert json.loads(out.stdout) == written
    return written, root / "row.json"


@pytest.fixture(scope="module")
def server_prompt(tmp_path_factory):
    """messages -> the prompt the server builds of ``serve_load.agent_body(messages)``: its ``chat_prompt`` on
    the tiny vision graph (ONNX Runtime)."""
    from autoglm_build.calibration import tokenizer_for
    from autoglm_build.config import load_config
    from autoglm_build.console import Reporter
    from autoglm_build.pipeline import Pipeline
    from autoglm_build.runtime.backends import open_backend
    from autoglm_build.runtime.text import ChatTokenizer
    from autoglm_build.serve.app import ServerState, chat_prompt
    from autoglm_build.serve.protocol import ChatCompletionRequest
    from autoglm_build.stages.export import ExportStage

    cfg, workdir = load_config(TINY), tmp_path_factory.mktemp("vision") / "w"
    Pipeline(cfg, workdir, [ExportStage(Path(cfg.checkpoint))], ["vision"], reporter=Reporter(-1),
             config_path=str(TINY)).run()
    backend = open_backend(workdir, ["vision"], "onnxruntime")
    state = ServerState(cfg=cfg, backend=backend, tokenizer=ChatTokenizer(tokenizer_for(cfg)[0], cfg.text.vocab_size),
                        scheduler=None)
    agent_body = serve_load().agent_body
    yield lambda messages: chat_prompt(state, ChatCompletionRequest.model_validate(agent_body(messages, TOKENS)))
    backend.close()


def test_generate_replays_the_agent_requests_with_the_servers_prompt_ids(row, server_prompt):
    row, _ = row
    load = serve_load()
    assert (row["sessions"], row["steps_per_session"], row["agent_tokens"]) == (1, 2, TOKENS)
    assert (row["steps"], row["errors"], row["first_error"]) == (2, 0, "")
    assert [(s["session"], s["step"], s["tokens"]) for s in row["per_step"]] == [(0, 0, TOKENS), (0, 1, TOKENS)]
    assert (row["device"], row["dtype"], row["reused"]) == ("cpu", "float32", 0)
    assert row["ttft_p50"] > 0 and row["later_p50"] > 0 and row["tokens_per_s"] > 0
    # the same messages as serve_load's session (the first step's reply in the second step's history)
    messages, want = [{"role": "system", "content": load.agent_system_prompt()}], []
    for k, screen in enumerate(load.agent_screens(1, 2)[0]):
        messages.append(load.agent_turn(k, screen))
        want.append(len(server_prompt(messages).ids))
        load.agent_reply(messages, row["contents"][0][k])
    assert [s["prompt_tokens"] for s in row["per_step"]] == want
    assert row["prompt_tokens"] == row["prefilled"] == sum(want)
    assert want[1] > want[0]  # the history grew by the first turn's text and reply, less its screenshot
    # transformers' own image processor and rotary positions agree with the server's on these requests
    check = row["processor_check"]
    assert check["grid"] == check["transformers_grid"] and check["grid"][0] == 1
    assert check["max_abs_diff"] < 1e-5
    assert row["positions_mismatches"] == 0


def test_serve_load_prints_the_row_as_the_third_line_and_refuses_another_load(row, capsys):
    row, path = row
    load = serve_load()
    baseline = load.load_baseline(str(path), 1, 2, TOKENS)
    served = {k: row[k] for k in ("ttft_p50", "ttft_p99", "later_p50", "later_p99", "prompt_tokens", "tokens_per_s")}
    results = {"on": {**served, "prefilled": 10, "reused": 5, "errors": 0, "contents": [["a"]]},
               "off": {**served, "prefilled": 15, "reused": 0, "errors": 0, "contents": [["a"]]}}
    assert load.agent_table(results, baseline) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["on", "off", "generate"]
    assert lines[3].split()[5:8] == [str(row["prompt_tokens"]), str(row["prompt_tokens"]), "0"]
    assert f"generate: {row['label']}" in lines
    assert any(line.startswith("TTFT p50 generate/served with reuse: 1.00x") for line in lines)
    with pytest.raises(SystemExit, match="replayed 1x2"):
        load.load_baseline(str(path), 8, 5, TOKENS)


def test_serve_load_tables_one_server_alone_with_its_replies(capsys):
    """``--agent-reuse on`` (the 9B build starts in minutes: one server): the one row, each step's reply, no
    comparison of replies, and a failing status when its run had errors."""
    load = serve_load()
    row = {"ttft_p50": 1.0, "ttft_p99": 2.0, "later_p50": 1.0, "later_p99": 2.0, "prompt_tokens": 9000,
           "prefilled": 9000, "reused": 0, "tokens_per_s": 3.0, "errors": 0,
           "contents": [["<answer>do(a)</answer>", "x"]]}
    assert load.agent_table({"on": row}) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:2]] == ["on"]
    assert "reply, session 0 step 0: '<answer>do(a)</answer>'" in out and "replies equal" not in out
    assert load.agent_table({"on": {**row, "errors": 1}}) == 1
