"""The method's core, free of I/O beyond its own file format: what a concept is and how it enters a model.

- `delta`: `Delta` (the trained k/v weights and token rows), its `delta.safetensors` format, content checks,
  and writing it into a pipeline;
- `layers`: which parameters are trained, reading and writing them, and the base fingerprint;
- `tokens`: the token grammar, adding tokens to a tokenizer, finding them in prompts;
- `textcond`: prompt encoding for one text encoder (SD 1.x/2.x) or two (SDXL);
- `lowrank`: truncated-SVD factorisation and rank choice (`cdiff compress`, LoRA export);
- `prompts`: the method's prompt templates (training captions, class prompts, the merge's constraints).
"""
