"""Image schemes: how an image of any size becomes pixel tensors and a number of tokens."""
