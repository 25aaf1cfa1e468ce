"""The batch contract shared by the data pipeline (which builds batches) and the objectives (which
read them): the key names, in one leaf module both can import.

Every training row is a dict of int32 arrays of length T: `inputs` and `targets` (the next-token
pairs), `loss_mask` (1 where a target is trained), `segment_ids` (0 = padding; packed rows hold
several examples told apart by id) and `positions` (restarting at 0 per segment). Packed
preference rows add `pair_mask` [max_pairs]: 1 where the slot holds a pair; pair k of a row is
segments 2k + 1 (chosen) and 2k + 2 (rejected) (data/pair_packing.py builds them,
objectives/segments.py sums log-probs back per pair).
"""

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
# Encoder-decoder rows (T5): `inputs`/`segment_ids`/`positions` are the encoder stream; the decoder
# stream is `decoder_inputs` (the targets shifted right behind the start token), `targets`,
# `loss_mask`, `decoder_segment_ids` and `decoder_positions`. Packed, segment k of one stream is
# segment k of the other (T5X-style).
SEQ2SEQ_BATCH_KEYS = ("inputs", "segment_ids", "positions", "decoder_inputs", "targets", "loss_mask",
                      "decoder_segment_ids", "decoder_positions")
PAIR_MASK_KEY = "pair_mask"  # a packed pair batch's slots [R, max_pairs]


def is_packed_pairs(batch) -> bool:
    """Whether a pair batch holds packed rows (several pairs per row) rather than padded [B, 2, T] pairs."""
    return PAIR_MASK_KEY in batch


def row_keys(batch) -> tuple[str, ...]:
    """The per-token keys of a batch's rows: an encoder-decoder's two streams, or the decoder-only ones."""
    return SEQ2SEQ_BATCH_KEYS if "decoder_inputs" in batch else BATCH_KEYS
