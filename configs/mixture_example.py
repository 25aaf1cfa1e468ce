"""A FLAN-style mixture: a templated NLI JSONL task, a TFDS QA task and a chat task, capped and packed.

    python scripts/make_example_data.py --out data/example
    jaxtune data preview --config configs/mixture_example.py
    jaxtune train --config configs/mixture_example.py --workdir runs/mixture

Rates are examples-proportional with a cap of 600 examples per task (nli has 2000 records, so it
counts as 600; chat 500; qa 1000 -> 600). `--config.data.tasks.nli.cap=...`,
`--config.data.mixture.mode=temperature` etc. change the mixture from the command line.
"""

from jaxtune.config import base_config, task_config


def get_config(arg=None):
    data = arg or "data/example"
    c = base_config()
    c.model.variant = "tiny"
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 64, 128, 2
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    c.data.seq_len = 256
    c.data.tokenizer_vocab_size = 512
    c.data.packing_strategy = "best_fit"
    c.data.tasks.nli = task_config(
        path=f"{data}/nli.jsonl", templates="nli", options_style="random", few_shot=2,
        fields={"premise": "sentence1", "hypothesis": "sentence2", "answer": "label", "options": "choices"},
    )
    c.data.tasks.qa = task_config(source="tfds", path="jaxtune_example_qa", split="train", data_dir=f"{data}/tfds",
                                  templates="closed_qa")
    c.data.tasks.chat = task_config(path=f"{data}/chat.jsonl", format="chat", chat_template="chatml")
    c.data.mixture.cap = 600
    c.train.steps = 200
    c.train.global_batch_size = 16
    c.train.checkpoint_every = 100
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.mesh.rules = "dp"
    return c
