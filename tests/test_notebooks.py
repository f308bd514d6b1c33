"""The first hour: `mistral4-jax demo` and every notebook, run end to end (CPU, the demo's small model).

Each notebook runs on 1 device (JAX already started with the one device there is, as on a one-GPU
runtime) and on 8 (convert_and_shard simulates them itself, as on a CPU runtime); the tests check what
the notebooks print. The demo and the notebook kernels share one persistent compilation cache, so a
program compiled once (the demo model's chat, say) is not compiled again in the next process.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO, expected_params
from mistral4_jax import Mistral4Config, cli, configs
from mistral4_jax.cli import demo
from mistral4_jax.serve.chat import Tokenizer

pytestmark = pytest.mark.usefixtures("free_first")  # conftest: their processes share the memory

NOTEBOOKS = sorted(n for n in os.listdir(os.path.join(REPO, "notebooks")) if n.endswith(".ipynb"))
# Runtimes: quickstart runs on one device (a Colab CPU runtime), convert_and_shard on 8 (its subject). Running
# each on both took ~47 s more of the suite's 10 minutes; mesh against one device is test_sharding.py's.
PRELUDE_1 = "import jax; jax.devices()  # JAX starts on the one CPU device: the notebook cannot simulate more"
PRELUDE_8 = "import jax; jax.config.update('jax_num_cpu_devices', 8)  # a runtime with 8 devices"
SIMULATES_8 = {"convert_and_shard.ipynb"}
"""Notebooks that set up 8 simulated devices themselves on a CPU runtime: on 8 they run as they are."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the demo and kernel processes: CPU, one shared persistent compilation cache."""
    cache = tmp_path_factory.mktemp("jax-cache")
    extra = {"JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg", "JAX_COMPILATION_CACHE_DIR": str(cache),
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    with pytest.MonkeyPatch.context() as mp:  # kernels inherit the environment of this process
        for k, v in extra.items():
            mp.setenv(k, v)
        yield dict(os.environ)


@pytest.fixture(scope="module")
def executed(env, tmp_path_factory):
    """(notebook, devices) -> the text each code cell printed, one string per cell (run once, on demand)."""
    runs: dict[tuple[str, int], list[str]] = {}

    def run(name: str, devices: int) -> list[str]:
        if (name, devices) not in runs:
            nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
            prelude = PRELUDE_1 if devices == 1 else None if name in SIMULATES_8 else PRELUDE_8
            if prelude:
                nb.cells.insert(0, nbformat.v4.new_code_cell(prelude))
            cwd = tmp_path_factory.mktemp(name.split(".")[0])
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
            code = [c for c in nb.cells if c.cell_type == "code"][1 if prelude else 0:]
            assert not [o for c in code for o in c.outputs if o.output_type == "error"]
            runs[name, devices] = ["".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
                                   for c in code]
        return runs[name, devices]

    return run


def test_every_notebook_is_tested():
    assert NOTEBOOKS == ["convert_and_shard.ipynb", "finetune_lora.ipynb", "quickstart.ipynb"]


# --------------------------------------------------------------------------------------------- demo
def test_demo_keeps_its_workdir_and_the_readme_example_loads_it(env, tmp_path):
    """`mistral4-jax demo` leaves hf/ and converted/ in ./mistral4-demo and says so; the README's Python
    example, run next in the same directory, loads what the demo made and gives the demo's answer again."""
    proc = subprocess.run([sys.executable, "-m", "mistral4_jax.cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "What the demo made is kept in mistral4-demo/" in proc.stdout
    assert sorted(os.listdir(tmp_path / "mistral4-demo")) == ["MISTRAL4_DEMO.txt", "converted", "hf"]
    answer = re.search(r"\[reasoning_effort=high\] .* -> 24 tokens.*\n(?:    reasoning: .*\n)?    content:   (.*)\n",
                       proc.stdout).group(1)
    name, arguments = re.search(r"\[function calling, tool_choice=required\] .* \(tool_calls\) in .*\n    call:      "
                                r"(\w+)\((.*)\)\n", proc.stdout).groups()  # random weights, a well-formed call
    assert name == "get_weather" and json.loads(arguments)["unit"] in ("celsius", "fahrenheit")
    example = re.search(r"## Python API\n\n```python\n(.*?)```", open(os.path.join(REPO, "README.md")).read(), re.S)
    again = subprocess.run([sys.executable, "-c", example.group(1) + "print(repr(answer.content[:200]))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.splitlines()[-1] == answer and len(answer) > 10


def test_demo_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--workdir", str(tmp_path)]) == 1
    assert "holds files that the demo did not write" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["notes.txt"]
    assert demo.DEFAULT_WORKDIR == "mistral4-demo"


# ---------------------------------------------------------------------------------------- notebooks
def _number(text: str) -> float:
    return float(text.replace(",", ""))


def test_quickstart(executed, tmp_path):
    devices = 1
    out = executed("quickstart.ipynb", devices)
    load, chat, image, preprocessing, experts, calling = (o for o in out if o)
    assert re.search(rf"on cpu: {devices} device\(s\)$", load, re.M)
    assert re.search(r"^[\d,]+ parameters; vision tower: True$", load, re.M)
    answers = re.findall(r"^reasoning_effort=(\w+): (\d+) prompt tokens -> (\d+) tokens in", chat, re.M)
    assert [a[0] for a in answers] == ["none", "high"] and all(0 < int(a[2]) <= 24 for a in answers)
    tok = Tokenizer.from_dir(demo.write_synthetic_tekken(tmp_path))  # the demo checkpoint's tokenizer
    question = [{"role": "user", "content": "Is 97 a prime number?"}]
    assert [int(a[1]) for a in answers] == [len(tok.encode_chat(question, reasoning_effort=e)) for e in ("none", "high")]
    # the picture is 200x140: each side rounded up to a multiple of 28 px (patch 14 x merge 2)
    w, h = demo.demo_image().size
    rows, cols = math.ceil(h / 28), math.ceil(w / 28)
    assert preprocessing == f"model input {28 * cols}x{28 * rows} px: {rows}x{cols} [IMG] tokens\n"
    image_prompt = int(re.match(r"(\d+) prompt tokens \(image included\)", image).group(1))
    assert image_prompt > rows * (cols + 1)  # [IMG] per patch, [IMG_BREAK]/[IMG_END] per row, then the text
    tokens, k, per_layer = re.match(r"(\d+) tokens x top-(\d+): \[([\d, ]+)\] expert choices per layer", experts).groups()
    layers = demo.DEMO_TEXT["num_hidden_layers"]
    assert [int(c) for c in per_layer.split(",")] == [int(tokens) * int(k)] * layers  # k experts per token per layer
    # function calling: random weights, yet tool_choice="required" (constrained decoding) gives one well-formed call
    name, arguments = re.search(r"^tool_calls: (\w+)\((.*)\)$", calling, re.M).groups()
    args = json.loads(arguments)
    assert name == "get_weather" and set(args) == {"city", "unit"}
    assert args["unit"] in ("celsius", "fahrenheit") and isinstance(args["city"], str) and len(args["city"]) <= 10
    result = json.loads(re.search(r"^tool result: (.*)$", calling, re.M).group(1))
    assert result == {"city": args["city"], "temperature": 21 if args["unit"] == "celsius" else 70, "unit": args["unit"]}
    finish, content = re.search(r"^final answer \((\w+)\): (.*)$", calling, re.M).groups()
    assert finish == "stop" and set(json.loads(content)) == {"summary", "warm"}  # JSON under the answer's schema


def test_convert_and_shard(executed):
    devices = 8
    out = executed("convert_and_shard.ipynb", devices)
    setup, inspect, plans, parity, greedy = (o for o in out if o)
    assert setup == f"cpu: {devices} device(s)\n"
    assert re.search(r"^dtype +bfloat16$", inspect, re.M)
    assert re.search(rf"^vision +{demo.DEMO_VISION['num_hidden_layers']} layers \+ projector", inspect, re.M)

    # the real model's plans, checked against the config file and the plan's own arithmetic
    real = json.load(open(configs.resolve("mistral-small-4-119b")))
    kv_token = real["num_hidden_layers"] * (real["kv_lora_rank"] + real["qk_rope_head_dim"]) * 2  # bf16 cache
    params, _ = expected_params(Mistral4Config.from_json(configs.resolve("mistral-small-4-119b")),
                                {"data": 1, "expert": 8, "tensor": 2})
    _, bf16_device = expected_params(Mistral4Config.from_json(configs.resolve("mistral-small-4-119b")),
                                     {"data": 1, "expert": 1, "tensor": 8})
    found = re.findall(r"parameters +([\d.]+) B \(([\d.]+) GiB in all\)\nweights per device +([\d.]+) GiB\n"
                       r"KV cache per token +([\d,]+) bytes.*\nKV per device +([\d.]+) GiB for batch 8 x context 32768\n"
                       r"memory per device +([\d.]+) GiB -> (fits|does NOT fit)", plans)
    assert len(found) == 2
    assert found[1][1:3] == (f"{2 * params / 2**30:.1f}", f"{2 * bf16_device / 2**30:.2f}")  # bf16 over tensor=8
    for (billions, total, weights, kv, kv_device, hbm, fits), chips, slots_split in zip(found, (16, 8), (8, 1)):
        assert billions == f"{params / 1e9:.2f}" and 118.5 <= float(billions) <= 119.5  # Mistral-Small-4-119B
        assert float(total) / chips <= float(weights) <= float(total)
        assert _number(kv) == kv_token
        assert float(kv_device) == pytest.approx(8 * 32768 * kv_token / slots_split / 2**30, abs=1e-3)  # slots over expert
        assert (fits == "fits") == (float(weights) + float(kv_device) <= 0.9 * float(hbm))  # 10% reserve

    # the sharded model against one device, on the mesh the devices allow
    lines = re.findall(r"^(data=(\d+),expert=(\d+),tensor=(\d+)): max \|Δlogit\| = (\S+); experts per device (\d+) of (\d+)$",
                       parity, re.M)
    expected = ["data=2,expert=2,tensor=2"]  # every axis split (experts over expert=8: test_sharding.py)
    assert [line[0] for line in lines] == expected
    for spec, data, expert, tensor, diff, per_device, experts in lines:
        assert int(data) * int(expert) * int(tensor) == devices
        assert float(diff) <= 1e-4
        assert int(per_device) * int(expert) == int(experts) == 16
    assert greedy == f"greedy tokens on {expected[-1]} equal to one device: True\n"


def test_finetune_lora(executed):
    """The LoRA notebook on one device: the loss falls, the fine-tuned model answers, the export holds what
    transformers loads (tests/test_train.py checks its logits against transformers)."""
    _, setup, train, _, chat, export = executed("finetune_lora.ipynb", 1)  # install and plot print nothing
    assert re.search(r"on cpu: 1 device\(s\)$", setup, re.M) and "4 conversations" in setup
    first, last, steps = re.search(r"^loss ([\d.]+) -> ([\d.]+) in (\d+) steps$", train, re.M).groups()
    assert int(steps) == 40 and float(last) < 0.7 * float(first)
    assert re.match(r"step 40: '.*'$", chat)
    files = export.split(": ", 1)[1].strip().split(", ")
    assert {"config.json", "model.safetensors", "tekken.json"} <= set(files)
