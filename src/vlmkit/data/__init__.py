"""Training and evaluation data: dataset files in, normalised samples out.

- `formats`: read LLaVA-style JSON / JSONL datasets (the `conversations` form and the `messages`
  form) into `Sample`s, validating every record (file:line and cause for each bad one), and write
  samples back as LLaVA JSON (`load_dataset`, `write_llava_json`).
- `labels`: a conversation -> input ids with labels on the assistant replies only (`build_training_example`).
- `collate`: padded batches and packed rows without attention across samples (`collate`, `pack`).
- `synth`: the Vary-style synthetic data engine (`synthesize`, `vlmkit data synth`).
"""
