"""selkv caches under transformers' tensor parallelism (``tp_plan="auto"``), on CPU with two gloo processes.

Each rank's attention computes only its shard of the key/value heads, so each rank's cache must hold
that shard (sized from the ``key_states`` it receives, not from the config's head count) and selkv's
attention must group query heads by the local ratio. The two-process run must give the greedy tokens
of the single-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support.models import tiny_llama_config

import selkv
from selkv.kernels import reference

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
NUM_ATTENTION_HEADS, NUM_KEY_VALUE_HEADS, WORLD_SIZE = 8, 4, 2
# "cuda" runs both processes' ranks on GPUs 0 and 1 (NCCL, the fused kernel); the default keeps them on CPU (gloo).
DEVICE = os.environ.get("SELKV_TP_DEVICE", "cpu")


def _varied_tiny_llama():
    """A tiny random Llama whose greedy tokens vary (the default init repeats a token or two)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(num_key_value_heads=NUM_KEY_VALUE_HEADS, num_attention_heads=NUM_ATTENTION_HEADS)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _run(command: list[str], out_dir: str) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join([SRC, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["SELKV_TP_DEVICE"] = DEVICE
    if DEVICE == "cpu":  # transformers puts each rank on a GPU when it sees one
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    """(single-process results, [rank 0 results, rank 1 results]) of tests/tp_worker.py."""
    if DEVICE == "cuda" and torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"SELKV_TP_DEVICE=cuda needs {WORLD_SIZE} GPUs")
    root = tmp_path_factory.mktemp("tp")
    model_dir, single_dir, tp_dir = (str(root / name) for name in ("model", "single", "tp"))
    os.makedirs(single_dir), os.makedirs(tp_dir)
    _varied_tiny_llama().save_pretrained(model_dir)
    worker = os.path.join(HERE, "tp_worker.py")
    _run([sys.executable, worker, model_dir, single_dir], single_dir)
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={WORLD_SIZE}",
            worker,
            model_dir,
            tp_dir,
        ],
        tp_dir,
    )

    def read(path: str) -> dict:
        with open(path) as f:
            return json.load(f)

    return read(os.path.join(single_dir, "rank0.json")), [
        read(os.path.join(tp_dir, f"rank{r}.json")) for r in range(WORLD_SIZE)
    ]


def test_tensor_parallel_greedy_tokens_equal_single_process(tp_runs):
    single, ranks = tp_runs
    assert single["tp_size"] == 1 and all(rank["tp_size"] == WORLD_SIZE for rank in ranks)
    for name, expected in single["cases"].items():
        for rank, results in enumerate(ranks):
            assert results["cases"][name]["tokens"] == expected["tokens"], f"{name}: rank {rank}"
    # Not trivially equal: every row's tokens vary, so a rank that attends wrongly changes them.
    for name, expected in single["cases"].items():
        assert all(len(set(row)) >= 8 for row in expected["tokens"]), (name, expected["tokens"])


def test_tensor_parallel_cache_holds_the_local_heads(tp_runs):
    single, ranks = tp_runs
    local_heads = NUM_KEY_VALUE_HEADS // WORLD_SIZE
    for name, expected in single["cases"].items():
        assert expected["heads"] == [NUM_KEY_VALUE_HEADS] * len(expected["heads"]), name
        for results in ranks:
            assert results["cases"][name]["heads"] == [local_heads] * len(expected["heads"]), name
        # Each rank holds half of every tensor: the ranks' bytes add up to the single process's.
        for key, total in expected["kv_bytes"].items():
            assert sum(results["cases"][name]["kv_bytes"][key] for results in ranks) == total, (name, key)


@pytest.mark.parametrize("max_cache_len", [None, 64])
def test_cache_sizes_itself_from_the_key_states_not_the_config(max_cache_len):
    """A rank's key_states carry half of the config's key/value heads: the cache and the decode read follow them."""
    config = tiny_llama_config(num_key_value_heads=NUM_KEY_VALUE_HEADS, num_attention_heads=NUM_ATTENTION_HEADS)
    config._attn_implementation = "selkv"
    cache = selkv.make_cache("quant:bits=8,sink=4,window=8,block=4", config, max_cache_len=max_cache_len)
    local_heads, head_dim = NUM_KEY_VALUE_HEADS // WORLD_SIZE, config.head_dim
    prompt = torch.randn(2, local_heads, 30, head_dim)
    cache.update(prompt, prompt.clone(), 0)
    step = torch.randn(2, local_heads, 1, head_dim)
    cache.update(step, step.clone(), 0)
    layer = cache.layers[0]
    assert layer.num_key_value_heads == local_heads
    storage = layer.decode_storage()
    assert (
        storage.sink_keys.shape[1] == storage.recent_keys.shape[1] == storage.middle.key_codes.shape[1] == local_heads
    )
    # Local query heads (half of them) against the local key/value heads: groups of
    # NUM_ATTENTION_HEADS // NUM_KEY_VALUE_HEADS, as in the single-process model.
    query = torch.randn(2, NUM_ATTENTION_HEADS // WORLD_SIZE, 1, head_dim)
    out = reference.selective_decode_attention(query, storage)
    keys, values = layer._read_stored(layer.num_stored)  # what the reference's attention reads, dequantized
    keys = torch.cat([storage.sink_keys[:, :, : layer.num_sink], keys.float(), _window(layer, "keys")], dim=-2)
    values = torch.cat([storage.sink_values[:, :, : layer.num_sink], values.float(), _window(layer, "values")], dim=-2)
    group = NUM_ATTENTION_HEADS // NUM_KEY_VALUE_HEADS
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    )
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def _window(layer, which: str) -> torch.Tensor:
    """The window's tokens oldest first (the static layer keeps them in a ring)."""
    buffer = getattr(layer, f"recent_{which}")
    if getattr(layer, "lengths", None) is None:
        return buffer[:, :, : layer.num_recent]
    start = int(layer.lengths[3])
    order = torch.remainder(start + torch.arange(layer.num_recent), buffer.shape[2])
    return buffer.index_select(2, order)
