"""A plugin whose import raises, as one with a missing native dependency would."""
raise ImportError("simulated failure: libbroken.so not found")
