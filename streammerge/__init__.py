"""streammerge: memory-streaming M3 + DARE merge engine (see README.md)."""
