"""The device policy and the kernels it chooses between (see policy.py for the table).

Models ask this package; nothing above it reads the device. Public API:
policy(), policy_for(), force_device(), DevicePolicy, DTYPES; the kernels
scaled_dot_product_attention / flash_attention and PlainLayerNorm; synchronize(), empty_cache(),
peak_device_memory_gib(), device_memory_gib(), allow_tf32(); DeviceAware / AttentionChoice and set_attention_backend();
the layout helpers expand_as, split_heads, merge_heads, in_order, over_token_chunks.
"""

from .attention import BACKENDS, flash_attention, scaled_dot_product_attention
from .choices import AttentionChoice, DeviceAware, set_attention_backend
from .layout import expand_as, in_order, merge_heads, over_token_chunks, split_heads
from .norms import PlainLayerNorm
from .policy import DTYPES, DevicePolicy, force_device, policy, policy_for
from .runtime import allow_tf32, device_memory_gib, empty_cache, peak_device_memory_gib, synchronize

__all__ = ["BACKENDS", "allow_tf32", "DTYPES", "AttentionChoice", "DeviceAware", "DevicePolicy", "PlainLayerNorm",
           "device_memory_gib", "empty_cache", "expand_as", "flash_attention", "force_device", "in_order",
           "merge_heads", "over_token_chunks", "peak_device_memory_gib", "policy", "policy_for",
           "scaled_dot_product_attention", "set_attention_backend", "split_heads", "synchronize"]
