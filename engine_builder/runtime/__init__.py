"""Run time: an engine on a device behind the ModelBackend protocol (backend.py), and its tokenizer.

Nothing here imports the build side (engine_builder.checkpoint, convert, engine_writer, cli) or loader.py, and the
build side imports nothing here (tests/engine_builder/test_layers.py checks). Both share engine_dir.py (the format),
model_config.py, forward_batch.py and models/ (with layers/ and kernels/).
"""
