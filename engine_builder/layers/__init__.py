"""Building blocks of the runtime models (nn.Modules); they call kernels through engine_builder.kernels."""
