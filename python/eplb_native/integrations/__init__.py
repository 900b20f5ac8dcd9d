"""Integrations of ``eplb_native.attach`` with frameworks that own their MoE layers.

- :mod:`eplb_native.integrations.transformers`: Hugging Face transformers MoE models under
  transformers' own expert parallelism (``pip install eplb_native[transformers]``).

Each integration is imported on demand (it imports its framework), never by ``eplb_native``.
"""
