"""Model-side feature layouts, one file per image scheme: pure tensor functions that turn a vision
tower's per-view features and the image's ImagePlan into exactly plan.num_tokens LM-input vectors
(merges, unpadding, newline and separator embeddings, ordering), raising ValueError on a count mismatch."""
