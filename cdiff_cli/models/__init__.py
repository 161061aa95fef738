"""Base models: finding, loading and running them within memory.

- `base`: resolving a base (hub id, local diffusers folder, single-file checkpoint, `nano`), choosing the
  device and precision, and loading the pipeline (`load_base`, `load_pipeline`);
- `loading`: casting a diffusers folder's weights tensor by tensor from its files (no memory spike);
- `memory`: the preflight estimate of a training run's memory;
- `offload`: frozen weights kept in CPU memory and brought to the GPU one layer or one model at a time;
- `frozen_ops`: autograd functions for frozen layers that keep less for the backward;
- `packaged`: the models shipped in this folder (`nano/`, `nano-clip/`: weights, not code).
Dependencies point down that list, and on nothing above `core`.
"""
