"""vlmkit weights: model directories (transformers layouts and vlmkit's own format, one Converter per
model_type) and GGUF files, read and written without pickle.

    model = from_pretrained("path/to/llava-1.5-7b-hf")   # any supported directory
    save_pretrained(model, "out/")                         # transformers (or vlmkit) can load this back
"""

from vlmkit.weights.hf import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
