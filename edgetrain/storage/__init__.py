"""Everything edgetrain writes to disk: atomic writes, the safetensors codec, the module
store, the activation cache and the run directory's records."""
