"""Two gloo ranks building and reusing the encoded-data store, started as DeepSpeed's launcher starts them (LOCAL_SIZE,
no LOCAL_WORLD_SIZE): the node's leader decides for both, even when another job installs the store between two
ranks' looks; on reuse only rank 0 reads the data and only the leader looks at the cache."""

import json
import os
import subprocess
import sys

from helpers import make_dataset, write_config
from vlmtune.launch import free_port

RANK = r"""
import datetime, json, sys, time
import torch.distributed as dist
from vlmtune.config import load_config
from vlmtune.data.loader import load_datasets
from vlmtune.data.processor import load_processor
from vlmtune.data import store
from vlmtune.launch import Ranks, node_ranks
from vlmtune.train import prepare

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=40))
ranks = node_ranks()
cfg = load_config(sys.argv[1])
processor = load_processor(cfg.model.model_name_or_path, max_pixels=cfg.model.image_max_pixels)
convs = load_datasets("my_dataset", cfg.data.dataset_dir, None).conversations
if ranks.rank == 1:  # another job installs the store after the leader looked for it, before this rank would look
    deadline = time.time() + 60
    while not list(store.cache_root().glob(".*.building-*")) and time.time() < deadline:
        time.sleep(0.01)
    store.open_or_build(convs, processor, cfg.data.cutoff_len, None, Ranks(), 1)
built, reused = store.open_or_build(convs, processor, cfg.data.cutoff_len, None, ranks, 1)
if ranks.rank == 1:  # on reuse, rank 1 neither reads the data nor computes the store's key
    def refuse(*args, **kwargs):
        raise AssertionError("rank 1 read the data")
    prepare.load_splits = store.store_key = refuse
data = prepare.prepare_data(cfg, processor, lambda *_: None, ranks)
print(json.dumps({"rank": ranks.rank, "node": [ranks.local_rank, ranks.local_world], "built": [str(built.directory),
                  reused], "prepared": [str(data.train.store.directory), len(data.train)]}), flush=True)
dist.destroy_process_group()
"""


def test_the_nodes_leader_decides_for_its_ranks(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    cfg = write_config(tmp_path / "cfg.yaml", model_name_or_path=str(tiny_model_dir), dataset_dir=str(data),
                       output_dir=str(tmp_path / "out"), image_max_pixels=40000, overwrite_cache=False, val_size=0)
    port, processes = free_port(), []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", VLMTUNE_CACHE=str(tmp_path / "cache"), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_SIZE="2")
        processes.append(subprocess.Popen([sys.executable, "-c", RANK, str(cfg)], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = [p.communicate(timeout=180) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-3000:] for _, err in outputs]
    rows = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [r["node"] for r in rows] == [[0, 2], [1, 2]]  # both on one node, whatever the launcher's variables
    assert rows[0]["built"] == rows[1]["built"] and rows[0]["built"][1] is False  # one decision, one store
    assert rows[0]["prepared"] == rows[1]["prepared"] == [rows[0]["built"][0], 4]  # reused, rank 1 without reading
    encoded = tmp_path / "cache" / "encoded"
    assert [p.name for p in encoded.iterdir()] == [rows[0]["built"][0].rsplit("/", 1)[1]]  # no build left behind
