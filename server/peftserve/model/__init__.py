"""The base model: building the embedded default model and loading any supported one."""
