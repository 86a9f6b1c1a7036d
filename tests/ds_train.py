"""Train a tiny Hugging Face model a few steps with real DeepSpeed (ZeRO, gloo, CPU) and save its checkpoints.

    python tests/ds_train.py OUT --family llama --stage 3 --world 2 --steps 2 --save-at 1,2

Spawns ``--world`` processes (torch.multiprocessing, gloo); every rank runs ``deepspeed.initialize`` and
``engine.save_checkpoint(OUT)`` after each step in ``--save-at`` (tags ``global_stepN``, ``latest`` names the last).
Rank 0 then writes, for every saved tag, the same weights as DeepSpeed itself consolidates them
(``get_fp32_state_dict_from_zero_checkpoint``: DeepSpeed's reference, not curvdist's reader) as a safetensors model
``OUT/hf-global_stepN`` with its config.json, and config.json into OUT (what ``model.path=OUT`` reads).

From a test: ``launch(OUT, "--family", "gpt2", ...)`` starts it as a subprocess (the tests' fixtures share it).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

SIZES = {  # family → config kwargs; "big" sizes one stage visibly below the whole model (memory test)
    "llama": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True),
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0),
    "llama-big": dict(vocab_size=64, hidden_size=384, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False),
}


# curvdist run overrides of the tests that measure these checkpoints (tests/test_zero.py, tests/test_trajectory.py):
# float64 throughout, K = 6, 4 synthetic sequences of 16 tokens in micro-batches of 2
RUN = ["model.dtype=float64", "stat_dtype=float64", "top_k=6", "data.source=synthetic", "data.sequences=4",
       "data.seq_len=16", "data.micro_batch=2", "plots=false"]

def make_model(family: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if family.startswith("llama"):
        return LlamaForCausalLM(LlamaConfig(**SIZES[family]))
    return GPT2LMHeadModel(GPT2Config(**SIZES[family]))


def _rank(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = make_model(args.family)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=config)
    g = torch.Generator().manual_seed(100 + rank)
    vocab = model.config.vocab_size
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if step in args.save_at:
            engine.save_checkpoint(args.out, tag=f"global_step{step}")
    torch.distributed.barrier()


def consolidate(out: Path, family: str, tags: list[str]) -> None:
    """``hf-<tag>``: DeepSpeed's own fp32 consolidation of each tag, saved as safetensors with config.json."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model = make_model(family)
    for tag in tags:
        state = get_fp32_state_dict_from_zero_checkpoint(str(out), tag=tag)
        model.load_state_dict(state, strict=False)
        model.save_pretrained(out / f"hf-{tag}")


def launch(out: Path, *args: str) -> subprocess.Popen:
    """This script on ``out`` with ``args``, as a subprocess (stdout and stderr together, text)."""
    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=str(here.parent))
    return subprocess.Popen([sys.executable, str(here / "ds_train.py"), str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--family", default="llama", choices=sorted(SIZES))
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--save-at", default="")
    p.add_argument("--no-consolidate", action="store_true")
    args = p.parse_args(argv)
    args.save_at = {int(s) for s in args.save_at.split(",") if s} or {args.steps}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp
    mp.start_processes(_rank, args=(args, port), nprocs=args.world, start_method="spawn")
    make_model(args.family).config.save_pretrained(args.out)
    if not args.no_consolidate:
        consolidate(args.out, args.family, [f"global_step{s}" for s in sorted(args.save_at)])


if __name__ == "__main__":
    sys.exit(main())
