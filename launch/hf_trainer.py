"""A plain transformers.Trainer script, with ZOTrainer where Trainer was: MeZO on Rotten Tomatoes text.

    python launch/hf_trainer.py                                   # tiny Llama, one process, seconds
    python launch/hf_trainer.py --model smollm2-135m --max_steps 100
    deepspeed --num_gpus 2 launch/hf_trainer.py --deepspeed ds_configs/zero3_mezo.json --model /data/opt-1.3b
    torchrun --nproc_per_node 2 launch/hf_trainer.py --use_cpu    # CPU replicas (gloo)
    accelerate launch --config_file launch/accelerate_zero3.yaml launch/hf_trainer.py   # GPUs
    accelerate launch --config_file launch/accelerate_fsdp2.yaml launch/hf_trainer.py   # GPUs

Everything but the ZOTrainer line is what a Trainer user writes (see README, "Inside
transformers.Trainer"). With --deepspeed the JSON's "optimizer" section names the zoscale optimizer.
"""

import argparse

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments

from zoscale.data.sources import load_rotten_tomatoes
from zoscale.hf import ZOTrainer
from zoscale.models import MODEL_NAMES, load_causal_lm

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="tiny-llama", help=f"a Hugging Face folder or hub name, or {MODEL_NAMES}")
parser.add_argument("--deepspeed", help="DeepSpeed JSON (its 'optimizer' section names the zoscale optimizer)")
parser.add_argument("--output_dir", default="runs/hf_trainer")
parser.add_argument("--max_steps", type=int, default=20)
parser.add_argument("--per_device_train_batch_size", type=int, default=8)
parser.add_argument("--learning_rate", type=float, default=5e-5)
parser.add_argument("--save_steps", type=int, default=10)
parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in output_dir")
parser.add_argument("--use_cpu", action="store_true")
parser.add_argument("--local_rank", type=int, default=-1)  # the deepspeed launcher passes it
cli = parser.parse_args()

# TrainingArguments first: under ZeRO-3, from_pretrained then builds the model partitioned.
args = TrainingArguments(output_dir=cli.output_dir, max_steps=cli.max_steps, learning_rate=cli.learning_rate,
                         per_device_train_batch_size=cli.per_device_train_batch_size, per_device_eval_batch_size=16,
                         lr_scheduler_type="constant", logging_steps=5, save_strategy="steps", save_steps=cli.save_steps,
                         report_to=[], deepspeed=cli.deepspeed, use_cpu=cli.use_cpu, max_grad_norm=0.0)
if cli.model in MODEL_NAMES:  # zoscale's bundled names (the tiny models are built in code)
    model, tokenizer = load_causal_lm(cli.model)
else:
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    model = AutoModelForCausalLM.from_pretrained(cli.model)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token

texts = Dataset.from_list([{"text": r["sentence"]} for r in load_rotten_tomatoes()[:1024]])
tokens = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=64), batched=True,
                   remove_columns=["text"]).train_test_split(test_size=64, seed=0)

trainer = ZOTrainer(model=model, args=args, train_dataset=tokens["train"], eval_dataset=tokens["test"],
                    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                    # Under DeepSpeed (--deepspeed, or accelerate launch with a DeepSpeed config) the
                    # JSON names the optimizer; else this (lr: --learning_rate).
                    zo_config=None if args.deepspeed_plugin else {"type": "MeZO", "params": {"eps": 1e-3}})
before = trainer.evaluate()["eval_loss"]
trainer.train(resume_from_checkpoint=True if cli.resume else None)
after = trainer.evaluate()["eval_loss"]
trainer.save_model(f"{cli.output_dir}/final")
if trainer.is_world_process_zero():
    engine = f"{type(trainer.zo_optimizer).__name__} on {type(trainer.zo_engine).__name__}, {args.world_size} rank(s)"
    print(f"held-out loss {before:.4f} -> {after:.4f} ({engine}); model in {cli.output_dir}/final")
