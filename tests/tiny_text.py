"""The small OpenCLIP text-tower config the text tests build (random weights; CLIP's BPE vocabulary and context)."""

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
