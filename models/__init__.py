"""Model building for fleet engineers: simulate labelled runs, train, evaluate, export to ONNX, quantize to int8.

The shipped model and its card live beside this file. Build again with `python -m models.build`.
"""
