"""An objective that reads its own record format, in one file: language modelling on raw text.

Records are JSON lines `{"text": "..."}` (no prompt, no template): every token of the text is
trained on, one record per row (truncated to `data.seq_len`, padded after). The file is both the
objective and a config, so it runs as it is:

    jaxtune train --config docs/examples/text_objective.py --workdir runs/text

Loading this file registers the objective (`@base.register`) before `base_config()` lists the
config keys, so `objective.text.text_eos` is an ordinary key (`--config.objective.text.text_eos=false`).
"""

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from jaxtune.config import base_config, parse_arg
from jaxtune.data import pipeline, tokenizers
from jaxtune.data.sources import JsonlSource, SourceError
from jaxtune.objectives import base
from jaxtune.objectives.sft import SFT  # reuse SFT's batch shapes, weight (trained tokens) and loss


@dataclasses.dataclass
class TextData:
    tokenizer: tokenizers.Tokenizer  # load_data's result must have a `.tokenizer` (it sizes the model's vocab)
    records: JsonlSource


@base.register("text")
class PlainText(SFT):
    """Next-token cross-entropy on every token of `{"text": ...}` records."""

    @classmethod
    def config_section(cls):
        c = ml_collections.ConfigDict()
        c.text_eos = True  # -> config.objective.text.text_eos: end each text with EOS
        return c

    def load_data(self, workdir):
        d = self.config.data
        records = JsonlSource(d.train_path)
        if d.tokenizer:
            return TextData(tokenizers.load_tokenizer(d.tokenizer), records)
        model = Path(workdir) / "tokenizer.model"  # single process: trained once into the workdir
        if not model.is_file():
            Path(workdir).mkdir(parents=True, exist_ok=True)
            texts = [_text(records[i]) for i in range(len(records))]
            tokenizers.train_sentencepiece(texts, model.with_suffix(""), vocab_size=d.tokenizer_vocab_size)
        return TextData(tokenizers.load_tokenizer(model), records)

    def train_dataset(self, data, *, batch_size, process_index, process_count):
        seq_len, tokenizer = self.config.data.seq_len, data.tokenizer

        def example(index, record):  # (stream index, record) -> one padded row with the batch keys
            ids = tokenizers.encode_prompt(tokenizer, _text(record))  # BOS as the tokenizer says, then the text
            ids = (ids + [tokenizer.eos_id] if self.section.text_eos else ids)[: seq_len + 1]
            n = len(ids) - 1
            row = {k: np.zeros(seq_len, np.int32) for k in pipeline.BATCH_KEYS}
            row["inputs"][:n], row["targets"][:n] = ids[:-1], ids[1:]
            row["loss_mask"][:n] = row["segment_ids"][:n] = 1
            row["positions"][:n] = np.arange(n)
            return row

        stream = pipeline.record_stream([data.records], [example], seed=self.config.seed,
                                        process_index=process_index, process_count=process_count)
        return stream.batch(batch_size, drop_remainder=True), None

    def eval_set(self, data):
        return None  # no held-out set in this example

    def data_report(self, stats):
        return []


def _text(record):
    if not isinstance(record.get("text"), str) or not record["text"]:
        raise SourceError(f"{record['_where']}: expected a non-empty string field 'text'")
    return record["text"]


def get_config(arg=None):
    args = parse_arg(arg, train_path=str(Path(__file__).with_name("text_data.jsonl")), steps=20)
    c = base_config()
    c.objective.type = "text"
    c.data.train_path = args["train_path"]
    c.data.seq_len = 64
    c.data.tokenizer_vocab_size = 300
    c.model.variant = "tiny"
    c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 64, 128, 2
    c.model.num_heads, c.model.num_kv_heads = 4, 2
    c.train.steps = args["steps"]
    c.train.global_batch_size = 8
    c.train.eval_every = 0
    c.optim.lr = 3e-3
    c.mesh.rules = "dp"
    return c
