"""Model tooling around the method: loading local and named models (``loading``) and carving a
dense model into an MoE (``carving``)."""
