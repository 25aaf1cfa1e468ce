"""The config schema: every shared key with its default, and the task builders.

A config is a Python file with `get_config(arg: str | None) -> ml_collections.ConfigDict`.
`base_config()` holds every key jaxtune understands outside the objectives, so config files only
set what differs and a typo is caught (with the closest valid key) before anything compiles.
The objective's own keys live in `objective.<name>`, declared by that objective
(jaxtune/objectives/, `config_section`) and added for the selected `objective.type` only when the
config is loaded (config/loading.py). Checks that need other modules are in jaxtune/validation.py.
"""

from __future__ import annotations

import ml_collections

from jaxtune.config.keys import unknown_key_error


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default; config files derive from this rather than copying it."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.family = "llama"
    c.model.variant = "tiny"
    # A Hugging Face model dir (config.json + safetensors): when set, the architecture comes from
    # it (family/variant/architecture overrides are ignored), params start from its weights and
    # its tokenizer is used unless data.tokenizer is set.
    c.model.hf_dir = ""
    # The workdir of an earlier jaxtune run (e.g. SFT): params start from its latest checkpoint
    # (optimizer state and step start fresh). The architecture must match this config's.
    c.model.init_from = ""
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.param_dtype = "float32"  # master weights
    c.model.remat_policy = "none"  # none | full | projections | offload | dots | dots_no_batch (README "Memory")
    # How attention is computed (jaxtune/models/attention.py): auto picks splash on TPU, cuDNN on
    # GPU where it applies (else blockwise), and on CPU the einsum for short rows, blockwise above.
    c.model.attention = "auto"  # auto | splash | blockwise | cudnn | pallas_gpu | reference
    # How the decoder layers run (jaxtune/models/layers.py): auto unrolls them on CPU (no stacked
    # residual copies; compile time grows with depth) and scans them elsewhere. Same maths either way.
    c.model.layer_loop = "auto"  # auto | scan | unrolled
    # Architecture overrides on top of the variant; None keeps the variant's value.
    # vocab_size None means "take it from the tokenizer" when the variant is trained from scratch.
    c.model.vocab_size = ml_collections.FieldReference(None, field_type=int)
    c.model.hidden_size = ml_collections.FieldReference(None, field_type=int)
    c.model.intermediate_size = ml_collections.FieldReference(None, field_type=int)
    c.model.num_layers = ml_collections.FieldReference(None, field_type=int)
    c.model.num_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.num_kv_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.head_dim = ml_collections.FieldReference(None, field_type=int)
    c.model.max_position_embeddings = ml_collections.FieldReference(None, field_type=int)
    c.model.rope_theta = ml_collections.FieldReference(None, field_type=float)
    c.model.tie_word_embeddings = ml_collections.FieldReference(None, field_type=bool)

    c.data = ml_collections.ConfigDict()
    # A built-in generated dataset instead of files: "" (read data.train_path, JSONL, or data.tasks) |
    # quickstart (configs/quickstart.py's task) | verifiable (built-in RL problems, data/builtin/verifiable.py)
    # | clusters (FLAN task clusters with held-out ones, data/builtin/clusters.py).
    c.data.builtin = ""
    c.data.train_path = ""
    c.data.eval_path = ""
    # Where data.train_path / data.eval_path are read from (data/sources.py SOURCE_KINDS): jsonl, or hf
    # (a 🤗 dataset id "org/name" or a local dataset folder; data.name its config, data.split /
    # data.eval_split its splits, slicing such as "train[:10%]" allowed, data.revision a branch/tag/commit).
    c.data.source_kind = "jsonl"
    c.data.name = ""
    c.data.split = "train"
    c.data.eval_split = "test"
    c.data.revision = ""
    # How data.train_path's records are read (data/formats.py FORMATS): auto detects TRL's dataset
    # formats (text, prompt/completion, messages) and plain fields; see docs/guides/data.md.
    c.data.format = "auto"
    # FLAN-style (input_pattern, target_pattern) pairs with {field} placeholders; one is chosen
    # per example from a seeded RNG.
    c.data.templates = (("{prompt}", "{response}"),)
    c.data.seq_len = 128
    c.data.packing = True  # preference/KTO: packed pairs (padding-free DPO), see data.max_pairs_per_row
    c.data.shuffle = True
    c.data.word_dropout = 0.0  # drop template (instruction) words in training prompts
    c.data.truncation = "truncate"  # truncate | drop | error
    c.data.tokenizer = ""  # path to a tokenizer file; "" trains one on the data (quickstart)
    c.data.tokenizer_vocab_size = 512
    # BOS before each prompt: auto = as the tokenizer's own config says (tokenizer.json post-processor,
    # add_bos_token beside a sentencepiece .model; chat templates write their own) | true | false.
    c.data.add_bos = "auto"
    c.data.num_train_examples = 100_000  # quickstart: generated training records
    c.data.num_eval_examples = 300  # quickstart: held-out phrasings evaluated by exact match
    c.data.verifiable_families = ("arithmetic", "constraints")  # data.builtin=verifiable: problem families
    # data.builtin=clusters (data/builtin/clusters.py): the training clusters (() = all six; the held-out
    # ones are never trained on) and training phrasings per task (0 = all 21, 1 = FLAN's one-template ablation).
    c.data.clusters = ()
    c.data.templates_per_task = 0
    # Built-in arithmetic problems take min..max operations (3 operations: ~20x more distinct problems,
    # too many to memorise; RL then has to improve the arithmetic itself, see README's RL section).
    c.data.verifiable_min_steps = 1
    c.data.verifiable_max_steps = 2
    c.data.worker_count = 0  # Grain multiprocessing workers (0 = in-process)
    c.data.read_threads = 0  # Grain reader threads (0 = read in the training thread)
    c.data.prefetch = 0  # elements prefetched by the reader threads
    c.data.on_error = "error"  # bad records (malformed JSON, wrong types, empty targets): error | skip (counted)
    c.data.packing_strategy = "first_fit"  # first_fit | best_fit
    c.data.packing_bins = 0  # open bins the packer fills at once; 0 = the per-process batch size
    # Slices of the data stream, each packed on its own (0 = one per process). A fixed count, divisible
    # by every process count you use, makes packed batches (and losses) independent of the process count.
    c.data.shards = 0
    # Packed preference pairs: rows of 2 * data.seq_len tokens (the room of one padded pair) hold whole
    # pairs, at most this many; per-pair arrays in a batch are [rows, max_pairs_per_row].
    c.data.max_pairs_per_row = 16
    # Packed preference pairs per step: "pairs" = exactly train.global_batch_size pairs per step, as
    # without packing (packing only removes padding; the rows a step takes come from a few buckets
    # set by the data's lengths) | "rows" = train.global_batch_size packed rows of up to
    # max_pairs_per_row pairs each (more, and a varying number of, pairs per step).
    c.data.pair_batching = "pairs"
    # Preference/KTO/GRPO records with chat `messages`: a built-in name (llama3, gemma, chatml, qwen, alpaca,
    # plain), a jinja string, a .jinja file or a tokenizer_config.json; "" = the tokenizer's own template.
    # GRPO: when set, plain prompts are sent as the user turn through it too.
    c.data.chat_template = ""
    # Several tasks (FLAN-style templated files, TFDS, chat), mixed: a ConfigDict keyed by task name
    # whose values come from task_config(...). When empty, the single task above (data.train_path +
    # data.templates) is used.
    c.data.tasks = ml_collections.ConfigDict()
    c.data.mixture = ml_collections.ConfigDict()
    c.data.mixture.mode = "examples_proportional"  # examples_proportional | weights | temperature
    c.data.mixture.cap = 0  # examples_proportional/temperature: examples counted per task at most (0 = no cap)
    c.data.mixture.temperature = 1.0  # temperature mode: rate ~ min(n, cap) ** (1 / temperature)
    # Before training, drop training records that share a word n-gram with an evaluation set
    # (jaxtune/datatools/screen.py; report in WORKDIR/data_screen.json). The evaluation sets are the
    # config's own (eval.tasks, data.eval_path, eval.mc_path) plus eval_files / eval_tfds.
    c.data.decontaminate = ml_collections.ConfigDict()
    c.data.decontaminate.enabled = False
    c.data.decontaminate.n = 13  # words per n-gram (GPT-3, Tulu 3)
    c.data.decontaminate.fraction = 0.0  # 0: one shared n-gram contaminates; > 0: this fraction of a record's n-grams
    c.data.decontaminate.fields = ()  # training fields compared; () = every string in the record
    c.data.decontaminate.eval_fields = ()  # evaluation fields compared; () = every string
    c.data.decontaminate.eval_files = ()  # more evaluation sets: JSONL files
    c.data.decontaminate.eval_tfds = ()  # more evaluation sets: prepared TFDS splits, "name:split"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.global_batch_size = 64
    c.train.grad_accum_steps = 1
    c.train.log_every = 10
    c.train.eval_every = 0  # 0 = only before and after training
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    c.train.z_loss = 0.0
    # The loss runs the LM head this many sequence positions at a time (per device it holds
    # [batch per device, logits_chunk, vocab] float32 logits, never [batch, seq_len, vocab]);
    # also used by evaluation log-likelihoods. 0 = unchunked (full logits).
    c.train.logits_chunk = 512
    c.train.max_seconds = 0.0  # >0: time budget; stop early, checkpoint, run the final eval
    c.train.progress_bar = True
    # A step whose loss or gradients are not finite: "halt" saves a diagnostic checkpoint
    # (WORKDIR/diagnostics/step_N) and exits with status 3; "skip" drops that update and goes on.
    c.train.nonfinite = "halt"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.schedule = "cosine"  # cosine | linear | constant
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1  # final lr as a fraction of lr (cosine/linear)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0  # 0 disables clipping

    # Parameter-efficient fine-tuning (jaxtune/peft): adapters train, the base stays frozen and
    # is not checkpointed (the config points to it: model.hf_dir, or family/variant + seed).
    c.peft = ml_collections.ConfigDict()
    c.peft.method = "none"  # none (full fine-tuning) | lora | dora | prefix
    c.peft.rank = 8
    c.peft.alpha = 16.0
    c.peft.dropout = 0.0  # on the adapter input, training only
    c.peft.rslora = False  # scaling alpha/sqrt(rank) instead of alpha/rank
    c.peft.targets = "q,k,v,o"  # comma list of q,k,v,o,gate,up,down (T5: q,k,v,o,wi|wi_0,wi_1,wo), or "all-linear"
    c.peft.quantize = "none"  # none | nf4 | int8: QLoRA base weights (the blocks' projections)
    c.peft.quant_block_size = 64
    c.peft.prefix_length = 16  # prefix: learned key/value slots per layer (PEFT num_virtual_tokens)
    c.peft.prefix_projection = 0  # prefix: >0 trains them through an MLP of this hidden size (0: directly)
    # dtype the frozen base is held in: "" = model.param_dtype; "bfloat16" halves its memory on
    # accelerators (adapters and their optimizer state stay in model.param_dtype).
    c.peft.base_dtype = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 takes the devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = "fsdp"  # dp | fsdp | fsdp_tp
    # Multi-slice TPU jobs (devices on several slices joined by the data-centre network): the sizes
    # above are per slice (ICI) and these are across slices (DCN); each mesh axis is their product.
    # -1 takes the slices left over, so by default slices are data parallel. Ignored on one slice.
    c.mesh.dcn_data = -1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_tensor = 1

    # objective.type: sft | dpo (paired preference losses) | kto (unpaired KTO) | reward | grpo.
    # The selected objective's own keys are objective.<type>.* (e.g. objective.dpo.beta): declared by
    # it (jaxtune/objectives/<module>.py, config_section) and added when the config is loaded. A
    # config file sets them as a dict, e.g. `c.objective.dpo = dict(beta=0.1)`.
    c.objective = ml_collections.ConfigDict()
    c.objective.type = "sft"

    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 12
    c.eval.batch_size = 128
    c.eval.show_examples = 6
    # Evaluations on the held-out set (data.eval_path / quickstart), before/after training, every
    # train.eval_every steps, and by `jaxtune eval`; results in eval/step_<n>.json + eval/... metrics.
    c.eval.loss = True  # token-weighted loss / perplexity of the held-out answers
    c.eval.generative = True  # greedy generation scored by exact match and token F1
    c.eval.num_shots = (0,)  # FLAN-style k-shot prompts (same-task solved examples first)
    c.eval.stop_strings = ()  # generation is cut at the first of these (besides EOS)
    c.eval.mc_path = ""  # JSONL multiple-choice set: fields + options + answer (index or text)
    c.eval.mc_templates = (("{prompt}", " {option}"),)  # prompt pattern, option pattern
    c.eval.peak_tflops = 0.0  # per device, for MFU; 0 = look up the device kind
    # Named held-out tasks (never trained on), keyed by name: eval_task_config(metric=..., <task_config keys>).
    c.eval.tasks = ml_collections.ConfigDict()
    # lm-evaluation-harness tasks scored with the other evaluations (needs jaxtune[harness]); metrics
    # eval/harness/<task>/<metric>. "" = none; e.g. "arc_easy,my_task" with harness_include="my_tasks/"
    c.eval.harness = ""
    c.eval.harness_include = ""  # folder of extra lm-eval task YAMLs
    c.eval.harness_limit = 0  # documents per task; 0 = all
    c.eval.harness_num_fewshot = -1  # -1 = each task's own default
    return c


