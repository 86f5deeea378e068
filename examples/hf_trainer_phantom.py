"""Train a small Llama with the Hugging Face ``Trainer`` and DeepSpeed; phantom MLPs come from the config alone.

    deepspeed --num_gpus 2 examples/hf_trainer_phantom.py --deepspeed ds_configs/hf_phantom_zero2.json
    deepspeed --num_gpus 4 examples/hf_trainer_phantom.py --deepspeed ds_configs/hf_phantom_zero3.json

A stock ``Trainer`` script: it never imports ``phantom_plugin`` to train. With the plugin
installed (``pip install phantom_plugin`` or ``pip install -e .``), the ``"phantom_parallel"``
section of the DeepSpeed config turns the Llama's MLPs into phantom MLPs when ``Trainer`` (through
Accelerate) calls ``deepspeed.initialize``, and Accelerate feeds the ranks of each phantom group the
same batches. At the end ``phantom_plugin.deepspeed.to_dense`` turns the trained model back
into a plain ``LlamaForCausalLM`` that ``save_pretrained`` writes as a normal checkpoint.

The data set is built here (no downloads): token sequences ``t_i = (a + b i) mod V`` with random
``a, b``, which a causal LM learns to continue within a few dozen steps.

On a machine without GPUs (``DS_ACCELERATOR=cpu``), Accelerate enables DeepSpeed only on an
accelerator; :func:`cpu_prelude` creates its state with gloo first (the one non-stock part, and
only on CPU).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

VOCAB, SEQ = 64, 32


class Progressions(Dataset):
    """``n`` sequences ``(a + b i) mod VOCAB``, ``i < SEQ``; labels are the inputs (causal LM)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        a = torch.randint(0, VOCAB, (n, 1), generator=g)
        b = torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (a + b * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def build_model(hidden: int = 64, width: int = 128, layers: int = 2):
    """A small ``LlamaForCausalLM`` from a config, the same on every rank (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=SEQ, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def cpu_prelude() -> dict:
    """On CPU: Accelerate's state with DeepSpeed and gloo, before ``TrainingArguments``.

    Returns the ``accelerator_config`` that makes ``Trainer`` use that state (``{}`` on GPUs).
    """
    if torch.cuda.is_available():
        return {}
    import accelerate
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    accelerate.PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def training_args(args, **extra):
    from transformers import TrainingArguments
    return TrainingArguments(
        output_dir=args.output_dir, deepspeed=args.deepspeed, max_steps=args.steps,
        per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=0.01,
        lr_scheduler_type="constant", max_grad_norm=1.0, logging_steps=args.log_every,
        save_strategy="no", report_to=[], seed=0, data_seed=0, disable_tqdm=True,
        **cpu_prelude(), **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deepspeed", required=True, help="DeepSpeed JSON config")
    ap.add_argument("--local_rank", type=int, default=-1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--log_every", type=int, default=10)
    ap.add_argument("--output_dir", default="runs/hf_trainer_phantom")
    ap.add_argument("--export_dir", default="runs/hf_trainer_phantom/dense")
    args = ap.parse_args()

    from transformers import Trainer
    targs = training_args(args)
    trainer = Trainer(model=build_model(), args=targs, train_dataset=Progressions(2048))
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rank0 = dist.get_rank() == 0 if dist.is_initialized() else True
    if rank0:
        print(f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {result.global_step} steps", flush=True)

    engine = trainer.model_wrapped
    if getattr(engine, "phantom", None) is not None:          # the plugin converted the model
        from phantom_plugin.deepspeed import to_dense
        if rank0:
            print(engine.phantom.describe(), flush=True)
        model = to_dense(engine)                                # collective: every rank
    else:
        model = trainer.model
    if rank0:
        model.save_pretrained(args.export_dir)
        print(f"dense checkpoint: {args.export_dir} ({type(model.model.layers[0].mlp.up_proj).__name__} "
              "MLP layers)", flush=True)


if __name__ == "__main__":
    main()
    if dist.is_initialized():     # gloo ranks that skip this can abort at exit (pytorch#190489)
        dist.destroy_process_group()
