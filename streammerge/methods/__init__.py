"""Merge methods, one module each (``linear.py``, ``ties.py``, ...), found by the registry.

See ``streammerge.methods.method`` for what a method declares and
``streammerge.methods.params`` for its parameters.
"""