def task_config(**overrides) -> ml_collections.ConfigDict:
    """One task of `config.data.tasks`: every key with its default; a misspelt key names the closest one.

    A task = source (where its records come from; the kinds are data/sources.py's SOURCE_KINDS) +
    field mapping + record format + template set (or chat template) + policies.
    """
    t = ml_collections.ConfigDict()  # defaults; `overrides` replace them below (any value type)
    t.source = "jsonl"  # jsonl | json | parquet | array_record | tfds | hf (data/sources.py SOURCE_KINDS)
    # file path (local or gs://...; globs for array_record), the TFDS dataset name, or (hf) a 🤗 dataset
    # id "org/name" or a local dataset folder (save_to_disk output or a folder of data files)
    t.path = ""
    t.split = "train"  # tfds / hf split; hf allows slicing ("train[:10%]", "train[100:200]+test")
    t.data_dir = ""  # tfds data_dir
    t.name = ""  # hf: the dataset's config name ("" = its default)
    t.revision = ""  # hf: branch, tag or commit of a Hub dataset ("" = main)
    t.data_files = ()  # hf: data files to read (a path, a list, or {split: paths}); () = the dataset's own
    # auto | fields | alpaca | self_instruct | chat | text | prompt_completion (data/formats.py): auto
    # detects TRL's dataset formats per task (text, prompt/completion, messages) and plain fields.
    t.format = "auto"
    t.fields = {}  # {template_field: source_column}; "a.b.0" reads nested values
    # (input_pattern, target_pattern) pairs; or a built-in set name ("nli", "extractive_qa", ...),
    # "file.json|yaml[:key]" or "python.module:ATTR[.key]" (e.g. FLAN's own pattern lists).
    t.templates = (("{prompt}", "{response}"),)
    t.chat_template = ""  # format=chat: built-in name, jinja string, tokenizer_config.json; "" = the tokenizer's
    t.options_style = "deterministic"  # {options_}: deterministic | random (heading/marker styles)
    t.options_field = "options"
    t.answer_field = "answer"  # rewritten to the option's marker when markers are letters/numbers
    t.few_shot = 0  # k exemplars from the same task (0 = zero-shot)
    t.few_shot_separator = "\n\n"  # between exemplars and before the example
    t.few_shot_target_separator = "\n"  # between an exemplar's input and its target
    t.few_shot_max_tokens = 0  # prompt budget for exemplars + example (0 = data.seq_len)
    t.cot = False  # chain-of-thought target: cot_pattern over the rationale field and the answer
    t.cot_pattern = "{rationale}\nSo the answer is {target_}."
    t.cot_instruction = "\nLet's think step by step."  # appended to the prompt when cot is on
    t.inversion = 0.0  # probability of an input-inverted example (target -> input)
    t.inversion_templates = ()  # template set for inverted examples; () = a generic swap
    t.word_dropout = 0.0
    t.truncation = "truncate"  # truncate | drop | error
    t.on_error = "error"  # error | skip (counted)
    t.weight = 1.0  # mixture.mode=weights
    t.cap = 0  # this task's examples-proportional cap (0 = data.mixture.cap)
    # Quality filters applied before training (datatools/quality.py QualityFilters keys), e.g.
    # {"min_words": 3, "nonempty": ("output",), "max_duplicate_line_fraction": 0.3}; {} = none.
    t.filters = {}
    for key in overrides:
        if key not in t:
            raise unknown_key_error(t, key)
    return ml_collections.ConfigDict({**t.to_dict(), **overrides})


EVAL_METRICS = ("generative", "multiple_choice", "preference", "instructions")


def eval_task_config(metric: str = "generative", max_examples: int = 0, **task_keys) -> ml_collections.ConfigDict:
    """One held-out task of `config.eval.tasks`: a `task_config` (source, fields, templates, options...)
    plus its metric (generative: exact match/F1, zero- and k-shot; multiple_choice: option log-likelihood
    over the task's options field; preference: held-out pairs scored by a pair objective's loss,
    reward accuracy and margin; instructions: IFEval-style prompt/instruction-level strict/loose
    accuracy of greedy responses against each record's `constraints`, or IFEval's own records; the
    prompt is the template's input pattern) and `max_examples` (0 = all records)."""
    t = task_config(**task_keys)
    t.metric, t.max_examples = metric, max_examples
    return t
