"""Adapters that put ``lean_tvm.decode_attention`` inside other frameworks. Each is an optional
extra (``lean-tvm[hf]`` for ``integrations.transformers``); nothing in the core package imports them."""
