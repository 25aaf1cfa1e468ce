"""An attention implementation: `jax.nn.dot_product_attention` (XLA) behind jaxtune's interface.

An implementation is a function `(q[B,T,H,D], k[B,S,K,D], v[B,S,K,D], call) -> [B,T,H,D]`;
`call` (`attention.Call`) carries everything that defines the mask: segment ids, the query
offset (KV cache), the sliding window, soft-capping, the scale and prefix-tuning slots. It must
compute what `reference` computes (the contract in jaxtune/models/attention.py).
"""

import jax
import jax.numpy as jnp

from jaxtune.models import attention


def plain_attention(q, k, v, call):
    if call.soft_cap is not None or call.prefix is not None:  # not expressible here: hand it to the reference
        return attention.attend(q, k, v, q_segment_ids=call.q_segment_ids, kv_segment_ids=call.kv_segment_ids,
                                q_offset=call.q_offset, sliding_window=call.sliding_window,
                                is_sliding=call.is_sliding, soft_cap=call.soft_cap, scale=call.scale,
                                prefix=call.prefix, implementation="reference")
    mask = attention.make_attention_mask(call.q_segment_ids, call.kv_segment_ids, q_offset=call.q_offset)
    if call.sliding_window is not None:
        local = attention.make_attention_mask(call.q_segment_ids, call.kv_segment_ids, q_offset=call.q_offset,
                                              sliding_window=call.sliding_window)
        mask = local if call.is_sliding is None else jnp.where(call.is_sliding, local, mask)
    out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                       mask=mask[:, None], scale=call.scale, implementation="xla")
    return out.astype(v.dtype)
